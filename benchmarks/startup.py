"""Start-up (issue 6 target 5): `knormctl --help` wall time and whether torch is imported on that path.

    knormctl --help (python -m knormctl --help), median of 7 fresh processes   target <= 0.5 s
    torch / transformers imported on the --help path                          target: no
The interpreter's own start (`python -c pass`) is timed alongside as the floor.
`knormctl report --last` on a large database is timed by benchmarks/report_speed.py (issue 4).

    python benchmarks/startup.py
    python benchmarks/startup.py --quick
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as c

HEAVY = ("torch", "transformers", "sqlalchemy", "alembic", "matplotlib", "rich")

# Run the CLI's --help in-process, then report which heavy modules got imported on the way.
PROBE = f"""
import sys
try:
    from knormctl.cli import app
    app(["--help"], prog_name="knormctl")
except SystemExit:
    pass
print(",".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=c.REPO, timeout=120)
    return time.perf_counter() - t0, proc


def slowest_imports(env: dict, top: int) -> list[list]:
    """`python -X importtime -m knormctl --help`: the top-level imports by cumulative time."""
    _, proc = run([sys.executable, "-X", "importtime", "-m", "knormctl", "--help"], env)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].removeprefix(" ")  # one separator space; more means a nested import
        if not name.startswith(" "):  # imports made directly by the entry point
            rows.append((int(parts[1]), name))
    return [[name, c.ms(us / 1e6, 1)] for us, name in sorted(rows, reverse=True)[:top]]


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=7)
    args = p.parse_args()
    if args.quick:
        args.repeats = 3
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(c.REPO), os.environ.get("PYTHONPATH")]))}
    c.header("start-up", args, {"repeats": f"{args.repeats} fresh processes each, interleaved, + 1 warm-up "
                                             "(file cache)"})

    cmds = {"python -c pass (floor)": [sys.executable, "-c", "pass"],
            "python -m knormctl --help": [sys.executable, "-m", "knormctl", "--help"]}
    script = shutil.which("knormctl", path=str(Path(sys.executable).parent)) or shutil.which("knormctl")
    if script:
        cmds["knormctl --help (console script)"] = [script, "--help"]

    failures = {}

    def timed_cmd(name, cmd):
        def go():
            secs, proc = run(cmd, env)
            if proc.returncode != 0:
                failures[name] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return secs
        return go

    times = c.interleaved({k: timed_cmd(k, v) for k, v in cmds.items()}, args.repeats)
    rows = []
    for name, ts in times.items():
        med = c.median(ts)
        target = "-" if "floor" in name else c.verdict(med, 0.5)
        rows.append([name, c.num(med, 3), f"{min(ts):.3f}-{max(ts):.3f}", "FAILED" if name in failures else "ok",
                     target])
    c.table("wall time, seconds (median of fresh processes)", ["command", "median s", "min-max", "exit", "target"],
            rows, notes=[f"{k} failed: {v[0]}" for k, v in failures.items()]
            + ([] if script else ["knormctl console script not found on PATH (package not installed?)"]))

    _, probe = run([sys.executable, "-c", PROBE], env)
    if probe.returncode != 0:
        c.table("heavy imports on the --help path", ["probe", "result"],
                [["knormctl.cli app(['--help'])", "FAILED: " + (probe.stderr.strip().splitlines() or ["?"])[-1]]],
                notes=["the CLI may not be wired up yet"])
    else:
        loaded = [m for m in probe.stdout.strip().splitlines()[-1].split(",") if m] if probe.stdout.strip() else []
        c.table("heavy imports on the --help path", ["module", "imported", "target"],
                [[m, "YES" if m in loaded else "no", "no" if m in ("torch", "transformers") else "-"] for m in HEAVY])

    rows = slowest_imports(env, 8)
    if rows:
        c.table("where --help spends its import time (python -X importtime, cumulative)", ["package", "ms"], rows)


if __name__ == "__main__":
    main()
