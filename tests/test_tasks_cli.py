"""`knormctl sweep --task ruler | niah | longbench | passkey` end to end on a tiny model, through
the real CLI: what is stored per sample, bad input, the Hub path, resume after an interrupt."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from knormctl.cli import app
from sweep_process import REPO, process_env as _env, start_and_wait

runner = CliRunner()


def _args(model_dir, books_dir, db, *extra):
    return ["sweep", "--model", str(model_dir), "--haystack", f"text:{books_dir}", "--keep-ratios", "0.5",
            "--prune-after", "0", "--threads", "1", "--answer-tokens", "6", "--db", str(db), *extra]


def _rows(db, sql):
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def test_ruler_stores_task_subtask_length_answers_and_score(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    # 1536: cwe's list in a 512-token vocabulary needs the room
    res = runner.invoke(app, _args(tiny_llama_dir, books_dir, db, "--task", "ruler", "--context-lengths", "1536",
                                   "--subtasks", "niah_single_2,vt,cwe,fwe", "--samples-per-task", "2", "--json"))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["status"] == "complete" and out["done"] == 4 * 2 * 2  # subtasks x samples x (full, knorm 0.5)
    # answers are scored, not teacher-forced tokens: the plan promises none (eval_tokens is 128 here)
    assert any(line.endswith("6 new tokens per cell") for line in res.stderr.splitlines()), res.stderr
    rows = _rows(db, "SELECT * FROM samples ORDER BY sample_index, config_key")
    assert {r["subtask"] for r in rows} == {"niah_single_2", "vt", "cwe", "fwe"}
    for r in rows:
        assert r["task"] == "ruler" and r["protocol"] == "context" and r["compress_mode"] == "prefill"
        assert r["context_length"] == 1536 and r["score_metric"] == "string_match_all"
        assert 0.0 <= r["score"] <= 1.0 and json.loads(r["answers_json"]) and r["new_tokens"] == 6
        assert r["prompt_tokens"] + 6 <= 1536 and r["question_tokens"] > 0 and r["needle_depth"] is None
        assert r["dataset"] == f"ruler:text:{books_dir}"
    for r in rows:
        if r["config_key"] != "none":
            assert r["compress_events"] == 1 and r["kv_entries_final"] < r["kv_entries_peak"]
    # the two samples of a subtask differ; the configurations of a sample share it
    by_index = {}
    for r in rows:
        by_index.setdefault(r["sample_index"], set()).add(r["text_hash"])
    assert all(len(h) == 1 for h in by_index.values()) and len({h.pop() for h in by_index.values()}) == 8
    cfg = json.loads(_rows(db, "SELECT config_json FROM runs")[0]["config_json"])
    assert cfg["protocol"] == "context" and cfg["subtasks"] == ["niah_single_2", "vt", "cwe", "fwe"]
    assert cfg["samples_per_task"] == 2 and cfg["context_lengths"] == [1536]


def test_niah_grid_stores_depth_and_length(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, _args(tiny_llama_dir, books_dir, db, "--task", "niah", "--context-lengths", "512,768",
                                   "--needle-depths", "0,0.5,1", "--protocol", "query-aware", "--no-warmup"))
    assert res.exit_code == 0, res.output
    rows = _rows(db, "SELECT task, subtask, needle_depth, context_length, protocol, score, answers_json, "
                     "prompt_tokens FROM samples")
    assert len(rows) == 2 * 3 * 2
    assert {(r["needle_depth"], r["context_length"]) for r in rows} == {(d, n) for d in (0, 0.5, 1) for n in (512, 768)}
    for r in rows:
        assert r["task"] == r["subtask"] == "niah" and r["protocol"] == "query-aware" and r["score"] in (0.0, 1.0)
        assert r["prompt_tokens"] + 6 <= r["context_length"]


def test_passkey_runs_on_the_context_protocol_by_default(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, _args(tiny_llama_dir, books_dir, db, "--task", "passkey", "--passkey-lengths", "256",
                                   "--passkey-depths", "0.5", "--passkey-seeds", "1", "--no-warmup"))
    assert res.exit_code == 0, res.output
    rows = _rows(db, "SELECT protocol, subtask, score_metric, question_tokens, context_length FROM samples")
    assert rows and all(r["protocol"] == "context" and r["subtask"] == "passkey" and r["context_length"] == 256
                        and r["score_metric"] == "passkey_digits" and r["question_tokens"] > 0 for r in rows)


def test_longbench_from_records_through_the_hub_loader(tiny_llama_dir, tmp_path, monkeypatch):
    import datasets

    from knormctl.engine.text import hub as text
    from knormctl.tasks import hub

    record = {"input": "Which city is the capital?", "context": "Paris is the capital of France. " * 30,
              "answers": ["Paris"], "length": 200, "dataset": "hotpotqa", "all_classes": None, "_id": "h0"}
    asked = []

    def load(name, config):
        asked.append((name, config))
        return datasets.Dataset.from_list([record, {**record, "_id": "h1"}])

    monkeypatch.setattr(text, "hub_status", lambda: (True, "test"))
    monkeypatch.setattr(hub, "LOAD", load)
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--model", str(tiny_llama_dir), "--task", "longbench", "--subtasks", "hotpotqa",
                              "--keep-ratios", "0.5", "--prune-after", "0", "--threads", "1", "--answer-tokens", "4",
                              "--context-lengths", "300", "--no-warmup", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert asked == [("Xnhyacinth/LongBench", "hotpotqa")]
    rows = _rows(db, "SELECT task, subtask, score_metric, doc_id, prompt_tokens, context_length, extra_json FROM samples")
    assert len(rows) == 4 and {r["doc_id"] for r in rows} == {"h0", "h1"}
    for r in rows:
        assert r["task"] == "longbench" and r["subtask"] == "hotpotqa" and r["score_metric"] == "qa_f1"
        assert r["prompt_tokens"] + 4 == r["context_length"] == 300  # cut in the middle to fit
        assert json.loads(r["extra_json"])["truncated"] > 0


def test_ruler_from_the_hub_runs_every_subtask_by_default(tmp_path):
    """--subtasks' default is "all": from the Hub that is RULER's 13 (the 11 generated ones and
    qa_1/qa_2), the set RULER and kvpress average over; the generated set has no qa."""
    from knormctl import config
    from knormctl.tasks.catalog import RULER_QA, RULER_SYNTHETIC

    hub = config.RunConfig(command="sweep", task="ruler", ruler_source="hub")
    hub.check_local_inputs = lambda: None  # no model or Hub here: only the defaults are under test
    assert hub.validate().subtasks == [*RULER_SYNTHETIC, *RULER_QA]
    generated = config.RunConfig(command="sweep", task="ruler")
    generated.check_local_inputs = lambda: None
    assert generated.validate().subtasks == list(RULER_SYNTHETIC)


BAD = [
    (["--task", "ruler", "--protocol", "sometimes"], "--protocol must be one of"),
    (["--task", "ruler", "--subtasks", "niah_single_9"], "unknown ruler subtask"),
    (["--task", "ruler", "--subtasks", "qa_1"], "--ruler-source hub"),
    (["--task", "longbench", "--subtasks", "dureader"], "not supported"),
    (["--task", "ruler", "--context-lengths", "1024,x"], "not an integer"),
    (["--task", "ruler", "--context-lengths", "32"], "too short"),
    (["--task", "niah", "--needle-depths", "1.5"], "outside [0, 1]"),
    (["--task", "ruler", "--samples-per-task", "0"], "--samples-per-task must be >= 1"),
    (["--task", "ruler", "--answer-tokens", "0"], "--answer-tokens must be >= 1"),
    (["--task", "ruler", "--chat-template", "maybe"], "--chat-template must be one of"),
    (["--task", "ruler", "--chat-template", "on"], "no chat template"),
    (["--task", "ruler", "--context-lengths", "8192"], "do not fit the model's context"),
    (["--task", "niah", "--haystack", "text:/does/not/exist"], "no such file"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_task_input_is_one_line_and_exit_2(tiny_llama_dir, books_dir, tmp_path, extra, message):
    db = tmp_path / "r.db"
    res = runner.invoke(app, _args(tiny_llama_dir, books_dir, db, "--no-warmup", *extra))
    assert res.exit_code == 2, res.output
    # progress lines (loading the model ...) may come first; the error is ONE line, the last
    errors = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1] == errors[0]
    assert not db.exists() or not _rows(db, "SELECT id FROM runs")


def test_longbench_offline_fails_at_once_before_the_model_loads(tmp_path):
    env = {**_env(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    # the model is not on the Hub offline either: the dataset must be the first thing that fails
    res = subprocess.run([sys.executable, "-m", "knormctl", "sweep", "--task", "longbench", "--model", "no-such/model",
                          "--db", str(tmp_path / "r.db")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr  # a runtime failure (no Hub), not bad input
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "Xnhyacinth/LongBench" in lines[0] and "--task ruler" in lines[0] and "wiki-lite-long" in lines[0]
    assert time.monotonic() - started < 60




@pytest.mark.parametrize("task_args", [
    ["--task", "ruler", "--context-lengths", "1024", "--subtasks", "niah_single_1,fwe", "--samples-per-task", "3"],
    ["--task", "niah", "--context-lengths", "640,768", "--needle-depths", "0,0.5,1"],
], ids=["ruler", "niah"])
def test_interrupted_task_sweep_resumes_with_the_same_samples(tiny_llama_dir, books_dir, tmp_path, task_args):
    db = tmp_path / "r.db"
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "knormctl", *_args(tiny_llama_dir, books_dir, db, *task_args)]
    cmd[cmd.index("--answer-tokens") + 1] = "40"  # long enough to be interrupted mid-run
    proc = start_and_wait(cmd, env, db, at_least=3, timeout=180)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    before = _rows(db, "SELECT id, sample_index, config_key, text_hash, score, generated_text FROM samples")
    assert before and _rows(db, "SELECT status FROM runs")[0]["status"] == "interrupted"

    res = subprocess.run([sys.executable, "-m", "knormctl", "sweep", "--resume", "1", "--db", str(db), "--json"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "complete"
    after = {r["id"]: r for r in _rows(db, "SELECT id, sample_index, config_key, text_hash, score, generated_text "
                                           "FROM samples")}
    n_samples = 6
    assert len(after) == n_samples * 2
    assert len({(r["sample_index"], r["config_key"]) for r in after.values()}) == n_samples * 2
    for row in before:  # finished cells untouched
        assert after[row["id"]] == row
    # every sample index has one prompt, shared by both configurations (rebuilt identically on resume)
    hashes = {}
    for r in after.values():
        hashes.setdefault(r["sample_index"], set()).add(r["text_hash"])
    assert all(len(h) == 1 for h in hashes.values())


@pytest.mark.slow
def test_ruler_on_smollm2_finds_the_needle_with_the_full_cache(real_home, tmp_path):
    """A short real run: the prompt format (smollm2's chat template), the context protocol and
    the scoring up to EOS together let a real model answer RULER's easiest needle."""
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--task", "ruler", "--context-lengths", "1024", "--subtasks", "niah_single_1",
                              "--samples-per-task", "1", "--keep-ratios", "0.5", "--answer-tokens", "12",
                              "--threads", "2", "--no-warmup", "--db", str(db)])
    assert res.exit_code == 0, res.output
    rows = {r["config_key"]: r for r in _rows(db, "SELECT config_key, score, answers_json, extra_json, protocol, "
                                                  "prompt_tokens, generated_text FROM samples")}
    full = rows["none"]
    assert full["protocol"] == "context" and 900 < full["prompt_tokens"] <= 1024 - 12
    assert full["score"] == 1.0, full  # the 7-digit value, before the model's end-of-turn token
    scored = json.loads(full["extra_json"] or "{}").get("answer", full["generated_text"])
    assert json.loads(full["answers_json"])[0] in scored
    rep = runner.invoke(app, ["report", "--last", "--db", str(db)])
    assert rep.exit_code == 0, rep.output


@pytest.mark.parametrize("stop", [False, True])
def test_stop_at_eos_ends_question_answers_at_a_stop_token(tiny_llama_dir, books_dir, tmp_path, stop):
    """RunConfig.stop_at_eos (benchmarks/tasks.py): the runner hands its stop ids to the loop.
    With every token a stop token, an answer is one token long; without the flag, never."""
    from knormctl.config import RunConfig
    from knormctl.runner import Runner
    from knormctl.store import open_store

    cfg = RunConfig(command="sweep", task="ruler", model=str(tiny_llama_dir), threads=1, haystack=f"text:{books_dir}",
                    presses=["knorm"], keep_ratios=[0.5], prune_after=0, compress_mode="prefill",
                    context_lengths=[1024], subtasks=["niah_single_2"], samples_per_task=1, answer_tokens=6,
                    warmup=False, stop_at_eos=stop).validate()
    store = open_store(str(tmp_path / "s.db"))
    r = Runner(cfg, store)
    r.prepare()
    r.stop_ids = set(range(len(r.loaded.tokenizer)))  # every token ends the answer
    out = r.run()
    rows = store.samples(out.run_id)
    assert out.status == "complete" and len(rows) == 2
    assert {s.new_tokens for s in rows} == ({1} if stop else {6})
    assert all(s.score is not None for s in rows)


@pytest.mark.parametrize("args, line", [
    (["--needle-depths", "0.5"], "Error: --needle-depths applies to --task niah, not lm"),
    (["--task", "ruler", "--passkey-lengths", "8192"], "Error: --passkey-lengths applies to --task passkey, not ruler"),
    (["--task", "niah", "--wikitext-prompt-tokens", "8192"],
     "Error: --wikitext-prompt-tokens applies to --task lm, not niah"),
    (["--task", "passkey", "--samples-per-task", "3"],
     "Error: --samples-per-task applies to --task ruler, niah, longbench, not passkey"),
])
def test_an_option_another_task_reads_is_refused_not_dropped(args, line, tmp_path):
    """They exited 0, were ignored, and the stored config recorded them as if used."""
    res = CliRunner().invoke(app, ["sweep", *args, "--dry-run", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2 and res.stderr.strip() == line, res.output
