"""Engine overhead (issue 2; issue 6 targets 1 and 2), from one run, configurations interleaved.

1. engine baseline TPOT / model.generate() TPOT            target <= 1.05
2. knorm at keep_ratio 1.0 / no press (nothing to evict)   target <= 1.02
   with prune_after 0 (the rule is checked after every step) and the default 512.
Also: the engine baseline's tokens equal generate()'s (same prompt, greedy).

    python benchmarks/engine_overhead.py                # 512-token prompt, 128 new tokens
    python benchmarks/engine_overhead.py --quick        # dry run
"""

from __future__ import annotations

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=7)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 64, 16, 2
    c.setup(args)

    from knormctl.config import PressConfig
    from knormctl.engine.api import reference_generate
    from knormctl.engine.loop import run_generation

    lm = c.load(args)
    sample = c.prompts(args, lm.tokenizer, 1, args.prompt_tokens)[0]
    ids, n = sample.prompt_ids, args.new_tokens
    c.header("engine overhead", args, {"model": lm.resolved, "prompt": f"{len(ids)} tokens ({sample.doc_id})",
                                       "new tokens": n, "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})

    def engine(cfg: PressConfig):
        def run():
            r = run_generation(lm.model, ids, cfg, n)
            return {"tpot": r.tpot_s, "p50": r.itl_p50_s, "ttft": r.ttft_s, "tokens": r.token_ids,
                    "peak": r.memory.bytes if args.device == "cuda" else None}
        return run

    def generate():
        c.cuda_peak_reset(args.device)
        r = reference_generate(lm.model, ids, n)
        return {"tpot": r["tpot_s"], "p50": r["itl_p50_s"], "ttft": r["ttft_s"], "tokens": r["token_ids"],
                "peak": c.cuda_peak(args.device)}

    configs = {
        "model.generate()": generate,
        "engine, no press": engine(PressConfig().validate()),
        "knorm 1.0, prune_after 0": engine(PressConfig(press="knorm", keep_ratio=1.0, prune_after=0).validate()),
        "knorm 1.0, prune_after 512": engine(PressConfig(press="knorm", keep_ratio=1.0, prune_after=512).validate()),
    }
    res = c.interleaved(configs, args.repeats)
    tpot = {k: [r["tpot"] for r in v] for k, v in res.items()}
    med = {k: c.median(v) for k, v in tpot.items()}

    cols = ["configuration", "TPOT ms (median)", "ITL p50 ms", "TTFT ms"]
    if args.device == "cuda":
        cols.append("max_memory_allocated MiB")
    rows = []
    for k, v in res.items():
        row = [k, c.ms(med[k], 3), c.ms(c.median([r["p50"] for r in v]), 3), c.ms(c.median([r["ttft"] for r in v]))]
        if args.device == "cuda":
            row.append(c.mib(max(r["peak"] or 0 for r in v)))
        rows.append(row)
    c.table("per configuration (medians over rounds)", cols, rows)

    base = "engine, no press"
    checks = [("engine no press / generate()", base, "model.generate()", 1.05),
              ("knorm 1.0 pa=0 / no press", "knorm 1.0, prune_after 0", base, 1.02),
              ("knorm 1.0 pa=512 / no press", "knorm 1.0, prune_after 512", base, 1.02)]
    rows = []
    for label, a, b, target in checks:
        r = c.ratio(med[a], med[b])
        pr = c.paired_ratios(tpot[a], tpot[b])
        rows.append([label, c.num(r), c.num(c.median(pr)), c.spread(pr), c.verdict(r, target)])
    c.table("TPOT ratios (same run)", ["ratio", "of medians", "paired median", "paired min-max", "target"], rows,
            notes=["paired = round by round (each pair ran back to back); min-max shows the machine's noise"])

    gen_tok, eng_tok = res["model.generate()"][-1]["tokens"], res[base][-1]["tokens"]
    k1_tok = res["knorm 1.0, prune_after 0"][-1]["tokens"]
    mm = c.first_mismatch(eng_tok, gen_tok)
    mm_k = c.first_mismatch(k1_tok, eng_tok)
    c.table("token check (greedy, same prompt)", ["comparison", "identical", "first mismatch"], [
        ["engine no press vs generate()", "yes" if mm is None else "NO", "-" if mm is None else mm],
        ["knorm 1.0 pa=0 vs engine no press", "yes" if mm_k is None else "NO", "-" if mm_k is None else mm_k],
    ], notes=[f"{len(eng_tok)} new tokens compared"])


if __name__ == "__main__":
    main()
