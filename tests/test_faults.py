"""Real processes, real signals: nothing finished is lost, and resume finishes the rest."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys

import pytest
from sweep_process import REPO, count as _count, process_env as _env, start_and_wait as _start_and_wait



def _cmd(model_dir, books_dir, db, *extra):
    return [sys.executable, "-m", "knormctl", "sweep", "--model", str(model_dir),
            "--wikitext-source", f"text:{books_dir}", "--pg19-source", f"text:{books_dir}",
            "--num-wikitext-samples", "8", "--num-pg19-samples", "0", "--wikitext-prompt-tokens", "256",
            "--max-new-tokens", "60", "--eval-tokens", "16", "--keep-ratios", "0.9,0.5", "--prune-after", "64",
            "--threads", "1", "--db", str(db), *extra]




@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_keeps_finished_samples_and_resumes(tiny_llama_dir, books_dir, tmp_path, sig):
    db = tmp_path / "r.db"
    env = _env(tmp_path)
    proc = _start_and_wait(_cmd(tiny_llama_dir, books_dir, db), env, db, at_least=3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err  # 128 + the signal, as a shell reports it
    assert "Traceback" not in err
    kept = _count(db)
    assert kept >= 3
    status, done, error = sqlite3.connect(db).execute("SELECT status, samples_done, error FROM runs").fetchone()
    assert status == "interrupted" and done == kept
    assert error == ("stopped by Ctrl-C (SIGINT)" if sig == signal.SIGINT else "stopped by SIGTERM")
    assert f"keeps {kept} finished cell" in err and "--resume 1" in err
    before = sqlite3.connect(db).execute("SELECT id, config_key, sample_index, ttft_s FROM samples").fetchall()

    res = subprocess.run([sys.executable, "-m", "knormctl", "sweep", "--resume", "1", "--db", str(db), "--json"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["status"] == "complete"
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (8 * 3,)
    assert con.execute("SELECT count(*) FROM (SELECT DISTINCT sample_index, config_key FROM samples)").fetchone() == (24,)
    after = {r[0]: r for r in con.execute("SELECT id, config_key, sample_index, ttft_s FROM samples")}
    for row in before:  # finished cells are neither duplicated nor changed
        assert after[row[0]] == row
    assert con.execute("SELECT status, samples_done FROM runs").fetchone() == ("complete", 24)
    assert con.execute("SELECT count(*) FROM samples WHERE token_match IS NULL").fetchone() == (0,)


def test_sigterm_outside_a_cell_exits_143_too(tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    """SIGTERM while the summary prints (or the plan, or between a study's runs) escaped to Typer,
    which answers every interruption with 130; the code says which signal stopped it wherever
    it lands, and a later Ctrl-C in the same process is 130 again."""
    import os

    from typer.testing import CliRunner

    from knormctl.cli import _execute, app

    monkeypatch.setattr(_execute, "_print_summary", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    args = _cmd(tiny_llama_dir, books_dir, tmp_path / "r.db")[3:]  # after "python -m knormctl"
    args[args.index("--num-wikitext-samples") + 1] = "1"
    args[args.index("--max-new-tokens") + 1] = "4"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 143, res.output
    monkeypatch.setattr(_execute, "_print_summary", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert CliRunner().invoke(app, args).exit_code == 130


def test_sigkill_leaves_a_consistent_db_and_the_run_shows_interrupted(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    env = _env(tmp_path)
    proc = _start_and_wait(_cmd(tiny_llama_dir, books_dir, db), env, db, at_least=2)
    proc.kill()
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT status FROM runs").fetchone() == ("running",)
    con.close()
    res = subprocess.run([sys.executable, "-m", "knormctl", "report", "--list", "--db", str(db), "--format", "json"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["status"] == "interrupted"


def test_four_processes_sweep_into_one_sqlite_file(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "shared.db"
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "knormctl", "sweep", "--model", str(tiny_llama_dir),
           "--wikitext-source", f"text:{books_dir}", "--num-wikitext-samples", "4", "--num-pg19-samples", "0",
           "--wikitext-prompt-tokens", "48", "--max-new-tokens", "4", "--eval-tokens", "4",
           "--keep-ratios", "0.5", "--prune-after", "8", "--threads", "1", "--no-warmup", "--db", str(db)]
    procs = [subprocess.Popen(cmd + ["--seed", str(k)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "locked" not in err
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM runs WHERE status='complete'").fetchone() == (4,)
    assert con.execute("SELECT run_id, count(*) FROM samples GROUP BY run_id").fetchall() == [
        (1, 8), (2, 8), (3, 8), (4, 8)]
