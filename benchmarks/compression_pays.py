"""Compression that pays (issue 6 target 4), from one run, configurations interleaved.

Prefill mode, keep_ratio 0.5, 4096-token prompt from the books, against the full cache:
    decode TPOT ratio                          target <= 0.75
    KV bytes right after the cut               target 0.50 (+-1%)
    how many of the first 32 greedy tokens match the full cache's
Decode mode with prune_after 1024 (the budget bounds the cache):
    median ITL at a 4096-token prompt / a 1024-token prompt's full-cache median ITL
                                               target <= 1.10 (within 10%)

With --with-reference, the full cache and prefill 0.5 also run on transformers'
DynamicCache (the path before issue 16's in-place buffer, which copies the cache every
step), interleaved with the rest: the ratio each path gives, and the buffer's own effect.

    python benchmarks/compression_pays.py
    python benchmarks/compression_pays.py --quick
    python benchmarks/compression_pays.py --with-reference
    python benchmarks/compression_pays.py --with-static --dtype bfloat16

With --with-static, the full cache and prefill 0.5 also run with --decode-step static (a
fixed-shape step over the right-sized buffer with knormctl's grouped attention), interleaved.
"""

from __future__ import annotations

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--long-tokens", type=int, default=4096, help="the long prompt")
    p.add_argument("--short-tokens", type=int, default=1024, help="the short prompt (= the decode-mode budget)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prefill-keep-ratio", type=float, default=0.5)
    p.add_argument("--decode-keep-ratio", type=float, default=0.9, help="decode mode: 1 - the eviction batch")
    p.add_argument("--skip-layers", default="", help="comma-separated; default none, so every layer is bounded "
                                                     "(with layer 0 skipped the KV ratio would be 0.517, not 0.50)")
    p.add_argument("--with-reference", action="store_true",
                   help="also run the full cache and prefill on DynamicCache (the pre-buffer path)")
    p.add_argument("--with-static", action="store_true",
                   help="also run the full cache and prefill with --decode-step static")
    args = p.parse_args()
    if args.quick:
        args.long_tokens, args.short_tokens, args.new_tokens, args.repeats = 256, 64, 12, 1
    c.setup(args)

    from knormctl.config import PressConfig
    from knormctl.options import parse_int_list
    from knormctl.engine.loop import run_generation

    skip = tuple(parse_int_list(args.skip_layers, "--skip-layers", allow_empty=True))
    lm = c.load(args)
    sample = c.prompts(args, lm.tokenizer, 1, args.long_tokens)[0]
    long_ids = sample.prompt_ids
    short_ids = long_ids[-args.short_tokens:]  # the same text, the part nearest the generation
    n = args.new_tokens
    c.header("compression that pays", args, {
        "model": lm.resolved, "prompts": f"{len(long_ids)} and {len(short_ids)} tokens ({sample.doc_id})",
        "new tokens": n, "skip_layers": list(skip) or "none",
        "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})

    full = PressConfig().validate()
    prefill = PressConfig(press="knorm", keep_ratio=args.prefill_keep_ratio, prune_after=0, skip_layers=skip,
                          mode="prefill").validate()
    decode = PressConfig(press="knorm", keep_ratio=args.decode_keep_ratio, prune_after=args.short_tokens,
                         skip_layers=skip, mode="decode").validate()

    def gen(ids, cfg, kv_buffer=True, decode_step="launched"):
        return lambda: run_generation(lm.model, ids, cfg, n, kv_buffer=kv_buffer, decode_step=decode_step)

    L, S = args.long_tokens, args.short_tokens
    names = {"full": f"{L} full cache", "prefill": f"{L} knorm {args.prefill_keep_ratio:g} prefill",
             "decode": f"{L} knorm decode prune_after {S}", "short": f"{S} full cache"}
    configs = {names["full"]: gen(long_ids, full), names["prefill"]: gen(long_ids, prefill),
               names["decode"]: gen(long_ids, decode), names["short"]: gen(short_ids, full)}
    if args.with_reference:
        names["full_ref"], names["prefill_ref"] = names["full"] + " (DynamicCache)", names["prefill"] + " (DynamicCache)"
        configs[names["full_ref"]] = gen(long_ids, full, kv_buffer=False)
        configs[names["prefill_ref"]] = gen(long_ids, prefill, kv_buffer=False)
    if args.with_static:
        names["full_static"], names["prefill_static"] = names["full"] + " (static step)", names["prefill"] + " (static step)"
        configs[names["full_static"]] = gen(long_ids, full, decode_step="static")
        configs[names["prefill_static"]] = gen(long_ids, prefill, decode_step="static")
    res = c.interleaved(configs, args.repeats)

    def med(name, field):
        return c.median([getattr(r, field) for r in res[name]])

    cuda = args.device == "cuda"
    rows = []
    for name, rs in res.items():
        last = rs[-1]
        row = [name, c.ms(med(name, "tpot_s")), c.ms(med(name, "itl_p50_s")), c.ms(med(name, "ttft_s"), 0),
               c.mib(last.kv_bytes_final), last.kv_entries_final // lm.num_layers, last.compress_events]
        if cuda:
            row.append(c.mib(max(r.memory.bytes or 0 for r in rs)))
        rows.append(row)
    c.table("per configuration (medians over rounds)",
            ["configuration", "TPOT ms", "ITL p50 ms", "TTFT ms", "KV MiB at end", "entries/layer at end", "events"]
            + (["max_memory_allocated MiB"] if cuda else []), rows)

    # KV right after the cut: the end state minus the (n - 1) entries each layer gained while decoding
    def after_cut(r):
        return r.kv_entries_final - (r.new_tokens - 1) * lm.num_layers

    f_last, p_last = res[names["full"]][-1], res[names["prefill"]][-1]
    kv_cut = after_cut(p_last) / after_cut(f_last)  # entries of one dtype: the bytes ratio is the same
    kv_end = p_last.kv_bytes_final / f_last.kv_bytes_final
    k = min(32, n)
    match = sum(a == b for a, b in zip(p_last.token_ids[:k], f_last.token_ids[:k]))
    prefix = c.first_mismatch(p_last.token_ids[:k], f_last.token_ids[:k])
    tpot_r = c.ratio(med(names["prefill"], "tpot_s"), med(names["full"], "tpot_s"))
    itl_r = c.ratio(med(names["decode"], "itl_p50_s"), med(names["short"], "itl_p50_s"))
    tp = c.paired_ratios([r.tpot_s for r in res[names["prefill"]]], [r.tpot_s for r in res[names["full"]]])
    ip = c.paired_ratios([r.itl_p50_s for r in res[names["decode"]]], [r.itl_p50_s for r in res[names["short"]]])
    c.table("checks (same run)", ["check", "value", "paired min-max", "target"], [
        [f"prefill {args.prefill_keep_ratio:g}: TPOT / full", c.num(tpot_r), c.spread(tp), c.verdict(tpot_r, 0.75)],
        [f"prefill {args.prefill_keep_ratio:g}: KV bytes after the cut / full", c.num(kv_cut, 4), "-",
         "meets 0.50 +-1%" if abs(kv_cut - 0.5) <= 0.005 else "MISSES 0.50 +-1%"],
        [f"prefill {args.prefill_keep_ratio:g}: KV bytes at the end / full", c.num(kv_end, 4), "-", "(info)"],
        [f"prefill {args.prefill_keep_ratio:g}: first {k} tokens equal to full", f"{match}/{k}", "-",
         f"(info; identical prefix {k if prefix is None else prefix})"],
        [f"decode pa {S} @ {L} / full @ {S}: median ITL", c.num(itl_r), c.spread(ip), c.verdict(itl_r, 1.10)],
    ], notes=["+-1% read as 0.495..0.505; 'within 10%' read as at most 10% slower"])
    def tpot_ratio(a: str, b: str) -> list[str]:  # configuration a's TPOT over b's: median, paired spread
        return [c.num(c.ratio(med(names[a], "tpot_s"), med(names[b], "tpot_s"))),
                c.spread(c.paired_ratios([r.tpot_s for r in res[names[a]]], [r.tpot_s for r in res[names[b]]]))]

    def side_by_side(title: str, new: str, old: str, new_label: str, old_label: str, notes: list[str]) -> None:
        """prefill / full on two paths (configuration-name suffixes ``new`` and ``old``), and each
        configuration's TPOT on the new path over the old."""
        rows = [[f"prefill {args.prefill_keep_ratio:g}: TPOT / full, {label}", *tpot_ratio("prefill" + sfx, "full" + sfx)]
                for label, sfx in ((new_label, new), (old_label, old))]
        rows += [[f"{names[cfg]}: TPOT {new_label} / {old_label}", *tpot_ratio(cfg + new, cfg + old)]
                 for cfg in ("full", "prefill")]
        c.table(title, ["check", "value", "paired min-max"], rows, notes=notes)

    if args.with_reference:
        side_by_side("the in-place buffer against DynamicCache (same run)", "", "_ref", "buffer", "DynamicCache",
                     ["a cheaper full-cache step can raise the compression ratio while lowering every TPOT"])
    if args.with_static:
        side_by_side("--decode-step static against launched (same run)", "_static", "", "static", "launched",
                     ["static: fixed shapes over the right-sized buffer, knormctl's grouped attention "
                      "(engine/graphstep.py)",
                      f"static steps in the last round: {res[names['full_static']][-1].static_steps}/{n - 1} (full), "
                      f"{res[names['prefill_static']][-1].static_steps}/{n - 1} (prefill)"])

if __name__ == "__main__":
    main()
