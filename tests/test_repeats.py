"""The runner's warm-up (every planned configuration) and ``--repeats`` rounds (samples.repeat)."""

from __future__ import annotations

import json
import sqlite3

from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig
from knormctl.plan import WARMUP_TOKENS, plan_cells

runner = CliRunner()


def _args(model_dir, books_dir, db, *extra):
    return ["--model", str(model_dir), "--wikitext-source", f"text:{books_dir}", "--pg19-source",
            f"text:{books_dir}", "--num-wikitext-samples", "1", "--num-pg19-samples", "1",
            "--wikitext-prompt-tokens", "40", "--max-prompt-tokens", "72", "--max-new-tokens", "5",
            "--eval-tokens", "6", "--threads", "1", "--db", str(db), *extra]


def _spy_generations(monkeypatch) -> list[tuple[int, str, int]]:
    """(prompt length, configuration key, tokens) of every generation from now on, in order."""
    import knormctl.engine.loop as loop

    calls = []
    real = loop.run_generation

    def spy(model, ids, cfg, n, **kw):
        calls.append((len(ids), cfg.key, n))
        return real(model, ids, cfg, n, **kw)

    monkeypatch.setattr(loop, "run_generation", spy)
    return calls


def test_rounds_rotate_configurations_per_sample_and_per_round():
    a, b, c = (PressConfig(press="knorm", keep_ratio=k) for k in (1.0, 0.9, 0.8))
    cells = plan_cells(2, [a, b, c], None, repeats=2)
    assert [(x.repeat, x.sample_index) for x in cells] == [(r, i) for r in range(2) for i in range(2) for _ in range(3)]
    firsts = [cells[k].config for k in (0, 3, 6, 9)]  # (round, sample) = (0,0), (0,1), (1,0), (1,1)
    assert firsts == [a, b, b, c]
    assert plan_cells(2, [a, b, c], None) == cells[:6]


def test_warm_up_runs_every_planned_configuration_on_the_longest_prompt(tiny_llama_dir, books_dir, tmp_path,
                                                                         monkeypatch):
    calls = _spy_generations(monkeypatch)
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.9,0.5", "--prune-after", "8", "--json",
                              *_args(tiny_llama_dir, books_dir, tmp_path / "r.db", "--max-new-tokens", "20")])
    assert res.exit_code == 0, res.output
    keys = {"none", "knorm|kr=0.9|pa=8|skip=0|decode", "knorm|kr=0.5|pa=8|skip=0|decode"}
    warm, timed = calls[:3], calls[3:]
    assert {k for _, k, _ in warm} == keys and warm[0][1] == "none"
    assert all(length == 72 for length, _, _ in warm)  # the longest prompt
    assert [n for _, _, n in warm] == [20, WARMUP_TOKENS, WARMUP_TOKENS]  # the full cache for all 20 tokens
    assert len(timed) == 2 * 3 and all(n == 20 for _, _, n in timed)


def test_repeats_store_one_row_per_round_and_resume_fills_missing_rounds(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "8", "--repeats", "2", "--json",
                              "--no-warmup", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)
    rows = con.execute("SELECT sample_index, config_key, repeat, tpot_s, ppl_compressed, eval_tokens, token_match "
                       "FROM samples WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
    assert sorted((i, k, r) for i, k, r, *_ in rows) == sorted(
        (i, k, r) for i in range(2) for k in ("none", "knorm|kr=0.5|pa=8|skip=0|decode") for r in range(2))
    assert [r for _, _, r, *_ in rows] == [0] * 4 + [1] * 4  # round 0 of every cell first
    for i, k, r, tpot, ppl, n_eval, match in rows:
        assert tpot > 0 and match is not None
        assert (ppl is not None and n_eval == 6) if r == 0 else (ppl is None and n_eval == 0)
    # lose round 1 of sample 1 and resume: exactly those cells are measured again
    con.execute("DELETE FROM samples WHERE run_id=? AND repeat=1 AND sample_index=1", (run_id,))
    con.execute("UPDATE runs SET status='interrupted' WHERE id=?", (run_id,))
    con.commit()
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["measured"], out["done"], out["planned"]) == (2, 8, 8)  # the two lost cells, of all 8
    again = con.execute("SELECT sample_index, config_key, repeat FROM samples WHERE run_id=?", (run_id,)).fetchall()
    assert len(again) == 8 and len(set(again)) == 8


def test_a_resumed_run_warms_up_only_the_configurations_it_has_left(tiny_llama_dir, books_dir, tmp_path,
                                                                    monkeypatch):
    """A resume measures a few cells: warming every planned configuration up again on the
    longest prompt would cost more than the cells themselves (a quarter of the example study's
    bfloat16 run on an AVX2 CPU). It warms up what it will time, on the shapes it will run."""
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.9,0.5", "--prune-after", "8", "--json",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)
    lengths = dict(con.execute("SELECT sample_index, prompt_tokens FROM samples WHERE config_key='none'"))
    short = min(lengths, key=lengths.get)
    assert lengths[short] < max(lengths.values())
    lost = "knorm|kr=0.5|pa=8|skip=0|decode"
    con.execute("DELETE FROM samples WHERE run_id=? AND sample_index=? AND config_key=?", (run_id, short, lost))
    con.execute("UPDATE runs SET status='interrupted' WHERE id=?", (run_id,))
    con.commit()

    calls = _spy_generations(monkeypatch)
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["measured"] == 1
    # one warm-up (the lost configuration, on the short prompt it has left), then the one cell
    assert calls == [(lengths[short], lost, min(WARMUP_TOKENS, 5)), (lengths[short], lost, 5)]

    con.execute("UPDATE runs SET status='interrupted' WHERE id=?", (run_id,))
    con.commit()
    calls.clear()
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert calls == [] and "warm-up" not in res.stderr  # nothing left: nothing warmed up
