"""One layer's decode attention (one query per row), three ways, at two model shapes.

The static decode step (--decode-step static|graph, engine/graphstep.py) uses knormctl's own
grouped attention over a masked whole buffer; the launched step uses SDPA over the valid
prefix; transformers' SDPA path with a mask repeats every key/value head per query head.
This times all three for smollm2-135m's heads (3 key x 3 query heads, head_dim 64) and the
Llama-3.1-8B shape (8 x 4, head_dim 128), per dtype and cache length, on one device:
what docs/performance.md and docs/gpu.md quote.

    python benchmarks/decode_attention.py                      # CPU, float32 and bfloat16
    python benchmarks/decode_attention.py --device cuda --dtypes bfloat16
    python benchmarks/decode_attention.py --quick
"""

from __future__ import annotations

import _common as c
import gpu_targets as g

SHAPES = {"smollm2-135m": (3, 3, 64), "llama-3.1-8b": (8, 4, 128)}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=7)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--lengths", default="1024,4096,16384")
    args = p.parse_args()
    lengths = [256] if args.quick else [int(x) for x in args.lengths.split(",")]
    args.dtype = args.dtypes  # the header's dtype line: every dtype this run times
    c.setup(args)
    c.header("decode attention, three ways", args, {"shapes": ", ".join(f"{k} {v}" for k, v in SHAPES.items()),
                                                    "lengths": lengths, "hidden slots": 64})
    summary = []
    for dtype in args.dtypes.split(","):
        for name, (kv, groups, d) in SHAPES.items():
            for length in lengths:
                summary += g.attention_kernels(args.device, length, 64, None, kv=kv, g=groups, d=d, dtype=dtype,
                                               label=f"[{name}]")
    c.table("summary: static_attention / SDPA over the valid prefix", ["dtype", "check", "value", "note"], summary)


if __name__ == "__main__":
    main()
