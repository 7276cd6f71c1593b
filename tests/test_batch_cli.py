"""`--batch-size B` on sweep and baseline (issue 16 item 3): samples of equal prompt length run
together, each stored as its own row with samples.batch_size; resume re-runs a batch with a
missing row without storing its other rows twice."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig
from knormctl.plan import Cell, plan_batches, plan_cells

runner = CliRunner()
KEY = "knorm|kr=0.5|pa=8|skip=0|decode"


def _args(model_dir, books_dir, db, *extra):
    # 3 short samples of 40 tokens (batch together) and 1 long one of 72 (a batch of its own)
    return ["--model", str(model_dir), "--wikitext-source", f"text:{books_dir}", "--pg19-source",
            f"text:{books_dir}", "--num-wikitext-samples", "3", "--num-pg19-samples", "1",
            "--wikitext-prompt-tokens", "40", "--max-prompt-tokens", "72", "--max-new-tokens", "6",
            "--eval-tokens", "6", "--threads", "1", "--no-warmup", "--db", str(db), *extra]


def _rows(con, run_id):
    return {(i, k): (json.loads(ids), b, tpot) for i, k, ids, b, tpot in con.execute(
        "SELECT sample_index, config_key, generated_ids_json, batch_size, tpot_s FROM samples "
        "WHERE run_id=? AND error IS NULL", (run_id,))}


def test_batched_sweep_stores_per_row_samples_equal_to_batch_one(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    runs = {}
    for b in (1, 2):
        res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "8", "--json",
                                  "--batch-size", str(b), *_args(tiny_llama_dir, books_dir, db)])
        assert res.exit_code == 0, res.output
        runs[b] = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)
    one, two = _rows(con, runs[1]), _rows(con, runs[2])
    assert set(one) == set(two) and len(two) == 4 * 2
    for cell, (ids, b, _) in two.items():
        assert ids == one[cell][0], cell  # the same greedy tokens, batched or not
        # samples 0 and 1 ran together; sample 2 (the third 40-token one) and 3 (72 tokens) alone
        assert b == (2 if cell[0] in (0, 1) else 1)
        assert one[cell][1] == 1
    assert len({tuple(ids) for (i, k), (ids, _, _) in two.items() if k == KEY}) > 1  # rows differ
    # a batch's rows share its timing
    assert two[(0, KEY)][2] == two[(1, KEY)][2]
    cfg = json.loads(con.execute("SELECT config_json FROM runs WHERE id=?", (runs[2],)).fetchone()[0])
    assert cfg["batch_size"] == 2
    report = runner.invoke(app, ["report", "--run-id", str(runs[2]), "--db", str(db)])
    assert report.exit_code == 0 and "batch 2" in report.stdout, report.stdout


def test_baseline_takes_batch_size(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["baseline", "--batch-size", "3", "--json", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    assert sorted(b for (b,) in con.execute("SELECT batch_size FROM samples")) == [1, 3, 3, 3]


def test_batches_smaller_than_asked_are_said_and_the_report_shows_those_that_ran(tiny_llama_dir, books_dir,
                                                                                tmp_path):
    """A shard whose prompts cannot batch (here one 40-token and one 72-token prompt) ran
    batches of 1, and its report's header said 'batch 2 (throughput per row; x2 per batch)'."""
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "8", "--json", "--shard", "2/2",
                              "--batch-size", "2", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    assert ("--batch-size 2: batches of at most 1 row(s) here (only prompts of equal length batch together; "
            "2 samples in this run)") in " ".join(res.stderr.split())
    run = json.loads(res.stdout)["run_id"]
    header = json.loads(runner.invoke(app, ["report", "--run-id", str(run), "--db", str(db), "--format",
                                            "json"]).stdout)["header"]
    assert header["batch_size"] == 1
    assert "batch" not in runner.invoke(app, ["report", "--run-id", str(run), "--db", str(db)]).stdout.split(
        "Each cell")[0]
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "8", "--json", "--batch-size", "4",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0 and "batches of at most 3 row(s) here" in " ".join(res.stderr.split()), res.output
    header = json.loads(runner.invoke(app, ["report", "--run-id", str(json.loads(res.stdout)["run_id"]), "--db",
                                            str(db), "--format", "json"]).stdout)["header"]
    assert header["batch_size"] == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_batch_sizes_exit_2_with_one_line(tiny_llama_dir, books_dir, tmp_path, value):
    res = runner.invoke(app, ["sweep", "--batch-size", value, *_args(tiny_llama_dir, books_dir, tmp_path / "r.db")])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--batch-size" in lines[0], res.stderr
    assert not (tmp_path / "r.db").exists() or sqlite3.connect(tmp_path / "r.db").execute(
        "SELECT count(*) FROM runs").fetchone() == (0,)


def test_resume_reruns_a_batch_with_a_missing_row_and_stores_only_that_row(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "8", "--json", "--batch-size", "2",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)
    before = _rows(con, run_id)
    # as if interrupted inside the batch of samples 0 and 1 under knorm: row 1 lost, row 0 stored
    with con:
        con.execute("DELETE FROM samples WHERE run_id=? AND sample_index=1 AND config_key=?", (run_id, KEY))
        con.execute("UPDATE runs SET status='interrupted', samples_done=samples_done-1 WHERE id=?", (run_id,))
        # and as if stopped between storing sample 3's cell and its token match: resume fills it in
        con.execute("UPDATE samples SET token_match=NULL WHERE run_id=? AND sample_index=3", (run_id,))
    kept_id = con.execute("SELECT id FROM samples WHERE run_id=? AND sample_index=0 AND config_key=?",
                          (run_id, KEY)).fetchone()
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["measured"], out["done"], out["planned"], out["status"]) == (1, 8, 8, "complete")
    cells = con.execute("SELECT sample_index, config_key FROM samples WHERE run_id=?", (run_id,)).fetchall()
    assert len(cells) == len(set(cells)) == 8  # no row stored twice
    assert con.execute("SELECT id FROM samples WHERE run_id=? AND sample_index=0 AND config_key=?",
                       (run_id, KEY)).fetchone() == kept_id  # the stored row was kept, not replaced
    after = _rows(con, run_id)
    assert con.execute("SELECT count(*) FROM samples WHERE token_match IS NULL").fetchone() == (0,)
    assert after[(1, KEY)][0] == before[(1, KEY)][0] and after[(1, KEY)][1] == 2


def test_plan_batches_groups_equal_shapes_and_rotates_configurations():
    configs = [PressConfig().validate(), PressConfig(press="knorm", keep_ratio=0.5).validate()]
    cells = plan_cells(5, configs, repeats=2)
    shape = {0: (40,), 1: (72,), 2: (40,), 3: (40,), 4: (72,)}
    batches = plan_batches(cells, 2, shape.__getitem__)
    rows = [tuple(c.sample_index for c in b) for b in batches]
    assert rows == [(0, 2)] * 2 + [(3,)] * 2 + [(1, 4)] * 2 + [(0, 2)] * 2 + [(3,)] * 2 + [(1, 4)] * 2
    for b in batches:
        assert len({c.config.key for c in b}) == 1 and len({c.repeat for c in b}) == 1
    # every cell once, and the first configuration changes from batch to batch
    assert sorted((c.sample_index, c.config.key, c.repeat) for b in batches for c in b) == \
        sorted((c.sample_index, c.config.key, c.repeat) for c in cells)
    assert batches[0][0].config.key != batches[2][0].config.key
    assert plan_batches(cells, 1, shape.__getitem__) == [[c] for c in cells]
    assert all(isinstance(c, Cell) for b in batches for c in b)
