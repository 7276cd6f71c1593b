"""Quality under compression (issue 5), from one run on smollm2-135m and the books (no Hub).

1. ppl_compressed -- teacher-forced perplexity of the ``--eval-tokens`` that follow each
   prompt, while the press acts on the cache -- for every registered press (``--presses``,
   default ``all``: knorm and its controls, and the field's strong policies: SnapKV, TOVA,
   Expected Attention, KeyDiff, PyramidKV, AdaKV, CriticalKV) at keep_ratio 0.9, 0.7, 0.5,
   0.3, next to the full cache; median over ``--samples`` windows. If knorm's claim holds on
   this model: knorm < random and knorm << knorm-inverse at the same keep_ratio; the
   informed policies show what else is on offer.
2. Passkey retrieval (prefill mode, the paper's setting): accuracy at keep_ratio 1.0 /
   0.5 / 0.2 for each press, needle at several depths, a few seeds, greedy answers.

Mode for (1), ``--mode``: prefill (default) cuts the prompt once to keep_ratio of its
length (kvpress's convention), so keep_ratio is the fraction of the context kept and the
columns compare. In decode mode (the original scripts') the cache is cut after every token
once it holds more than ``--prune-after`` entries: the cache ends near the budget whatever
keep_ratio is, which only sets the eviction batch -- the columns then barely differ.

    python benchmarks/quality.py                      # CPU heavy: prints its estimate first
    python benchmarks/quality.py --mode decode --prune-after 512
    python benchmarks/quality.py --quick
    python benchmarks/quality.py --presses knorm,snapkv(window_size=32),kvpress:TOVAPress

Presses that do not support the mode (pyramidkv, adakv and kvpress:* are prefill-only) are
left out of the decode-mode table, with a note.
"""

from __future__ import annotations

import random
import time

import _common as c


def parse_args():
    p = c.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--prune-after", type=int, default=512, help="decode mode: the budget")
    p.add_argument("--skip-layers", default="0", help="comma-separated layer indices never cut ('' for none)")
    p.add_argument("--keep-recent", type=int, default=0)
    p.add_argument("--presses", default="all", help="press specs as for knormctl sweep (default: every registered press)")
    p.add_argument("--keep-ratios", default="0.9,0.7,0.5,0.3")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--passkey-length", type=int, default=2048)
    p.add_argument("--passkey-keep-ratios", default="1.0,0.5,0.2")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-seeds", type=int, default=2)
    p.add_argument("--passkey-new-tokens", type=int, default=10)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-passkey", action="store_true")
    p.add_argument("--estimate-only", action="store_true", help="print the header with the run-time estimate, stop")
    args = p.parse_args()
    if args.quick:
        args.samples, args.prompt_tokens, args.eval_tokens, args.keep_ratios = 1, 256, 16, "0.5"
        args.passkey_length, args.passkey_keep_ratios, args.depths, args.passkey_seeds = 256, "1.0,0.5", "0.5", 1
        args.prune_after = min(args.prune_after, 128)
    return args


def press_config(press: str, kr: float, args, skip, seed: int = 0, mode: str | None = None):
    from knormctl.config import PressConfig
    from knormctl.press_spec import parse_press_spec

    mode = mode or args.mode
    name, params = parse_press_spec(press)
    # prefill mode: prune_after 0 so the prompt is always cut to keep_ratio of its length
    return PressConfig(press=name, params=params, keep_ratio=kr,
                       prune_after=0 if mode == "prefill" else args.prune_after, skip_layers=skip, mode=mode,
                       keep_recent=args.keep_recent, seed=seed).validate()


def supported(presses: list[str], mode: str) -> list[str]:
    from knormctl.press_spec import parse_press_spec
    from knormctl.engine.presses import make_press

    kept = []
    for spec in presses:
        name, params = parse_press_spec(spec)
        if mode in make_press(name, params=dict(params)).modes:
            kept.append(spec)
    return kept


def estimate(args, lm, sample, presses: list[str], krs: list[float], skip, n_samples: int, n_passkey: int) -> str:
    """Time one short evaluation per press on the first sample (a press that scores with
    attention prefills more slowly: timing the full cache alone ran 3x low on the EPYC) and
    one full-cache generation; scale to the whole run."""
    from knormctl.config import PressConfig
    from knormctl.engine.loop import run_generation
    from knormctl.engine.quality import compressed_perplexity

    run_generation(lm.model, sample.prompt_ids[:64], PressConfig().validate(), 2)  # warm-up: the first call is cold
    r = run_generation(lm.model, sample.prompt_ids, PressConfig().validate(), 4)
    prefill, step = r.ttft_s, r.tpot_s
    probe = min(8, len(sample.eval_ids))  # scored tokens per probe: the prefill, the cut and a few steps

    def evaluation(cfg) -> float:
        t = time.perf_counter()
        compressed_perplexity(lm.model, sample.prompt_ids, sample.eval_ids[:probe], cfg)
        return time.perf_counter() - t + (args.eval_tokens - probe) * step

    kr = sorted(krs)[len(krs) // 2]
    per_press = {p: evaluation(press_config(p, kr, args, skip)) for p in presses} if krs else {}
    ppl_s = n_samples * (evaluation(PressConfig().validate()) + len(krs) * sum(per_press.values())) if presses else 0.0
    pk_s = n_passkey * (prefill * args.passkey_length / len(sample.prompt_ids) + args.passkey_new_tokens * step)
    slowest = max(per_press, key=per_press.get, default=None)
    each = (f" (an evaluation {min(per_press.values()):.1f} to {per_press[slowest]:.1f} s, {slowest} the slowest)"
            if slowest else "")
    return (f"~{(ppl_s + pk_s) / 60:.1f} min: perplexity ~{ppl_s / 60:.1f} min{each}, passkey {n_passkey} x ~"
            f"{pk_s / max(n_passkey, 1):.1f} s (prefill {prefill:.2f} s, step {step * 1e3:.0f} ms; assumes a quiet "
            f"machine and prefill time linear in length)")


def passkey_configs(args, presses, krs, skip) -> dict:
    from knormctl.config import PressConfig

    # keep_ratio 1.0 evicts nothing for every press: run it once, as the full cache
    configs = {"full cache (every press at 1.0)": PressConfig().validate()} if 1.0 in krs else {}
    for p in presses:
        configs.update({(p, kr): press_config(p, kr, args, skip, mode="prefill") for kr in krs if kr < 1.0})
    return configs


def perplexity(args, lm, samples, presses, krs, skip, started: float) -> None:
    from knormctl.config import PressConfig
    from knormctl.engine.quality import compressed_perplexity

    full, ppl = [], {(p, kr): [] for p in presses for kr in krs}
    for s_i, s in enumerate(samples):
        full.append(compressed_perplexity(lm.model, s.prompt_ids, s.eval_ids, PressConfig().validate()))
        for press in presses:
            for kr in krs:
                cfg = press_config(press, kr, args, skip, seed=args.seed + s_i)
                ppl[(press, kr)].append(compressed_perplexity(lm.model, s.prompt_ids, s.eval_ids, cfg))
        c.log(f"sample {s_i + 1}/{len(samples)} done ({(time.perf_counter() - started) / 60:.1f} min)")

    docs = ", ".join(f"{s.doc_id}@{s.char_offset}" for s in samples)
    rows = [["full cache"] + [c.num(c.median(full), 2)] * len(krs)]
    rows += [[p] + [c.num(c.median(ppl[(p, kr)]), 2) for kr in krs] for p in presses]
    mode_note = (f"prefill mode: the prompt cut once to keep_ratio x {args.prompt_tokens}" if args.mode == "prefill"
                 else f"decode mode: cut after every token above prune_after {args.prune_after}")
    c.table(f"ppl_compressed, median over {len(samples)} samples (lower is better)",
            ["press \\ keep_ratio"] + [f"{kr:g}" for kr in krs], rows,
            notes=[mode_note, f"prompt {args.prompt_tokens} tokens, {args.eval_tokens} eval tokens, skip_layers "
                   f"{list(skip) or 'none'}", f"samples: {docs}"])
    rows = [[p] + [c.num(c.median([a / b for a, b in zip(ppl[(p, kr)], full)]), 3) for kr in krs] for p in presses]
    c.table("ppl_compressed / full cache, median of per-sample ratios", ["press \\ keep_ratio"]
            + [f"{kr:g}" for kr in krs], rows)


def passkey(args, lm, configs: dict, depths, skip, started: float) -> None:
    from knormctl.engine.loop import run_generation
    from knormctl.tasks.passkey import build_passkey_sample, is_correct, make_passkey
    from knormctl.engine.text import load_documents

    docs = load_documents(args.text, progress=c.log)
    hits = {k: 0 for k in configs}
    by_depth = {(k, d): 0 for k in configs for d in depths}
    for seed in range(args.passkey_seeds):
        rng = random.Random(args.seed * 1000 + seed)
        doc = rng.choice(docs)
        start = rng.randrange(0, max(1, len(doc.text) - 8 * args.passkey_length))
        filler = doc.text[start:start + 8 * args.passkey_length]  # ~4 chars a token: ample
        for depth in depths:
            key = make_passkey(rng)
            sample = build_passkey_sample(lm.tokenizer, filler, args.passkey_length, depth, key,
                                          doc_id=doc.doc_id, char_offset=start)
            for name, cfg in configs.items():
                r = run_generation(lm.model, sample.prompt_ids, cfg, args.passkey_new_tokens, tokenizer=lm.tokenizer)
                ok = is_correct(r.text, key)
                hits[name] += ok
                by_depth[(name, depth)] += ok
        c.log(f"passkey seed {seed + 1}/{args.passkey_seeds} done ({(time.perf_counter() - started) / 60:.1f} min)")

    n = args.passkey_seeds * len(depths)
    label = {k: k if isinstance(k, str) else f"{k[0]} {k[1]:g}" for k in configs}
    c.table(f"passkey accuracy at {args.passkey_length} tokens (prefill mode, greedy, {args.passkey_new_tokens} "
            f"new tokens)", ["configuration", "correct", "accuracy"] + [f"depth {d:g}" for d in depths],
            [[label[k], f"{hits[k]}/{n}", c.num(hits[k] / n, 2)] + [f"{by_depth[(k, d)]}/{args.passkey_seeds}"
                                                                     for d in depths] for k in configs],
            notes=[f"{args.passkey_seeds} seeds x {len(depths)} depths; skip_layers {list(skip) or 'none'}"])


def main() -> None:
    args = parse_args()
    c.setup(args)
    from knormctl.options import parse_float_list, parse_int_list
    from knormctl.press_spec import parse_press_list, resolve_press_list

    presses = resolve_press_list(parse_press_list(args.presses), "prefill")  # passkey runs in prefill mode
    ppl_presses = supported(presses, args.mode)
    if len(ppl_presses) < len(presses):
        c.log(f"{args.mode} mode: leaving out {', '.join(p for p in presses if p not in ppl_presses)} "
              "(prefill-only) from the perplexity table")
    krs = parse_float_list(args.keep_ratios, "--keep-ratios")
    pk_krs = parse_float_list(args.passkey_keep_ratios, "--passkey-keep-ratios")
    skip = tuple(parse_int_list(args.skip_layers, "--skip-layers", allow_empty=True))
    depths = parse_float_list(args.depths, "--depths")
    lm = c.load(args)
    samples = c.prompts(args, lm.tokenizer, args.samples, args.prompt_tokens, args.eval_tokens)
    pk_configs = passkey_configs(args, presses, pk_krs, skip)
    n_ppl = 0 if args.skip_ppl else len(samples) * (1 + len(ppl_presses) * len(krs))
    n_pk = 0 if args.skip_passkey else args.passkey_seeds * len(depths) * len(pk_configs)
    c.header("quality under compression", args, {
        "model": lm.resolved, "text": args.text, "ppl mode": args.mode, "presses": ", ".join(presses),
        "keep ratios (ppl / passkey)": f"{args.keep_ratios} / {args.passkey_keep_ratios}",
        "estimated run time": estimate(args, lm, samples[0], [] if args.skip_ppl else ppl_presses, krs, skip,
                                       len(samples), n_pk)})
    if args.estimate_only:
        return
    started = time.perf_counter()
    if n_ppl:
        perplexity(args, lm, samples, ppl_presses, krs, skip, started)
    if n_pk:
        passkey(args, lm, pk_configs, depths, skip, started)
    print(f"run time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
