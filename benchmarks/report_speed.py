"""How fast `knormctl report` starts and answers on a big results database (issue 4).

Builds a SQLite store with 100 runs x 100 samples = 10,000 sample rows (blobs included:
per-step latencies and generated ids, as a real sweep stores them), then times, as
separate processes, interleaved (A B A B ...):
    knormctl --help            the floor: Python + typer + the CLI modules
    knormctl report --last     target < 1 s
    knormctl report --last --format json
    knormctl report --list
and prints the medians and the median round-by-round ratio to --help.

    python benchmarks/report_speed.py
    python benchmarks/report_speed.py --quick      # 10 runs x 100 samples, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import _common as c

TARGET_S = 1.0


def build_db(path: Path, runs: int, per_run: int, seed: int = 0) -> None:
    """Runs through the Store API (as a sweep would), samples by one Core bulk insert per run."""
    from sqlalchemy import insert

    from knormctl.config import PressConfig
    from knormctl.store import open_store, utcnow
    from knormctl.store.models import Sample

    rng = random.Random(seed)
    configs = [PressConfig()] + [PressConfig(press=p, keep_ratio=kr).validate()
                                 for p in ("knorm", "random") for kr in (1.0, 0.9, 0.7, 0.5)]
    with open_store(path) as store:
        for r in range(runs):
            run_id = store.create_run(command="sweep", task="lm", model_requested="smollm2-135m",
                                      config={"num_wikitext_samples": 6, "num_pg19_samples": 5},
                                      command_line="knormctl sweep", samples_planned=per_run,
                                      env={"cpu_model": "bench", "torch_threads": 2}, dtype="float32", device="cpu")
            rows = []
            for k in range(per_run):
                pc = configs[k % len(configs)]
                steps = [rng.uniform(0.02, 0.04) for _ in range(99)]
                rows.append(dict(
                    run_id=run_id, created_utc=utcnow() + timedelta(seconds=k), task="lm",
                    sample_index=k // len(configs), config_key=pc.key, dataset="wiki-lite" if k % 2 else "pg19",
                    prompt_tokens=1024, press=pc.press, keep_ratio=pc.keep_ratio, prune_after=pc.prune_after,
                    skip_layers="0", compress_mode=pc.mode, keep_recent=0, new_tokens=100,
                    ttft_s=rng.uniform(0.1, 0.2), tpot_s=sum(steps) / len(steps), itl_p50_s=0.03, itl_p90_s=0.035,
                    itl_p99_s=0.04, throughput_tps=rng.uniform(25, 35), total_s=3.2, peak_mem_bytes=None,
                    peak_mem_kind="n/a", peak_mem_reason="not measurable on this CPU",
                    kv_bytes_peak=40_000_000, kv_bytes_final=int(40_000_000 * pc.keep_ratio),
                    compress_events=0 if pc.press == "none" else 100, compress_time_s=0.01,
                    ppl_context=12.0, ppl_compressed=12.0 / pc.keep_ratio, eval_tokens=128,
                    token_match=pc.keep_ratio, generated_text="x" * 400,
                    generated_ids_json=[rng.randrange(50_000) for _ in range(100)], step_latencies_json=steps))
            with store.engine.begin() as conn:
                conn.execute(insert(Sample), rows)
            store.finish_run(run_id, "complete")


def command(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "knormctl", *args] + (["--db", str(db)] if args and args[0] == "report" else [])


def run_cli(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, env=env, cwd=c.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 runs, 2 rounds: proves the script works")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--samples-per-run", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.runs, args.repeats = 10, 2

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(c.REPO), os.environ.get("PYTHONPATH")])))
    env.pop("KNORMCTL_DB", None)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "big.db"
        t0 = time.perf_counter()
        build_db(db, args.runs, args.samples_per_run)
        c.log(f"built {db.name}: {args.runs} runs x {args.samples_per_run} samples in "
              f"{time.perf_counter() - t0:.1f} s ({db.stat().st_size / 2**20:.1f} MiB)")
        configs = {
            "knormctl --help": command(db, "--help"),
            "report --last": command(db, "report", "--last"),
            "report --last --format json": command(db, "report", "--last", "--format", "json"),
            "report --list": command(db, "report", "--list"),
        }
        times = c.interleaved({name: c.timed(lambda cmd=cmd: run_cli(cmd, env)) for name, cmd in configs.items()},
                              repeats=args.repeats, warmup=1)

    help_times = times["knormctl --help"]
    rows = []
    for name, ts in times.items():
        ratios = c.paired_ratios(ts, help_times)
        rows.append([name, f"{c.median(ts):.3f}", f"{c.median(ratios):.2f}", c.spread(ratios),
                     c.verdict(c.median(ts), TARGET_S) if name.startswith("report --last") else ""])
    c.table(f"report speed: {args.runs} runs, {args.runs * args.samples_per_run} samples, "
            f"median of {args.repeats} interleaved rounds (one process each)",
            ["command", "seconds", "x --help", "ratio range", f"target < {TARGET_S:g} s"], rows,
            notes=["x --help: median of round-by-round ratios to `knormctl --help` (Python start + CLI import)."])


if __name__ == "__main__":
    main()
