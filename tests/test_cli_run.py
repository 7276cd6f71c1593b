"""`knormctl baseline` and `sweep` end to end on a tiny model folder, through the real CLI."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from knormctl.cli import app

runner = CliRunner()


def _args(model_dir, books_dir, db, *extra):
    return ["--model", str(model_dir), "--wikitext-source", f"text:{books_dir}", "--pg19-source",
            f"text:{books_dir}", "--num-wikitext-samples", "2", "--num-pg19-samples", "1",
            "--wikitext-prompt-tokens", "64", "--max-prompt-tokens", "96", "--max-new-tokens", "6",
            "--eval-tokens", "8", "--threads", "1", "--db", str(db), *extra]


@pytest.fixture(params=["tiny_llama_dir", "tiny_neox_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_sweep_stores_every_cell_with_env(model_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "1.0,0.5", "--prune-after", "16", "--skip-layers", "0",
                              "--json", *_args(model_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    run_id = out["run_id"]
    assert out["status"] == "complete" and out["done"] == 3 * 3
    con = sqlite3.connect(db)
    rows = con.execute("SELECT config_key, sample_index, ttft_s, tpot_s, kv_bytes_peak, kv_bytes_final, "
                       "compress_events, ppl_context, ppl_compressed, token_match, step_latencies_json, "
                       "generated_ids_json, dataset, text_hash FROM samples WHERE run_id=?", (run_id,)).fetchall()
    assert len(rows) == 9  # 3 samples x (none, knorm 1.0, knorm 0.5)
    by_key = {}
    for r in rows:
        by_key.setdefault(r[0], []).append(r)
        assert r[2] > 0 and r[3] > 0 and r[7] > 1 and r[8] > 1 and r[12].startswith("text:")
        assert len(json.loads(r[10])) == 5 and len(json.loads(r[11])) == 6
    assert set(by_key) == {"none", "knorm|kr=1|pa=16|skip=0|decode", "knorm|kr=0.5|pa=16|skip=0|decode"}
    for r in by_key["knorm|kr=1|pa=16|skip=0|decode"]:
        assert r[6] == 0 and r[9] == 1.0  # nothing evicted: same output as the full cache
    for r in by_key["knorm|kr=0.5|pa=16|skip=0|decode"]:
        assert r[6] > 0 and r[5] < r[4]
    # ppl_context is a property of the sample, identical across configurations
    for i in range(3):
        assert len({r[7] for r in rows if r[1] == i}) == 1
    # stderr is not a terminal here (as in a CI log): the progress comes as plain timestamped lines
    log = res.stderr.splitlines()
    assert all(re.fullmatch(r"\[\d\d:\d\d:\d\d\] \S.*", line) for line in log), log
    assert any(line.endswith("plan: 9 cells = 3 samples x 3 configurations (full cache; knorm keep 1, 0.5); "
                             "6 new tokens + 8 scored tokens per cell") for line in log)
    assert any(re.search(r"estimate: ~\d.* for 9 cells \(warm-up speed: prefill .* ms/token, decode", line)
               for line in log)
    assert any(re.search(r"\] 1/9 cells, .* elapsed, ETA \d", line) for line in log)
    # each cell named as the report names it, not by its key ('knorm|kr=0.5|pa=16|skip=0|decode')
    cells = [re.search(r"\(sample \d/3 (.*)\)$", line) for line in log if "cells, " in line]
    assert {m.group(1) for m in cells if m} <= {"full cache", "knorm 1", "knorm 0.5"} and any(cells), log
    assert re.search(r"\] 9/9 cells done in \d", log[-1])
    assert not any(".py:" in line for line in log), "source locations only with --verbose"
    env, status, cfg = con.execute("SELECT env_json, status, config_json FROM runs WHERE id=?", (run_id,)).fetchone()
    env = json.loads(env)
    for key in ("cpu_model", "torch", "transformers", "python", "torch_threads", "ram_bytes"):
        assert env.get(key) is not None, key
    assert env["torch_threads"] == 1
    assert json.loads(cfg)["keep_ratios"] == [1.0, 0.5]


def test_verbose_logs_say_where_and_a_stored_run_gives_the_next_estimate(tiny_llama_dir, books_dir, tmp_path,
                                                                        monkeypatch):
    from knormctl.cli import _execute

    db = tmp_path / "r.db"
    args = ["sweep", "--keep-ratios", "0.5", "--prune-after", "16", *_args(tiny_llama_dir, books_dir, db)]
    monkeypatch.setattr(_execute, "LONG_RUN_S", 0)  # every estimate is "long": say how to stop and resume
    first = runner.invoke(app, [*args, "--verbose"])
    assert first.exit_code == 0, first.output
    # the database named: without --db the command would resume run 1 of the default database
    assert (f"Ctrl-C stops it at any time: finished cells are kept, and `knormctl sweep --resume 1 --db {db}` "
            "measures the rest") in " ".join(first.stderr.split())
    assert re.search(r"\] loading model .*tiny-llama.* \(float32, cpu\)  \(models\.py:\d+\)", first.stderr)
    assert re.search(r"\] warm-up \(untimed\)  \(runner\.py:\d+\)", first.stderr)
    second = runner.invoke(app, [*args, "--num-wikitext-samples", "1"])  # fewer samples, same cells
    assert second.exit_code == 0, second.output
    line = next(ln for ln in second.stderr.splitlines() if "estimate:" in ln)
    assert re.search(r"estimate: ~\d.* \(run 1 of this model on this host took \d+\.\d s per cell\)$", line)
    assert "warm-up speed" not in second.stderr  # the better estimate wins


def test_configuration_order_rotates_per_sample(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.9,0.5", "--prune-after", "8",
                              *_args(tiny_llama_dir, books_dir, db, "--no-warmup")])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    firsts = [con.execute("SELECT config_key FROM samples WHERE sample_index=? ORDER BY id LIMIT 1", (i,)).fetchone()[0]
              for i in range(3)]
    assert len(set(firsts)) == 3, "each sample starts with a different configuration"


def test_baseline_runs_only_the_full_cache(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["baseline", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    assert "run 1: complete" in res.stdout
    con = sqlite3.connect(db)
    assert con.execute("SELECT DISTINCT config_key FROM samples").fetchall() == [("none",)]
    assert con.execute("SELECT command FROM runs").fetchone() == ("baseline",)


def test_passkey_task_stores_answers(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    passkey = ["sweep", "--task", "passkey", "--keep-ratios", "0.5", "--prune-after", "0", "--passkey-lengths", "256",
               "--passkey-depths", "0.2,0.8", "--passkey-seeds", "1", "--model", str(tiny_llama_dir),
               "--pg19-source", f"text:{books_dir}", "--threads", "1", "--db", str(db)]
    res = runner.invoke(app, [*passkey, "--eval-tokens", "8"])  # an lm option: it would be dropped, not used
    assert res.exit_code == 2 and res.stderr.strip() == "Error: --eval-tokens applies to --task lm, not passkey"
    assert not db.exists()
    res = runner.invoke(app, [*passkey, "--max-new-tokens", "8"])  # ignored: the answer length is the task's
    assert res.exit_code == 2 and res.stderr.strip() == (
        "Error: --max-new-tokens applies to --task lm, not passkey (a question task generates up to "
        "--answer-tokens, or --passkey-new-tokens)")
    assert not db.exists()
    res = runner.invoke(app, passkey)
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    rows = con.execute("SELECT task, answers_json, needle_depth, context_length, score, compress_mode, prompt_tokens "
                       "FROM samples").fetchall()
    assert len(rows) == 2 * 2
    for task, answers, depth, length, score, mode, n in rows:
        key = json.loads(answers)[0]
        assert task == "passkey" and len(key) == 5 and length == 256 and score in (0.0, 1.0) and mode == "prefill"
        assert abs(n - 256) <= 2


BAD_INPUT = [
    (["--keep-ratios", "1.5"], "--keep-ratios: 1.5 is outside (0, 1]"),
    (["--keep-ratios", "0"], "--keep-ratios: 0 is outside (0, 1]"),
    (["--keep-ratios", "90"], "--keep-ratios: 90 is outside (0, 1] (the fraction of the cache kept); use 0.9 for 90 %"),
    (["--keep-ratios", "0.9,,x"], "malformed list"),
    (["--keep-ratios", "nan"], "not a finite number"),
    (["--keep-ratios", "0.9,0.9"], "duplicate"),
    (["--prune-after", "-1"], "--prune-after must be >= 0"),
    (["--presses", "h2o"], "--presses: unknown press 'h2o'; choose from: none, knorm"),
    (["--presses", "knrom"], "--presses: unknown press 'knrom' (did you mean 'knorm'?)"),
    (["--skip-layers", "7"], "do not exist"),
    (["--skip-layers", "a"], "not an integer"),
    (["--compress-mode", "sometimes"], "--compress-mode: unknown mode 'sometimes'"),
    (["--compress-mode", "prefil"], "(did you mean 'prefill'?)"),
    (["--num-pg19-samples", "-2"], "must be >= 0"),
    (["--max-new-tokens", "0"], "must be >= 1"),
    (["--pg19-source", "nowhere"], "unknown text source"),
    (["--pg19-source", "text:/does/not/exist"], "no such file or folder"),
    (["--model", "/does/not/exist"], "does not exist"),
    (["--model", "no-such-org/no-such-model"], "unknown model"),
    (["--db", "/no/such/folder/r.db"], "does not exist"),
    (["--shard", "3/2"], "--shard"),
    (["--shard", "x"], "--shard"),
    (["--keep-ratios", ""], "malformed list"),
    (["--keep-ratios", "-0.5"], "--keep-ratios: -0.5 is outside (0, 1]"),
    (["--keep-ratios", "inf"], "not a finite number"),
    (["--presses", "knorm,knorm"], "duplicate"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval-tokens", "-1"], "--eval-tokens must be >= 0"),
    (["--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
    (["--dtype", "bf16"], "--dtype: unknown dtype 'bf16' (did you mean 'bfloat16'?)"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--device", "cdua"], "(did you mean 'cuda'?)"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be > 0"),
    # options this run would ignore: refused, not dropped
    (["--temperature", "0.5"], "--temperature 0.5 applies with --sample"),
    (["--context-lengths", "8192"], "--context-lengths applies to --task ruler, niah, longbench, not lm"),
    (["--subtasks", "vt"], "--subtasks applies to --task ruler, longbench, not lm"),
    (["--protocol", "paper"], "--protocol paper applies to the question tasks"),
    (["--ppl-skip", "4"], "--ppl-skip applies to --ppl-method stream"),
    (["--keep-recent", "12", "--prune-after", "16"],
     "--keep-recent 12 covers the whole budget of knorm keep 0.7 (12 of 17 entries kept per cut)"),
    (["--passkey-depths", "1.5"], "outside [0, 1]"),
    (["--ppl-method", "guess"], "--ppl-method: unknown method 'guess'"),
    (["--task", "qa"], "--task: unknown task 'qa'"),
    (["--task", "paskey"], "(did you mean 'passkey'?)"),
    (["--model", "smollm"], "(did you mean 'smollm2-135m'?)"),
    (["--model", "{NO_WEIGHTS}"], "has no weights"),
    (["--pg19-source", "text:{EMPTY_FILE}"], "empty"),
    (["--pg19-source", "text:{BINARY_FILE}"], "binary"),
    (["--pg19-source", "text:{EMPTY_DIR}"], "no .txt"),
    (["--db", "{EMPTY_DIR}"], "directory"),
    (["--db", "{NOT_SQLITE}"], "not a SQLite database"),
]


# Mistakes that only the loaded model or the text itself can reveal: the progress lines of
# that work come first (timestamped), the error is still one line, and the last.
FOUND_LATE = {"--pg19-source text:{EMPTY_FILE}", "--pg19-source text:{BINARY_FILE}"}


@pytest.mark.parametrize("extra,message", BAD_INPUT, ids=[" ".join(e) for e, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_nothing_stored(tiny_llama_dir, books_dir, tmp_path, extra, message):
    db = tmp_path / "r.db"
    args = _args(tiny_llama_dir, books_dir, db)
    paths = _bad_paths(tmp_path)
    extra_template, extra = extra, [e.format(**paths) for e in extra]
    not_sqlite = Path(paths["NOT_SQLITE"]).read_bytes()
    for flag, value in zip(extra[::2], extra[1::2]):  # later flags win in Typer, but keep it explicit
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    late = " ".join(extra_template) in FOUND_LATE
    res = runner.invoke(app, ["sweep", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert message in lines[-1] and lines[-1].startswith("Error: ")
    assert "Traceback" not in res.output
    if late:
        assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines[:-1]), lines
    else:
        assert len(lines) == 1, lines
    # the database is created when the run starts, so a refused run leaves none (the model and
    # the text are checked first: an unknown model left an empty r.db behind)
    assert not db.exists()
    assert Path(paths["NOT_SQLITE"]).read_bytes() == not_sqlite, "a file that is not a database stays untouched"


def _bad_paths(tmp_path: Path) -> dict[str, str]:
    """Files and folders that must be refused: a model folder without weights, an empty
    and a binary text file, an empty folder, a file that is not a database."""
    bad = tmp_path / "bad"
    (bad / "no-weights").mkdir(parents=True)
    (bad / "no-weights" / "config.json").write_text('{"model_type": "llama"}')
    (bad / "empty.txt").write_text("")
    (bad / "binary.txt").write_bytes(b"\x00\x01\x02 not text \xff\xfe" * 100)
    (bad / "empty-dir").mkdir()
    (bad / "notes.db").write_text("these are my notes, not a database\n" * 10)
    return {"NO_WEIGHTS": str(bad / "no-weights"), "EMPTY_FILE": str(bad / "empty.txt"),
            "BINARY_FILE": str(bad / "binary.txt"), "EMPTY_DIR": str(bad / "empty-dir"),
            "NOT_SQLITE": str(bad / "notes.db")}


def test_stream_ppl_method_scores_the_whole_chunk(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "16", "--ppl-method", "stream",
                              "--ppl-skip", "10", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    rows = con.execute("SELECT prompt_tokens, eval_tokens, ppl_compressed, config_key, sample_index "
                       "FROM samples").fetchall()
    assert all(e == p + 8 - 1 - 10 and ppl > 1 for p, e, ppl, _, _ in rows)
    first = {key: ppl for _, _, ppl, key, i in rows if i == 0}
    assert len(first) == 2 and len(set(first.values())) == 2  # the press changes the streamed perplexity


def test_a_failing_cell_is_stored_with_its_error_and_the_sweep_goes_on(tiny_llama_dir, books_dir, tmp_path,
                                                                      monkeypatch):
    from knormctl.engine.presses import simple as presses

    real = presses.KnormPress.score
    calls = {"n": 0}

    def flaky(self, keys, values, layer_idx=None):  # the 3rd scoring call fails, as a CUDA error or OOM would
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, keys, values, layer_idx)

    monkeypatch.setattr(presses.KnormPress, "score", flaky)
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--prune-after", "16", "--no-warmup",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    assert con.execute("SELECT status, samples_done, samples_failed FROM runs").fetchone() == (
        "complete_with_errors", 5, 1)
    errors = con.execute("SELECT config_key, error FROM samples WHERE error IS NOT NULL").fetchall()
    assert len(errors) == 1 and "illegal memory access" in errors[0][1] and errors[0][0].startswith("knorm")
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (6,)
    rep = runner.invoke(app, ["report", "--db", str(db), "--format", "json"])  # json: no line wrapping
    assert rep.exit_code == 0, rep.output
    failed = [f["message"] for f in json.loads(rep.stdout)["flags"] if f["kind"] == "failed_sample"]
    assert len(failed) == 1 and "illegal memory access" in failed[0]


def test_report_json_medians_equal_the_stored_samples(tiny_llama_dir, books_dir, tmp_path):
    """A real tiny-model sweep, then report: every median is the median of the stored rows."""
    import statistics

    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.7", "--prune-after", "16",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    rep = runner.invoke(app, ["report", "--last", "--format", "json", "--db", str(db)])
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.stdout)
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    stored = con.execute("SELECT * FROM samples").fetchall()
    assert {r["config_key"] for r in data["rows"]} == {s["config_key"] for s in stored}
    for row in data["rows"]:
        mine = [s for s in stored if s["config_key"] == row["config_key"]]
        for metric in ("ttft_s", "tpot_s", "itl_p90_s", "throughput_tps", "kv_bytes_final", "ppl_compressed"):
            expected = statistics.median(s[metric] for s in mine)
            assert row["values"][metric] == pytest.approx(expected), (row["config_key"], metric)
    out = tmp_path / "plots"
    plot = runner.invoke(app, ["plot", "--last", "--out", str(out), "--db", str(db)])
    assert plot.exit_code == 0, plot.output
    files = plot.stdout.split()
    assert len(files) >= 6 and all(Path(f).stat().st_size > 10_000 for f in files)


def test_shards_cover_every_cell_once_and_report_merges_the_group(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    for shard in ("1/3", "2/3", "3/3"):
        res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5,0.8", "--prune-after", "16", "--group", "g1",
                                  "--shard", shard, "--no-warmup", *_args(tiny_llama_dir, books_dir, db)])
        assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    cells = con.execute("SELECT sample_index, config_key FROM samples").fetchall()
    assert len(cells) == 3 * 3 == len(set(cells))  # 3 samples x 3 configurations, each exactly once
    assert con.execute("SELECT DISTINCT group_name FROM runs").fetchall() == [("g1",)]
    rep = runner.invoke(app, ["report", "--group", "g1", "--format", "json", "--db", str(db)])
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.stdout)
    assert sorted(data["header"]["run_ids"]) == [1, 2, 3]
    assert sum(r["n_samples"] for r in data["rows"]) == 9


@pytest.mark.parametrize("server_lost", [False, True])
def test_a_database_failure_mid_run_is_a_runtime_error_exit_1(tiny_llama_dir, books_dir, tmp_path, monkeypatch,
                                                               server_lost):
    """Disk full, or a lost server: one line naming what failed (storing a sample) and how to
    finish the run. With the server gone, marking the run ended fails too -- that second error
    replaced the first ('ending run 1 failed'), and no way on was given."""
    from knormctl.errors import StoreError
    from knormctl.store.db import Store

    def disk_full(self, run_id, **fields):
        raise StoreError("could not store a sample in r.db: database or disk is full")

    real_finish = Store.finish_run

    def finish(self, run_id, status, error=None):
        if server_lost:
            raise StoreError("ending run 1 failed: connection refused")
        real_finish(self, run_id, status, error=error)

    monkeypatch.setattr(Store, "add_sample", disk_full)
    monkeypatch.setattr(Store, "finish_run", finish)
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--no-warmup", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: could not store a sample in r.db: database or disk is full; run 1 keeps the cells stored before "
        f"it: once the database is back, finish it with: knormctl sweep --resume 1 --db {db}")
    con = sqlite3.connect(db)
    assert con.execute("SELECT status FROM runs").fetchone() == ("running" if server_lost else "failed",)


@pytest.mark.parametrize("extra, says, ppl_cut", [
    # one new token: the prompt's forward is the last, so generation never cuts -- the
    # perplexity evaluation still does (the flag said its numbers "say nothing about
    # compression", and that no prompt exceeded prune_after, with a 65-token one at 16)
    (["--max-new-tokens", "1", "--prune-after", "16"], "only after each sample's last forward", True),
    # prefill mode cuts once, after the prompt: 64-token prompts under prune_after=70 are never
    # cut, though prompt + new tokens (72) exceed it -- the flag said they never did
    (["--max-new-tokens", "8", "--prune-after", "70"], "none exceeded prune_after=70: the longest was 64", False),
    # decode mode: generation exceeds 70 only at its last forward, and so does the evaluation
    # (64 + 8 eval tokens): nothing was cut -- the flag said the perplexity was
    (["--max-new-tokens", "8", "--prune-after", "70", "--compress-mode", "decode"],
     "only after each sample's last forward", False),
    # the stream method scores the prompt's own chunk, cutting as it goes: generation never cut,
    # the perplexity did -- the flag said its numbers reflected nothing
    (["--max-new-tokens", "4", "--prune-after", "66", "--ppl-method", "stream"], "none exceeded prune_after=66",
     True),
])
def test_the_no_compression_flag_says_why_and_what_still_reflects_it(tiny_llama_dir, books_dir, tmp_path, extra,
                                                                      says, ppl_cut):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
                              "--num-wikitext-samples", "1", "--num-pg19-samples", "0", "--wikitext-prompt-tokens",
                              "64", "--eval-tokens", "8", "--threads", "1", "--no-warmup", "--keep-ratios", "0.5",
                              "--presses", "knorm", "--compress-mode", "prefill", "--skip-layers", "none",
                              "--db", str(db), "--json", *extra])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    (events, ppl, ref_ppl), = con.execute(
        "SELECT s.compress_events, s.ppl_compressed, r.ppl_compressed FROM samples s JOIN samples r "
        "ON r.sample_index = s.sample_index AND r.config_key = 'none' WHERE s.config_key != 'none'").fetchall()
    con.close()
    assert events == 0  # generation never cut
    assert (ppl != ref_ppl) == ppl_cut  # the case is what it claims to be
    report = runner.invoke(app, ["report", "--db", str(db), "--format", "json"])
    assert report.exit_code == 0, report.output
    [flag] = [f for f in json.loads(report.stdout)["flags"] if f["kind"] == "no_compression"]
    assert says in flag["message"], flag["message"]
    assert ("that pass did cut" in flag["message"]) == ppl_cut, flag["message"]
    assert ("say nothing about compression" in flag["message"]) == (not ppl_cut), flag["message"]


def test_the_no_compression_flag_reads_a_question_tasks_context_not_its_question(tiny_llama_dir, tmp_path):
    """Prefill mode cuts the context, before the question: a context under prune_after with
    context + question over it is never cut. The flag said it exceeded prune_after 'only after
    the last forward'."""
    db = tmp_path / "r.db"
    args = ["sweep", "--task", "passkey", "--model", str(tiny_llama_dir), "--passkey-lengths", "256",
            "--passkey-depths", "0.5", "--passkey-seeds", "1", "--presses", "knorm", "--keep-ratios", "0.5",
            "--haystack", "wiki-lite-long", "--threads", "1", "--no-warmup", "--db", str(db)]
    res = runner.invoke(app, [*args, "--prune-after", "10000"])  # learn the context's length
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    prompt, question = con.execute("SELECT prompt_tokens, question_tokens FROM samples LIMIT 1").fetchone()
    con.close()
    db.unlink()
    context = prompt - question
    res = runner.invoke(app, [*args, "--prune-after", str(context)])  # over with the question, not without
    assert res.exit_code == 0, res.output
    report = runner.invoke(app, ["report", "--db", str(db), "--format", "json"])
    [flag] = [f for f in json.loads(report.stdout)["flags"] if f["kind"] == "no_compression"]
    assert f"none exceeded prune_after={context}: the longest was {context} tokens" in flag["message"], flag


def test_a_run_refused_after_the_database_opened_leaves_no_new_database(tiny_llama_dir, books_dir, tmp_path,
                                                                          monkeypatch):
    """No CUDA is found only once the run prepares, after the command opened its store: the
    refusal (exit 2) left an empty 64 KiB database with its tables behind, a sweep's and a
    study's (the new file is now created when the run starts). A database that existed before
    keeps what it had."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    db = tmp_path / "new.db"
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--device", "cuda",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr, res.output
    assert list(tmp_path.iterdir()) == []
    study = tmp_path / "s.toml"
    study.write_text(f'name = "s"\nmodel = "{tiny_llama_dir}"\ndevice = "cuda"\ndtype = ["float32", "bfloat16"]\n'
                     f'wikitext_source = "text:{books_dir}"\npg19_source = "text:{books_dir}"\n')
    res = runner.invoke(app, ["sweep", "--config", str(study), "--db", str(db)])
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
    res = runner.invoke(app, ["baseline", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sweep", "--keep-ratios", "0.5", "--device", "cuda",
                              *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 2 and db.exists()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone() == (1,)
