"""RULER accuracy per task under every registered press (issue 13, item 6).

Runs `knormctl sweep --task ruler` through the same Runner as the CLI (into a SQLite file
of its own), at each length, for the full cache and every press in the registry at each
keep ratio, then prints accuracy per subtask with a 95% interval (Wilson, over the
samples of the cell), the mean over subtasks, and which subtasks the FULL cache cannot do
(the report's rule: within NEAR_CHANCE_MARGIN of chance, or an interval reaching down to
it): there, what a press does means nothing.

    python benchmarks/tasks.py                       # 2048 and 4096 tokens, keep 0.5 and 0.25
    python benchmarks/tasks.py --samples 3 --subtasks niah_single_1,vt
    python benchmarks/tasks.py --quick               # a dry run on tiny sizes (< 2 min)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def options():
    p = c.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--lengths", default="2048,4096", help="context lengths (prompt + answer tokens)")
    p.add_argument("--keep-ratios", default="0.5,0.25")
    p.add_argument("--subtasks", default=None, help="RULER subtasks (default: all 11 generated ones)")
    p.add_argument("--samples", type=int, default=1, help="samples per subtask x length")
    p.add_argument("--answer-tokens", type=int, default=None, help="new tokens per answer (default: RULER's)")
    p.add_argument("--protocol", default="context", choices=("context", "query-aware", "paper"))
    p.add_argument("--skip-layers", default="0")
    p.add_argument("--presses", default=None,
                   help="comma-separated presses (default: every registered press; 'none': the full cache only, "
                        "to see first which subtasks the model can do at all); to fit a time budget")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up (one generation per configuration on the longest prompt): "
                        "accuracy does not depend on it, only the timings this script does not report")
    p.add_argument("--full-answers", action="store_true",
                   help="generate every answer to its full length; by default an answer stops at its first EOS, "
                        "which is where its score stops reading (same scores, often half the decode time)")
    p.add_argument("--db", default=None, help="keep the runs in this SQLite file (default: a temporary one)")
    p.add_argument("--report-only", action="store_true",
                   help="print the tables of the last run in --db (e.g. an interrupted one) without running anything; "
                        "--db a.db,b.db merges the last runs of several files")
    args = p.parse_args()
    if args.report_only and not args.db:
        p.error("--report-only needs --db")
    if args.quick:
        args.lengths, args.subtasks, args.keep_ratios, args.answer_tokens = "1024", "niah_single_1,fwe", "0.5", 8
    return args


def wilson(scores: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a mean of scores in [0, 1] (partial scores count as fractions)."""
    n = len(scores)
    if n == 0:
        return 0.0, 1.0
    p = sum(scores) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(scores: list[float]) -> str:
    if not scores:
        return "-"
    lo, hi = wilson(scores)
    return f"{100 * statistics.fmean(scores):.0f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def run(args, presses: list[str]) -> tuple[list, object]:
    from knormctl.config import RunConfig
    from knormctl.options import parse_float_list, parse_int_list
    from knormctl.runner import Runner
    from knormctl.store import open_store

    cfg = RunConfig(
        command="sweep" if presses else "baseline",  # baseline: the full cache only (ignores presses)
        task="ruler", model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
        seed=args.seed, haystack=args.text, presses=presses or ["knorm"],
        keep_ratios=parse_float_list(args.keep_ratios, "--keep-ratios"),
        prune_after=0, skip_layers=parse_int_list(args.skip_layers, "--skip-layers", allow_empty=True),
        compress_mode="prefill", protocol=args.protocol, context_lengths=parse_int_list(args.lengths, "--lengths"),
        subtasks=args.subtasks.split(",") if args.subtasks else None, samples_per_task=args.samples,
        answer_tokens=args.answer_tokens, warmup=not args.no_warmup,
        stop_at_eos=not args.full_answers).validate()
    db = args.db or str(Path(tempfile.mkdtemp(prefix="knormctl-tasks-")) / "tasks.db")
    store = open_store(db)
    started = time.perf_counter()

    def on_cell(done: int, total: int, desc: str) -> None:
        spent = time.perf_counter() - started
        if done % 5 == 0 or done == total:
            c.log(f"{done}/{total} cells, {spent / 60:.1f} min, ~{spent / done * (total - done) / 60:.1f} min left ({desc})")

    r = Runner(cfg, store, progress=c.log, on_cell=on_cell)
    r.prepare()
    c.log(f"{len(r.samples)} samples x {len(r.configs)} configurations = {len(r.cells)} cells; results in {db}")
    outcome = r.run()
    c.log(f"run {outcome.run_id}: {outcome.status}, {outcome.done} cells in {(time.perf_counter() - started) / 60:.1f} min")
    return store.samples(outcome.run_id), cfg


EOS_NOTE = {True: " (stopped at the first EOS)",
            None: " (stopped at the first EOS in some runs: the score reads an answer only up to there either way)"}


def report(rows, cfg) -> None:
    from knormctl.render.tasks import accuracy_interval
    from knormctl.tasks.catalog import NEAR_CHANCE_MARGIN, chance_of, near_chance

    ok = [s for s in rows if s.error is None and s.score is not None]
    label = {s.config_key: ("full cache" if s.press == "none" else f"{s.press} {s.keep_ratio:g}") for s in ok}
    order = sorted(label, key=lambda k: (k != "none", label[k].split()[0], -float(label[k].split()[-1])
                                         if k != "none" else 0))
    names = [n for n in cfg.subtasks if any(s.subtask == n for s in ok)]
    failed = [s for s in rows if s.error is not None]
    for length in cfg.context_lengths:
        by = defaultdict(list)
        chance = defaultdict(list)
        for s in ok:
            if s.context_length == length:
                by[(s.config_key, s.subtask)].append(s.score)
                if s.config_key == "none":
                    chance[s.subtask].append(s)
        keys = [k for k in order if any(by[(k, n)] for n in names)]
        # the mean over the subtasks every row has, so rows compare (runs split by press may
        # measure the presses only where the full cache can do the task)
        common = [n for n in names if all(by[(k, n)] for k in keys)]
        table_rows = []
        for key in keys:
            scores = [by[(key, n)] for n in names]
            table_rows.append([label[key]] + [cell(x) for x in scores]
                              + [cell([v for n in common for v in by[(key, n)]])])
        mean_note = []
        if common != names:
            every = [v for n in names for v in by[("none", n)]]
            mean_note = [f"mean: over the subtasks every row has ({', '.join(common) or 'none'}); "
                         f"the full cache over all {len(names)}: {cell(every)}"]
        lost = []
        for n in names:
            full = by[("none", n)]
            ch = chance_of(chance[n])  # the report's rule (knormctl/tasks/catalog.py), with its interval
            if full and near_chance(statistics.fmean(full), ch, accuracy_interval(full, seed=0)[0]):
                lost.append(f"{n} (full cache {100 * statistics.fmean(full):.0f}, chance {100 * ch:.0f})")
        n_samples = cfg.samples_per_task
        c.table(f"RULER accuracy (%) at {length} tokens, [95% Wilson interval], {n_samples} sample(s) per cell "
                "(- : not run)",
                ["configuration"] + names + ["mean"], table_rows,
                notes=[f"protocol {cfg.protocol}, prefill mode (the context cut once to keep_ratio x its length), "
                       f"skip_layers {cfg.skip_layers or 'none'}, answers "
                       f"{cfg.answer_tokens or 'RULER defaults'} tokens"
                       f"{EOS_NOTE.get(cfg.stop_at_eos, '')}, haystack {cfg.haystack_source}",
                       "near chance with the FULL cache (within "
                       f"{100 * NEAR_CHANCE_MARGIN:.0f} points, or an interval down to chance; compression "
                       "results mean nothing there): "
                       + (", ".join(lost) or "none")] + mean_note)
    if failed:
        print(f"{len(failed)} cell(s) failed, e.g. {failed[0].error}")


def report_only(dbs: str) -> None:
    """Print the last run of each file in ``dbs`` (comma-separated) as one table: runs of the
    same subtasks split by press (to fit a time budget) merge; a cell measured in two runs
    (the full cache, which every run measures) counts once, and must have scored the same
    (greedy decoding on the same prompt)."""
    from knormctl.config import RunConfig
    from knormctl.store import open_store

    rows, cfgs, seen = [], [], {}
    for db in dbs.split(","):
        store = open_store(db, migrate=False)
        run = store.last_run()
        print(f"{db}: run {run.id} ({run.status}): {run.samples_done} of {run.samples_planned} cells, started "
              f"{run.started_utc:%Y-%m-%d %H:%M} UTC, {run.command_line}")
        cfgs.append(RunConfig.from_dict(run.config_json))
        for s in store.samples(run.id):
            key = (s.text_hash, s.config_key)
            if key in seen:
                if seen[key].score != s.score:
                    print(f"  note: {s.subtask} at {s.context_length} under {s.config_key} scored "
                          f"{seen[key].score} and {s.score} in two runs; the first is kept")
                continue
            seen[key] = s
            rows.append(s)
    print()
    cfg = cfgs[0]
    if len(cfgs) > 1:
        for other in cfgs[1:]:
            if (other.protocol, other.seed, other.haystack_source, other.samples_per_task) != \
                    (cfg.protocol, cfg.seed, cfg.haystack_source, cfg.samples_per_task):
                raise SystemExit("--report-only: these runs differ in protocol, seed, haystack or samples per task")
        cfg.subtasks = list(dict.fromkeys(n for c_ in cfgs for n in c_.subtasks))
        cfg.context_lengths = sorted({n for c_ in cfgs for n in c_.context_lengths})
        if len({c_.stop_at_eos for c_ in cfgs}) > 1:
            cfg.stop_at_eos = None
    report(rows, cfg)


def main() -> None:
    args = options()
    if args.report_only:
        report_only(args.db)
        return
    c.setup(args)
    from knormctl.engine.presses import press_names

    registered = [p for p in press_names() if p != "none"]  # whatever the registry holds
    presses = registered if not args.presses else [] if args.presses == "none" else args.presses.split(",")
    unknown = sorted(set(presses) - set(registered))
    if unknown:
        raise SystemExit(f"--presses: unknown {', '.join(unknown)}; registered: {', '.join(registered)}")
    cut = [p for p in registered if p not in presses]
    c.header("RULER accuracy under compression", args, {"presses": ", ".join(presses),
                                                        "registered presses not run": ", ".join(cut) or "none",
                                                        "lengths": args.lengths, "keep ratios": args.keep_ratios})
    rows, cfg = run(args, presses)
    report(rows, cfg)


if __name__ == "__main__":
    main()
