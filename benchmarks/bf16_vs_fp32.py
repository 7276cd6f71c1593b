"""bfloat16 vs float32 on this machine: prefill time and decode TPOT, from one run, interleaved.

Both copies of the model are loaded once and run alternately on the same prompt. CPUs
with AMX (amx_bf16) multiply bf16 matrices in hardware; without it bf16 is often slower.

    python benchmarks/bf16_vs_fp32.py                   # 1024-token prompt, 32 new tokens
    python benchmarks/bf16_vs_fp32.py --dtype float16   # compare float32 with float16 instead
    python benchmarks/bf16_vs_fp32.py --quick
"""

from __future__ import annotations

from pathlib import Path

import _common as c


def amx_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}
    flags = sorted(f for f in flags if f.startswith("amx"))
    return " ".join(flags) if flags else "none"


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=5)
    p.set_defaults(dtype="bfloat16")  # the dtype compared with float32
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 128, 8, 2
    if args.dtype == "float32":
        raise SystemExit("--dtype is the dtype compared with float32: pick bfloat16 or float16")
    c.setup(args)

    import argparse

    import torch

    from knormctl.config import PressConfig
    from knormctl.engine.loop import run_generation

    fp32 = c.load(argparse.Namespace(**{**vars(args), "dtype": "float32"}))
    low = c.load(args)
    ids = c.prompts(args, fp32.tokenizer, 1, args.prompt_tokens)[0].prompt_ids
    n = args.new_tokens
    c.header(f"float32 vs {args.dtype}", args, {
        "dtype": f"float32 vs {args.dtype}", "amx flags (/proc/cpuinfo)": amx_flags(),
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "model": fp32.resolved, "prompt": f"{len(ids)} tokens", "new tokens": n,
        "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})

    cfg = PressConfig().validate()
    res = c.interleaved({"float32": lambda: run_generation(fp32.model, ids, cfg, n),
                         args.dtype: lambda: run_generation(low.model, ids, cfg, n)}, args.repeats)

    def med(name, field):
        return c.median([getattr(r, field) for r in res[name]])

    cuda = args.device == "cuda"
    c.table("per dtype (medians over rounds)", ["dtype", "prefill (TTFT) ms", "TPOT ms", "ITL p50 ms", "tokens/s"]
            + (["max_memory_allocated MiB"] if cuda else []),
            [[k, c.ms(med(k, "ttft_s"), 1), c.ms(med(k, "tpot_s")), c.ms(med(k, "itl_p50_s")),
              c.num(med(k, "throughput_tps"), 1)] + ([c.mib(max(r.memory.bytes or 0 for r in res[k]))] if cuda else [])
             for k in res])
    pre = c.paired_ratios([r.ttft_s for r in res[args.dtype]], [r.ttft_s for r in res["float32"]])
    dec = c.paired_ratios([r.tpot_s for r in res[args.dtype]], [r.tpot_s for r in res["float32"]])
    a, b = res[args.dtype][-1].token_ids, res["float32"][-1].token_ids
    same = sum(x == y for x, y in zip(a, b))
    c.table(f"{args.dtype} / float32 (same run; < 1 means {args.dtype} is faster)",
            ["measure", "ratio of medians", "paired min-max"], [
                ["prefill time", c.num(c.ratio(med(args.dtype, "ttft_s"), med("float32", "ttft_s"))), c.spread(pre)],
                ["decode TPOT", c.num(c.ratio(med(args.dtype, "tpot_s"), med("float32", "tpot_s"))), c.spread(dec)],
                ["greedy tokens equal to float32", f"{same}/{len(b)}", "-"]])


if __name__ == "__main__":
    main()
