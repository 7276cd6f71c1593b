"""Running knormctl in a real process for the interruption tests: its environment, the
samples it has stored so far, and starting it then waiting until it has stored some."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def count(db, sql="SELECT count(*) FROM samples", args=()):
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            return con.execute(sql, args).fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0  # not created yet


def process_env(tmp_path):
    env = dict(os.environ, KNORMCTL_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    env.pop("KNORMCTL_DB", None)
    return env


def start_and_wait(cmd, env, db, at_least, timeout=120):
    """Start ``python -m knormctl ...`` and return once it has stored ``at_least`` samples; the
    process then holds there (tests/held_sweep.py) until the test signals or kills it, so a
    loaded machine cannot let it finish first."""
    if cmd[1:3] == ["-m", "knormctl"]:
        cmd = [cmd[0], str(REPO / "tests" / "held_sweep.py"), *cmd[3:]]
        env = dict(env, KNORMCTL_TEST_HOLD_AT=str(at_least))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while count(db) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"sweep ended before it could be interrupted: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("sweep produced no samples in time")
        time.sleep(0.05)
    return proc
