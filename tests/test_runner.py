"""Run orchestration: cells by sample (shards, repeats), `--shard auto` from Slurm or torchrun,
`--resume` refused while the run's owner lives and with options that cannot apply."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
from datetime import timedelta

import pytest
from db_fixtures import db_url  # noqa: F401  (a fixture)
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig, RunConfig
from knormctl.launch import launcher_device, resolve_shard
from knormctl.errors import UsageError
from knormctl.plan import plan_cells
from knormctl.store import INTERRUPTED, RUNNING, open_store, utcnow

runner = CliRunner()
CONFIGS = [PressConfig()] + [PressConfig(press="knorm", keep_ratio=kr).validate() for kr in (0.9, 0.7, 0.5)]


# ----------------------------------------------------------------------------- cells

def test_cells_rotate_configurations_from_sample_to_sample():
    cells = plan_cells(3, CONFIGS)
    assert len(cells) == 12 and {c.repeat for c in cells} == {0}
    keys = [c.config.key for c in cells]
    assert [c.sample_index for c in cells] == [0] * 4 + [1] * 4 + [2] * 4
    assert keys[:4] == [c.key for c in CONFIGS] and keys[4:8] == [c.key for c in CONFIGS[1:] + CONFIGS[:1]]


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_a_shard_holds_whole_samples_and_the_shards_hold_every_cell_once(n_shards):
    whole = plan_cells(7, CONFIGS, repeats=2)
    shards = [plan_cells(7, CONFIGS, f"{k}/{n_shards}", repeats=2) for k in range(1, n_shards + 1)]
    cell = lambda c: (c.sample_index, c.config.key, c.repeat)  # noqa: E731
    assert sorted(cell(c) for s in shards for c in s) == sorted(cell(c) for c in whole)
    for k, shard in enumerate(shards):
        samples = {c.sample_index for c in shard}
        assert samples == set(range(k, 7, n_shards))  # shard k+1 of N: samples k, k+N, ...
        for i in samples:  # every configuration and repeat of its samples, in the unsharded order
            assert [cell(c) for c in shard if c.sample_index == i] == [cell(c) for c in whole if c.sample_index == i]


def test_repeats_measure_every_cell_again_in_a_rotated_order():
    cells = plan_cells(2, CONFIGS, repeats=3)
    assert len(cells) == 2 * 3 * 4
    for i in range(2):
        for r in range(3):
            block = [c.config.key for c in cells if (c.sample_index, c.repeat) == (i, r)]
            assert sorted(block) == sorted(c.key for c in CONFIGS)
            assert block[0] == CONFIGS[(i + r) % 4].key
    assert plan_cells(2, CONFIGS, "3/3") == []  # more shards than samples: nothing for this one


# ----------------------------------------------------------------------------- --shard auto

SLURM = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}


@pytest.mark.parametrize("env,shard", [
    (SLURM, "2/3"),
    (SLURM | {"SLURM_ARRAY_TASK_ID": "4"}, "1/3"),
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "3/3"),  # --array=2-6:2
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}, "1/1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "2/4"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, "1/1"),
    (SLURM | {"RANK": "3", "WORLD_SIZE": "4"}, "8/12"),  # one torchrun of 4 ranks per array task
])
def test_shard_auto_reads_the_launcher(env, shard):
    assert resolve_shard("auto", env) == shard
    assert resolve_shard(" AUTO ", env) == shard


@pytest.mark.parametrize("env,message", [
    ({}, "found neither a Slurm job array (SLURM_ARRAY_TASK_ID) nor torchrun (RANK, WORLD_SIZE); give --shard I/N"),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}, "found neither a Slurm job array"),  # a job, not an array
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not"),
    (SLURM | {"SLURM_ARRAY_TASK_ID": "9"}, "array task 9 is not one of 3 evenly spaced tasks from 4"),
    (SLURM | {"SLURM_ARRAY_TASK_ID": "x"}, "SLURM_ARRAY_TASK_ID='x' is not an integer"),
    ({"RANK": "0"}, "found only RANK"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not in 0..WORLD_SIZE-1"),
])
def test_shard_auto_explains_what_it_did_not_find(env, message):
    with pytest.raises(UsageError) as err:
        resolve_shard("auto", env)
    assert message in str(err.value) and str(err.value).startswith("--shard auto: ")


def test_explicit_shards_are_checked_and_auto_is_stored_resolved(monkeypatch):
    assert resolve_shard("2/4", {}) == "2/4"
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(UsageError, match="--shard"):
            resolve_shard(bad, {})
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert RunConfig(shard="auto").validate().shard == "3/3"  # the run stores I/N, never "auto"


@pytest.mark.parametrize("device,cuda,env,expected", [
    ("auto", True, {"LOCAL_RANK": "3"}, "cuda:3"),
    ("cuda", False, {"LOCAL_RANK": "1"}, "cuda:1"),  # resolve_device then says CUDA is missing
    ("auto", False, {"LOCAL_RANK": "1"}, "auto"),  # a CPU-only torchrun
    ("cpu", True, {"LOCAL_RANK": "1"}, "cpu"),
    ("auto", True, {}, "auto"),
])
def test_one_gpu_per_torchrun_rank(device, cuda, env, expected):
    assert launcher_device(device, cuda, env) == expected


def test_a_bad_local_rank_is_one_line():
    with pytest.raises(UsageError, match="LOCAL_RANK='gpu0' is not a GPU index"):
        launcher_device("auto", True, {"LOCAL_RANK": "gpu0"})


# ----------------------------------------------------------------------------- --resume

def stored_run(db, **fields) -> int:
    """A run as a sweep stores it (config_json from a RunConfig), owned by this process unless changed."""
    cfg = RunConfig(num_wikitext_samples=1, num_pg19_samples=0).validate()
    cfg.model = "/no/such/model"  # stored by a sweep elsewhere (validate now checks paths: set it after)
    with open_store(db) as store:
        run_id = store.create_run(command="sweep", task="lm", model_requested=cfg.model, config=cfg.to_dict(),
                                  command_line="knormctl sweep")
        if fields:
            store.update_run(run_id, **fields)
    return run_id


def test_resume_refuses_options_it_cannot_apply_naming_them(tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--resume", "1", "--keep-ratios", "0.5", "--model", "x", "--greedy",
                              "--db", str(db)])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("Error: --resume 1 continues the run with its stored configuration; "
                                  "--keep-ratios, --sample, --model cannot change it "
                                  "(only --db, --json and --verbose may be given with --resume)")
    assert not db.exists()  # refused before the database is opened
    res = runner.invoke(app, ["sweep", "--resume", "1", "--json", "--db", str(db)])  # these two apply
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {db} does not exist"  # and is not created
    assert not db.exists()
    import typer

    resume = next(p for p in typer.main.get_command(app).commands["sweep"].params if p.name == "resume")
    assert "only --db, --json and --verbose may be given with it" in " ".join(resume.help.split())  # --help says so


def test_resume_refuses_a_run_whose_owner_is_alive(tmp_path):
    db = tmp_path / "r.db"
    mine = stored_run(db)  # owned by this (live) process
    elsewhere = stored_run(db, hostname="gpu-node-8", pid=4321, heartbeat_utc=utcnow() - timedelta(seconds=30))
    for run_id, owner in ((mine, f"process {os.getpid()} on {socket.gethostname()}"),
                          (elsewhere, "process 4321 on gpu-node-8, last heartbeat 3")):
        res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--db", str(db)])
        assert res.exit_code == 2, res.output
        line = res.stderr.strip()
        assert line.startswith(f"Error: run {run_id} is still running ({owner}") and "\n" not in line
        assert line.endswith("resume it once that process has stopped")
    with sqlite3.connect(db) as con:  # untouched: still theirs
        assert con.execute("SELECT pid, hostname FROM runs WHERE id=?", (elsewhere,)).fetchone() == (4321, "gpu-node-8")


def test_resume_of_a_run_newer_rules_refuse_says_so(tmp_path):
    """Stored before --protocol paper with --prefill-chunk was refused: the refusal named options
    the user never typed (only --resume 1)."""
    db = tmp_path / "r.db"
    cfg = RunConfig(task="passkey", keep_ratios=[0.5], prefill_chunk=16).validate().to_dict() | {"protocol": "paper"}
    with open_store(db) as store:
        run_id = store.create_run(command="sweep", task="passkey", model_requested="m", config=cfg,
                                  command_line="knormctl sweep")
        store.finish_run(run_id, INTERRUPTED)
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--db", str(db)])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert line.startswith(f"Error: run {run_id} was stored under rules this knormctl refuses (--prefill-chunk "
                           "cannot be used with --protocol paper") and "\n" not in line
    assert line.endswith(f"so it cannot be resumed; read it with `knormctl report --run-id {run_id} --db {db}`")


def test_resume_in_a_database_that_does_not_exist_creates_none(tmp_path):
    missing = tmp_path / "missing.db"
    res = runner.invoke(app, ["sweep", "--resume", "3", "--db", str(missing)])
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {missing} does not exist"
    assert not missing.exists()  # it was created, with the whole schema, then refused


def test_an_interrupt_while_a_resume_prepares_says_what_the_run_keeps(tiny_llama_dir, tmp_path, monkeypatch):
    """It said 'interrupted before the run started; nothing was stored' while run 1 kept its cells,
    and the hints left out --db (the default database's run 1 would have been resumed)."""
    from knormctl.runner import Runner

    db = tmp_path / "r.db"
    cfg = RunConfig(model=str(tiny_llama_dir), num_wikitext_samples=1, num_pg19_samples=0).validate()
    with open_store(db) as store:
        run_id = store.create_run(command="sweep", task="lm", model_requested=cfg.model, config=cfg.to_dict(),
                                  command_line="knormctl sweep")
        store.finish_run(run_id, INTERRUPTED)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "prepare", interrupted)
    res = runner.invoke(app, ["sweep", "--resume", str(run_id), "--db", str(db)])
    assert res.exit_code == 130
    assert " ".join(res.stderr.split()) == (
        f"Error: interrupted before the resumed run went on: run {run_id} keeps 0 finished cell(s); finish it "
        f"with: knormctl sweep --resume {run_id} --db {db}")


def test_resume_goes_on_when_the_owner_is_gone(tmp_path):
    db = tmp_path / "r.db"
    stale = stored_run(db, hostname="gpu-node-7", pid=4321, heartbeat_utc=utcnow() - timedelta(hours=1))
    res = runner.invoke(app, ["sweep", "--resume", str(stale), "--db", str(db)])
    # past the liveness check: it failed loading the stored model, before writing anything
    assert res.exit_code == 2 and "/no/such/model" in res.stderr, res.output
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT status, hostname FROM runs").fetchone() == (RUNNING, "gpu-node-7")


def _one_prompt_sweep(tiny_llama_dir, books_dir, db) -> None:
    """A finished one-prompt run (the full cache and knorm 0.5) to resume under changed conditions."""
    res = runner.invoke(app, ["sweep", "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
                              "--num-wikitext-samples", "1", "--num-pg19-samples", "0",
                              "--wikitext-prompt-tokens", "48", "--max-new-tokens", "4", "--eval-tokens", "4",
                              "--keep-ratios", "0.5", "--threads", "1", "--no-warmup", "--db", str(db)])
    assert res.exit_code == 0, res.output


def test_resume_refuses_another_set_up_naming_what_differs(tiny_llama_dir, books_dir, tmp_path):
    """Finished cells and the rest of a run pair prompt by prompt: resumed with other threads (or
    another torch, device, commit...) the run would pool two set-ups under one header, and a
    configuration doing no work showed a 30% TTFT change. Refused in one line, nothing written;
    another host with the same set-up may go on."""
    db = tmp_path / "r.db"
    _one_prompt_sweep(tiny_llama_dir, books_dir, db)
    with sqlite3.connect(db) as con:
        env = json.loads(con.execute("SELECT env_json FROM runs").fetchone()[0])
        assert env["torch_threads"] == 1
        con.execute("UPDATE runs SET status = 'interrupted', env_json = ?, hostname = 'gpu-node-7'",
                    (json.dumps(env | {"torch_threads": 2, "torch": "2.0.0"}),))
        con.execute("DELETE FROM samples WHERE config_key != 'none'")
        before = con.execute("SELECT * FROM runs").fetchall()
    res = runner.invoke(app, ["sweep", "--resume", "1", "--db", str(db)])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]  # after the model's loading lines: the set-up is the loaded one
    assert line.startswith("Error: cannot resume run 1 here: its set-up differs in threads 2 -> 1, "
                           f"torch version 2.0.0 -> {env['torch']}") and "\n" not in line
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT * FROM runs").fetchall() == before
        con.execute("UPDATE runs SET env_json = ?", (json.dumps(env),))  # the same set-up, another host
    res = runner.invoke(app, ["sweep", "--resume", "1", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "complete"


def test_resume_refuses_a_prompt_whose_text_changed(tiny_llama_dir, books_dir, tmp_path):
    """A resume pairs the new cells with the stored ones prompt by prompt: if the text source (or
    tokenizer) now gives other prompts, the pairs would compare different texts. Refused in one
    line, nothing written."""
    db = tmp_path / "r.db"
    _one_prompt_sweep(tiny_llama_dir, books_dir, db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE runs SET status = 'interrupted'")
        con.execute("DELETE FROM samples WHERE config_key != 'none'")
        con.execute("UPDATE samples SET text_hash = 'another text'")
        before = con.execute("SELECT * FROM samples").fetchall()
    res = runner.invoke(app, ["sweep", "--resume", "1", "--db", str(db)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1] == ("Error: cannot resume run 1: sample 0 no longer has the same text "
                                                   "(the text source or tokenizer changed)")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT * FROM samples").fetchall() == before


def test_each_prompt_draws_its_own_seed(tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    """The random press (and sampling) seed each prompt with --seed + its index, in the generation
    and in the perplexity pass alike: with one seed for all, prompts of one length would all drop
    the same positions, and the control would look less random than it is."""
    import knormctl.engine.loop as loop
    import knormctl.engine.quality as quality

    seen = {"generation": [], "perplexity": []}
    real_gen, real_ppl = loop.run_generation, quality.compressed_perplexity

    def gen(model, ids, pc, *a, seed=None, **kw):
        if pc.press == "random":
            seen["generation"].append(seed)
        return real_gen(model, ids, pc, *a, seed=seed, **kw)

    def ppl(model, prompt_ids, eval_ids, pc, seed=None, **kw):
        if pc.press == "random":
            seen["perplexity"].append(seed)
        return real_ppl(model, prompt_ids, eval_ids, pc, seed=seed, **kw)

    monkeypatch.setattr(loop, "run_generation", gen)
    monkeypatch.setattr(quality, "compressed_perplexity", ppl)
    res = runner.invoke(app, ["sweep", "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
                              "--num-wikitext-samples", "3", "--num-pg19-samples", "0", "--seed", "40",
                              "--wikitext-prompt-tokens", "48", "--max-new-tokens", "4", "--eval-tokens", "4",
                              "--presses", "random", "--keep-ratios", "0.5", "--threads", "1", "--no-warmup",
                              "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 0, res.output
    assert sorted(seen["generation"]) == sorted(seen["perplexity"]) == [40, 41, 42]


def test_a_process_whose_run_was_taken_over_stores_nothing_more(tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    """A laptop asleep mid-sweep: another host resumes the run; when the laptop wakes it must
    neither store cells beside the new owner's nor end the run under it. It stops, exit 1."""
    from knormctl.store.api import Store

    db, stored = tmp_path / "r.db", []
    original = Store.add_sample

    def add_sample(self, run_id, **fields):
        if len(stored) == 1:  # the owner wakes up after a take-over by gpu-node-7
            self.update_run(run_id, pid=4321, hostname="gpu-node-7", heartbeat_utc=utcnow())
        stored.append(fields["config_key"])
        return original(self, run_id, **fields)

    monkeypatch.setattr(Store, "add_sample", add_sample)
    res = runner.invoke(app, ["sweep", "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
                              "--num-wikitext-samples", "1", "--num-pg19-samples", "0",
                              "--wikitext-prompt-tokens", "48", "--max-new-tokens", "4", "--eval-tokens", "4",
                              "--keep-ratios", "0.5", "--threads", "1", "--no-warmup", "--db", str(db)])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: run 1 was taken over by process 4321 on gpu-node-7 (a --resume while this process was "
        "paused or cut off); this process stores no more")
    assert len(stored) == 2  # it tried the second cell, and stopped there
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT status, pid, hostname, samples_done, ended_utc FROM runs").fetchone() == (
            RUNNING, 4321, "gpu-node-7", 1, None)  # still the new owner's, not ended under it
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (1,)


def test_a_torchrun_rank_resumes_on_another_index_and_thread_count_of_the_same_gpu_kind(tmp_path):
    """A rank stored cuda:1 with torchrun's OMP_NUM_THREADS=1; resumed alone it runs on cuda:0 with
    the default threads: the same set-up for a GPU run. Another GPU model is not."""
    from types import SimpleNamespace

    from knormctl import __version__
    from knormctl.runner import Runner

    env = {"device": "cuda:1", "gpu_name": "NVIDIA H100", "torch_threads": 1, "torch": "2.11", "transformers": "5.17",
           "git_commit": "abc", "git_dirty": False}
    with open_store(tmp_path / "r.db") as store:
        run_id = store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="x",
                                  env=env, dtype="bfloat16", device="cuda:1", knormctl_version=__version__,
                                  git_commit="abc")
        me = SimpleNamespace(store=store, run_id=run_id, loaded=SimpleNamespace(device="cuda:0", dtype="bfloat16"),
                             _resume_ignores=Runner._resume_ignores)
        Runner._check_resume_set_up(me, env | {"device": "cuda:0", "torch_threads": 16})  # no error
        with pytest.raises(UsageError, match="its set-up differs in device model NVIDIA H100 -> NVIDIA A100"):
            Runner._check_resume_set_up(me, env | {"device": "cuda:0", "gpu_name": "NVIDIA A100"})
        me.loaded.device = "cpu"
        with pytest.raises(UsageError, match="device cuda:1 -> cpu"):
            Runner._check_resume_set_up(me, env | {"device": "cpu"})


def test_two_processes_resuming_one_run_at_once_one_gets_it(db_url):
    """The take-over is one locked transaction: of two simultaneous resumers exactly one wins."""
    with open_store(db_url) as store:
        run_id = store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="x")
        store.update_run(run_id, hostname="gpu-node-7", pid=1, heartbeat_utc=utcnow() - timedelta(hours=1))
    stores = [open_store(db_url) for _ in range(2)]
    barrier, outcomes = threading.Barrier(2), []

    def take(store):
        barrier.wait()
        try:
            store.reopen_run(run_id)
            outcomes.append("took it")
        except UsageError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=take, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(outcomes)[1] == "took it" and sorted(outcomes)[0].startswith(f"run {run_id} is still running")
    with open_store(db_url) as store:
        assert store.get_run(run_id).status == RUNNING


# ----------------------------------------------------------------------------- shards end to end

def _args(model_dir, books_dir, db, *extra):
    return ["--model", str(model_dir), "--wikitext-source", f"text:{books_dir}", "--pg19-source",
            f"text:{books_dir}", "--num-wikitext-samples", "2", "--num-pg19-samples", "1",
            "--wikitext-prompt-tokens", "48", "--max-prompt-tokens", "64", "--max-new-tokens", "4",
            "--eval-tokens", "4", "--threads", "1", "--keep-ratios", "0.5", "--prune-after", "16",
            "--no-warmup", "--group", "g", "--db", str(db), *extra]


def test_shards_run_whole_samples_with_their_own_reference(tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--shard", "1/2", "--json", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    assert "plan: 4 cells = 2 samples x 2 configurations" in res.stderr  # this shard's 2 of the 3 samples
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the second task of sbatch --array=0-1
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    res = runner.invoke(app, ["sweep", "--shard", "auto", "--json", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, shard, samples_planned FROM runs ORDER BY id").fetchall() == [
        (1, "1/2", 4), (2, "2/2", 2)]
    rows = con.execute("SELECT run_id, sample_index, config_key, token_match FROM samples").fetchall()
    assert sorted((i, k) for _, i, k, _ in rows) == sorted((i, k) for i in range(3) for k in
                                                            ("none", "knorm|kr=0.5|pa=16|skip=0|decode"))
    assert {(run, i) for run, i, _, _ in rows} == {(1, 0), (1, 2), (2, 1)}  # each prompt in one shard
    assert all(tm is not None for *_, tm in rows)  # every compressed cell paired with its own reference
    res = runner.invoke(app, ["sweep", "--shard", "4/4", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 2 and "--shard 4/4 gets no samples: the run has 3 sample(s)" in res.stderr
    # shard 1/2 again: its cells read as repeats of the first copy's (n=2 x2); refused before a model loads
    res = runner.invoke(app, ["sweep", "--shard", "1/2", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"Error: group 'g' already holds shard 1/2 of this sweep (run 1, complete); finish it with `knormctl sweep "
        f"--resume 1 --db {db}`, or delete it first (knormctl runs delete 1 --db {db})"), res.stderr
    dry = runner.invoke(app, ["sweep", "--shard", "1/2", "--dry-run", *_args(tiny_llama_dir, books_dir, db)])
    assert dry.exit_code == 2 and dry.stderr == res.stderr  # the plan says what the run would meet
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    res = runner.invoke(app, ["sweep", "--shard", "auto", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 2 and "--shard auto: found neither" in res.stderr
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)  # the refused ones stored nothing
    assert json.loads(runner.invoke(app, ["report", "--group", "g", "--format", "json", "--db", str(db)])
                      .stdout)["header"]["run_ids"] == [1, 2]
    other = runner.invoke(app, ["sweep", "--shard", "1/2", *_args(tiny_llama_dir, books_dir, db, "--prune-after",
                                                                  "8")])
    assert other.exit_code == 0, other.output  # another sweep's shard 1/2 (the group a study of two) is not


def test_resume_pairs_cells_stored_before_the_interruption_with_a_reference_measured_after(
        tiny_llama_dir, books_dir, tmp_path):
    """Configurations rotate, so a run can stop after a sample's compressed cell and before its
    full-cache reference: once the reference is measured on resume, the earlier cell gets its
    token match too (it stayed NULL before)."""
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--json", *_args(tiny_llama_dir, books_dir, db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    matches = dict(((i, k), tm) for i, k, tm in con.execute("SELECT sample_index, config_key, token_match FROM samples"))
    # as if interrupted after sample 1's compressed cell, before its reference
    with con:
        con.execute("DELETE FROM samples WHERE sample_index = 1 AND config_key = 'none'")
        con.execute("UPDATE samples SET token_match = NULL WHERE sample_index = 1")
        con.execute("UPDATE runs SET status = 'interrupted', samples_done = samples_done - 1")
    res = runner.invoke(app, ["sweep", "--resume", "1", "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["measured"], out["kept"]) == (1, 5)  # only the reference was measured again
    assert out["done"] == out["planned"] == 6 and out["status"] == "complete"  # 3 samples x 2 configurations
    after = dict(((i, k), tm) for i, k, tm in con.execute("SELECT sample_index, config_key, token_match FROM samples"))
    assert after == matches and None not in after.values()


def test_the_warm_up_runs_the_full_cache_first_whatever_the_cells_order():
    """A shard's first cell is a compressed one (configurations rotate with the sample),
    yet the warm-up starts with the full cache for every token: it sizes the memory pool and its
    time is the run's first estimate."""
    from knormctl.config import PressConfig
    from knormctl.plan import WARMUP_TOKENS, plan_cells, warm_up_plan

    base, a, b = PressConfig(), PressConfig(press="knorm", keep_ratio=0.5), PressConfig(press="knorm", keep_ratio=0.7)
    cells = plan_cells(4, [base, a, b], "2/4")
    planned = list({c.config.key: c.config for c in cells}.values())  # as Runner.warm_up collects them
    assert planned[0] != base
    plan = warm_up_plan(planned, 40)
    assert plan[0] == (base, 40) and sorted(n for _, n in plan[1:]) == [WARMUP_TOKENS, WARMUP_TOKENS]
    assert warm_up_plan([a, base], 8) == [(base, 8), (a, 8)]  # never more tokens than the run generates


def test_planned_lengths_are_exact_for_lm_and_bounds_for_generated_question_tasks():
    from knormctl.plan import planned_lengths

    lm = RunConfig(wikitext_prompt_tokens=256, max_prompt_tokens=1024, max_new_tokens=8)
    assert planned_lengths(lm) == (256, 1032, True)
    assert planned_lengths(RunConfig(num_wikitext_samples=0, num_pg19_samples=1, max_prompt_tokens=1024,
                                     max_new_tokens=8)) == (1024, 1032, True)
    assert planned_lengths(RunConfig(num_pg19_samples=0, wikitext_prompt_tokens=256, max_new_tokens=8)) == (
        256, 264, True)
    # the longest is not known before the prompts are built: 1, so only a run that cuts anyway
    # (prune_after 0) is refused at plan time
    assert planned_lengths(RunConfig(task="passkey", passkey_lengths=[1024, 512])) == (512, 1, False)
    assert planned_lengths(RunConfig(task="niah", context_lengths=[4096, 2048])) == (2048, 1, False)
    assert planned_lengths(RunConfig(task="ruler", ruler_source="hub", context_lengths=[4096])) is None
    assert planned_lengths(RunConfig(task="longbench", context_lengths=[4096])) is None


def test_keep_recent_is_refused_where_it_covers_a_cuts_budget():
    """Decode mode cuts at prune_after + 1 entries, prefill mode the shortest prompt; a run that
    never cuts is not refused (it is flagged apart)."""
    from knormctl.plan import refuse_keep_recent_over_budget

    decode = [PressConfig(press="none", prune_after=16), PressConfig(press="knorm", keep_ratio=0.5, prune_after=16)]
    refuse_keep_recent_over_budget(8, decode, 100, 200)  # 8 < ceil(0.5 x 17) = 9
    with pytest.raises(UsageError, match=r"--keep-recent 9 covers the whole budget of knorm keep 0\.5 \(9 of 17 "
                                         r"entries kept per cut\).*below 9"):
        refuse_keep_recent_over_budget(9, decode, 100, 200)
    refuse_keep_recent_over_budget(9, decode, 100, 16)  # never passes prune_after: never cut
    refuse_keep_recent_over_budget(0, decode, 100, 200)
    prefill = [PressConfig(press="knorm", keep_ratio=0.25, prune_after=0, mode="prefill")]
    refuse_keep_recent_over_budget(24, prefill, 100, 200)  # 24 < 25 of the shortest prompt, 100
    with pytest.raises(UsageError, match=r"\(at most 25 of 100 entries"):  # a planned length: an upper bound
        refuse_keep_recent_over_budget(25, prefill, 100, 200, exact=False)
    full = [PressConfig(press="knorm", keep_ratio=1.0, prune_after=0, mode="prefill")]
    refuse_keep_recent_over_budget(500, full, 100, 200)  # keep 1 never cuts anything


def test_keep_recent_is_checked_again_on_the_prompts_real_lengths(tiny_llama_dir, tmp_path):
    """A passkey prompt's question is not compressed, so its cut holds fewer entries than the
    planned 256: the plan lets --keep-recent 127 pass (under 128 of 256), the run refuses it on the
    real context before it stores anything."""
    db = tmp_path / "r.db"
    args = ["sweep", "--task", "passkey", "--model", str(tiny_llama_dir), "--passkey-lengths", "256",
            "--passkey-depths", "0.5", "--passkey-seeds", "1", "--presses", "knorm", "--keep-ratios", "0.5",
            "--prune-after", "0", "--keep-recent", "127", "--haystack", "wiki-lite-long", "--threads", "1",
            "--no-warmup", "--db", str(db)]
    assert runner.invoke(app, [*args, "--dry-run"]).exit_code == 0
    # at 128 the plan knows: every prompt is cut (prune_after 0) and holds at most 256 entries
    res = runner.invoke(app, [("128" if a == "127" else a) for a in args] + ["--dry-run"])
    assert res.exit_code == 2 and "(at most 128 of 256 entries kept per cut)" in res.stderr, res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: --keep-recent 127 covers the whole budget of knorm keep 0.5 (") and \
        "of 256 entries" not in line, line
    with open_store(db) as store:
        assert store.list_runs() == []


@pytest.mark.parametrize("stored, joining", [("lm", ["--task", "passkey"]), ("passkey", [])])
def test_a_group_holds_perplexity_or_accuracy_not_both(store, db, stored, joining):
    """`sweep --group G --task passkey` beside G's lm runs: the study view then ranked accuracy
    and showed every lm point as N/A under it (a study file refuses the mix; a plain sweep now
    does too, before any model loads: the model named here does not exist)."""
    from report_data import Cfg, fill_run

    run = fill_run(store, configs=(Cfg(),), task=stored, group="g")
    res = runner.invoke(app, ["sweep", "--model", "no/such-model", "--group", "g", "--db", db, *joining])
    assert res.exit_code == 2, res.output
    mine, theirs = ("perplexity", "passkey") if stored == "lm" else ("question-task", "lm")
    assert res.stderr.strip() == (f"Error: group 'g' holds {mine} runs (run {run}: task {stored}); task "
                                  f"{theirs} cannot share it (its report ranks one quality measure): give it another "
                                  f"--group")
    assert [r.id for r in store.runs_in_group("g")] == [run]
