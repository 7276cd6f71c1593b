"""Peak KV memory with and without a chunked prefill (issue 16 item 2), one run.

knorm at keep_ratio 0.5 in prefill mode on a long prompt, the prompt prefilled in one forward
(the press can act only once the whole prompt is in the cache) and in chunks of N tokens (the
press cuts after each). Peak KV = the most the cache held after any forward (the engine's
kv_bytes_peak); on CUDA also max_memory_allocated. Plus TTFT, TPOT and how many greedy tokens
match the one-forward run (chunked prefill keeps what the press picks chunk by chunk).

    python benchmarks/prefill_chunk.py
    python benchmarks/prefill_chunk.py --quick
"""

from __future__ import annotations

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--chunks", default="512,1024", help="chunk sizes, comma-separated")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.chunks, args.new_tokens, args.repeats = 256, "64", 8, 1
    c.setup(args)

    from knormctl.config import PressConfig
    from knormctl.engine.loop import run_generation

    lm = c.load(args)
    ids = c.prompts(args, lm.tokenizer, 1, args.prompt_tokens)[0].prompt_ids
    chunks = [int(x) for x in args.chunks.split(",")]
    c.header("chunked prefill: peak KV memory", args, {
        "model": lm.resolved, "prompt": f"{len(ids)} tokens", "press": f"knorm {args.keep_ratio:g}, prefill mode, "
        "every layer", "new tokens": args.new_tokens, "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})
    cfg = PressConfig(press="knorm", keep_ratio=args.keep_ratio, prune_after=0, skip_layers=(),
                      mode="prefill").validate()
    full = PressConfig().validate()

    def gen(pc, chunk):
        return lambda: run_generation(lm.model, ids, pc, args.new_tokens, prefill_chunk=chunk)

    configs = {"full cache, one forward": gen(full, 0), "knorm, one forward": gen(cfg, 0)}
    configs.update({f"knorm, chunks of {n}": gen(cfg, n) for n in chunks})
    res = c.interleaved(configs, args.repeats)
    ref = res["knorm, one forward"][-1]
    cuda = args.device == "cuda"
    rows = []
    for name, rs in res.items():
        last = rs[-1]
        mm = c.first_mismatch(last.token_ids, ref.token_ids)
        row = [name, c.mib(last.kv_bytes_peak), c.num(last.kv_bytes_peak / res["full cache, one forward"][-1]
                                                      .kv_bytes_peak), c.mib(last.kv_bytes_final),
               c.ms(c.median([r.ttft_s for r in rs]), 0), c.ms(c.median([r.tpot_s for r in rs])),
               f"{len(last.token_ids) if mm is None else mm}/{len(last.token_ids)}"]
        if cuda:
            row.append(c.mib(max(r.memory.bytes or 0 for r in rs)))
        rows.append(row)
    c.table("peak KV memory both ways (medians of times over rounds)",
            ["configuration", "peak KV MiB", "peak / full", "KV MiB at end", "TTFT ms", "TPOT ms",
             "tokens = one-forward knorm"] + (["max_memory_allocated MiB"] if cuda else []), rows,
            notes=["peak KV: the largest cache after any forward (before the cut that follows it)",
                   "tokens: leading greedy tokens equal to the one-forward knorm run's"])


if __name__ == "__main__":
    main()
