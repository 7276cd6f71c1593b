"""`sweep --config study.toml`: the cross product runs as one group, --dry-run plans without a
model, a second invocation (or --resume-group) continues where the study stopped."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from knormctl.cli import app

runner = CliRunner()


def _study_file(tmp_path, model_dir, books_dir, **extra) -> str:
    lines = [f'name = "{extra.pop("name", "tiny-study")}"', f'model = "{model_dir}"',
             f'wikitext_source = "text:{books_dir}"', 'num_wikitext_samples = 2', 'num_pg19_samples = 0',
             'wikitext_prompt_tokens = 48', 'max_new_tokens = 4', 'eval_tokens = 4', 'threads = 1',
             'presses = ["knorm", "streaming"]', 'keep_ratios = [0.5]', 'compress_mode = "prefill"',
             'prune_after = [0, 16]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _runs(db):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT id, group_name, status, config_json FROM runs ORDER BY id").fetchall()
    finally:
        con.close()


def test_dry_run_plans_without_a_model_or_a_database(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    res = runner.invoke(app, ["sweep", "--config", path, "--dry-run", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "study tiny-study: 2 run(s), varying prune_after" in res.stdout
    # 2 samples x (full cache + knorm 0.5 + streaming 0.5) per run
    assert "1. " in res.stdout and "(prune_after=0): 6 cells" in res.stdout and "(prune_after=16): 6 cells" in res.stdout
    assert "total: 12 cells" in res.stdout and "Nothing was run" in res.stdout
    assert not db.exists()
    res = runner.invoke(app, ["sweep", "--config", path, "--dry-run", "--json", "--db", str(db), "--prune-after", "8"])
    data = json.loads(res.stdout)
    assert [r["cells"] for r in data["runs"]] == [6] and data["cells"] == 6  # the flag overrides the axis


def test_a_plain_dry_run_fits_80_columns_and_speaks_of_its_one_run(tmp_path):
    res = runner.invoke(app, ["sweep", "--dry-run", "--db", str(tmp_path / "r.db")], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80, lines
    assert "no estimate for it (no stored run of its model on this host)" in " ".join(ln.strip() for ln in lines)


@pytest.mark.parametrize("where, message", [("missing/r.db", "folder {tmp}/missing does not exist"),
                                             (".", "{tmp} is a directory, not a database file")])
def test_a_dry_run_refuses_a_database_place_the_run_would_refuse(tmp_path, where, message):
    """The plan said 'no stored run of its model on this host' and exit 0 for a --db the real run
    refuses at once (exit 2): a dry run is the check before a long study."""
    db = str(tmp_path / where) if where != "." else str(tmp_path)
    for args in (["sweep", "--dry-run"], ["sweep", "--dry-run", "--keep-ratios", "0.5"]):
        res = runner.invoke(app, [*args, "--db", db])
        assert res.exit_code == 2 and res.stderr.strip() == "Error: " + message.format(tmp=tmp_path), res.output
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dry_run_refuses_a_device_this_machine_lacks():
    """The plan said 'Nothing was run' and exit 0 for --device cuda on a machine without CUDA,
    and for a CUDA graph under --device auto on the CPU; the run refuses both."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    for args, said in ((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
                       (["--decode-step", "graph"], "--decode-step graph records a CUDA graph: it needs the model "
                                                    "on a CUDA device (it is on cpu)")):
        res = runner.invoke(app, ["sweep", "--dry-run", *args])
        assert res.exit_code == 2 and said in res.stderr and "Nothing was run" not in res.output, res.output


def test_an_empty_config_is_refused_as_empty():
    """`--config ""` (an unset variable) said '--config : is a folder, not a study file'."""
    res = runner.invoke(app, ["sweep", "--config", ""])
    assert res.exit_code == 2 and res.stderr.strip() == "Error: Invalid value for '--config': empty (give a study file)"


def test_a_dry_run_refuses_a_database_the_run_would_refuse(tmp_path):
    """Another program's SQLite file, or one stamped by a newer knormctl: the plan said 'no
    estimate' and exit 0 where the run refuses at once (exit 2). Nothing is written to them."""
    import hashlib
    import sqlite3

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('9999')")
    for db, said in ((foreign, "already holds tables (t) but no knormctl schema revision"),
                     (newer, "its schema revision 9999 is another application's")):
        before = hashlib.sha256(db.read_bytes()).hexdigest()
        res = runner.invoke(app, ["sweep", "--dry-run", "--db", str(db)])
        assert res.exit_code == 2 and said in res.stderr, res.output
        assert hashlib.sha256(db.read_bytes()).hexdigest() == before
        real = runner.invoke(app, ["baseline", "--db", str(db), "--model", "nonexistent-model-x"])
        assert real.exit_code == 2 and said in real.stderr, real.output  # the run's own refusal


def test_study_runs_every_run_in_one_group_and_continues(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    res = runner.invoke(app, ["sweep", "--config", path, "--db", str(db)])
    assert res.exit_code == 0, res.output
    runs = _runs(db)
    assert [(g, s) for _, g, s, _ in runs] == [("tiny-study", "complete")] * 2
    configs = [json.loads(c) for *_, c in runs]
    assert sorted(c["prune_after"] for c in configs) == [0, 16]
    assert all(c["study"]["name"] == "tiny-study" and c["study"]["axes"] == ["prune_after"] for c in configs)
    assert "prune_after" in res.stdout and "best configuration per memory budget" in res.stdout
    assert res.stderr.strip().endswith(f"Details: knormctl report --group tiny-study --db {db}")
    # a second invocation keeps both runs; --resume-group as well
    res = runner.invoke(app, ["sweep", "--config", path, "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "kept (run 1, complete)" in res.stderr and "kept (run 2, complete)" in res.stderr
    res = runner.invoke(app, ["sweep", "--resume-group", "tiny-study", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert len(_runs(db)) == 2


def test_an_interrupted_study_resumes_the_interrupted_run_and_starts_the_missing_one(
        tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    from knormctl import runner as runner_mod

    real = runner_mod.Runner._run_cells
    calls = {"n": 0}

    def stop_in_second_run(self, out, done_before):
        calls["n"] += 1
        if calls["n"] == 2:  # the study's second run: interrupted before its cells
            raise KeyboardInterrupt
        return real(self, out, done_before)

    monkeypatch.setattr(runner_mod.Runner, "_run_cells", stop_in_second_run)
    res = runner.invoke(app, ["sweep", "--config", path, "--db", str(db)])
    assert res.exit_code == 130
    # the stored plan (the command line's overrides in it) in the database named: `--config FILE`
    # alone dropped the overrides and was refused, suggesting to delete the finished run
    assert f"finish it with: knormctl sweep --resume-group tiny-study --db {db}" in " ".join(res.stderr.split())
    assert [s for _, _, s, _ in _runs(db)] == ["complete", "interrupted"]
    monkeypatch.setattr(runner_mod.Runner, "_run_cells", real)
    # the plan says what a resume keeps and what it measures (it listed every cell as still to run)
    res = runner.invoke(app, ["sweep", "--resume-group", "tiny-study", "--db", str(db), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    first, second = plan["runs"]
    assert first["stored"] == "kept: run 1, complete" and first["cells"] == 0
    assert second["stored"].startswith("resumes run 2 (interrupted, ") and second["cells"] > 0
    assert plan["cells"] == second["cells"]
    res = runner.invoke(app, ["sweep", "--resume-group", "tiny-study", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "resuming run 2" in res.stderr
    assert [s for _, _, s, _ in _runs(db)] == ["complete", "complete"]


def test_a_plan_whose_cells_are_unknown_gives_no_estimate_not_zero_seconds(tmp_path):
    """LongBench counts its cells once its texts are cut: the dry run said 'total: 0 cells, ~0 s'."""
    path = tmp_path / "lb.toml"
    path.write_text('task = "longbench"\nmodel = "smollm2-135m"\nprune_after = [0, 64]\n')
    res = runner.invoke(app, ["sweep", "--config", str(path), "--dry-run", "--json", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [r["cells"] for r in plan["runs"]] == [None, None] and plan["estimate_s"] is None
    assert plan["cells"] is None  # it said 0 next to runs of '?' cells
    res = runner.invoke(app, ["sweep", "--config", str(path), "--dry-run", "--db", str(tmp_path / "r.db")],
                        env={"COLUMNS": "200"})
    assert "no estimate for any run" in res.stdout and "~0 s" not in res.stdout
    assert "total: ? cells" in res.stdout
    # the reason is the dataset, not a missing stored run
    assert "counted only once it is read" in res.stdout and "no stored run" not in res.stdout


def test_a_plain_sweeps_dry_run_plans_its_shard(tmp_path):
    """--shard 1/3 --dry-run was refused as if a study file had set shard; the plan is the
    shard's cells (samples 1 and 4 of 4)."""
    args = ["sweep", "--num-wikitext-samples", "4", "--num-pg19-samples", "0", "--keep-ratios", "1.0,0.5",
            "--presses", "knorm", "--dry-run", "--json", "--db", str(tmp_path / "r.db")]
    whole = runner.invoke(app, args)
    assert whole.exit_code == 0, whole.output
    res = runner.invoke(app, [*args, "--shard", "1/3"])
    assert res.exit_code == 0, res.output
    # 3 configurations: the full-cache reference, knorm 1.0 and knorm 0.5
    assert json.loads(whole.stdout)["cells"] == 4 * 3 and json.loads(res.stdout)["cells"] == 2 * 3
    assert json.loads(res.stdout)["runs"][0]["stored"] is None
    # a shard with no sample is refused as the run refuses it (the plan said "0 cells, ~0 s", exit 0)
    empty = runner.invoke(app, [*args, "--shard", "5/5"])
    assert empty.exit_code == 2 and "--shard 5/5 gets no samples: the run has 4 sample(s)" in empty.stderr


def test_a_plain_sweeps_dry_run_is_not_refused_by_the_other_shards_of_its_group(tiny_llama_dir, books_dir, tmp_path):
    """Shard 1 stored in group g: shard 2's --dry-run was refused ('not part of this study ...
    delete them'), though the sweep itself runs."""
    db = tmp_path / "r.db"
    args = ["sweep", "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
            "--num-wikitext-samples", "2", "--num-pg19-samples", "0", "--wikitext-prompt-tokens", "48",
            "--max-new-tokens", "2", "--eval-tokens", "2", "--threads", "1", "--keep-ratios", "0.5", "--no-warmup",
            "--group", "g", "--db", str(db)]
    assert runner.invoke(app, [*args, "--shard", "1/2"]).exit_code == 0
    res = runner.invoke(app, [*args, "--shard", "2/2", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cells"] == 1 * 2


def test_a_group_holding_other_runs_is_refused(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    assert runner.invoke(app, ["sweep", "--config", path, "--db", str(db)]).exit_code == 0
    other = _study_file(tmp_path, tiny_llama_dir, books_dir, seed=3)
    for dry in ([], ["--dry-run"]):  # the plan says what the run would meet
        res = runner.invoke(app, ["sweep", "--config", other, "--db", str(db), *dry])
        assert res.exit_code == 2, (dry, res.output)
        assert "already holds 2 run(s) that are not part of this study" in res.stderr
        assert res.stderr.strip().endswith(f"knormctl runs delete 1 2 --db {db}")  # the database it refused


@pytest.mark.parametrize("text, message", [
    ('model = "x"\nkeep_ratio = [0.5]\n', "line 2: keep_ratio: unknown key (did you mean 'keep_ratios'?)"),
    ('prune_after = []\n', "line 1: prune_after: empty list"),
    # a bad source or model path in the second run: found by the plan, not after run 1 was measured
    ('[[rows]]\nwikitext_source = "wiki-lite"\n[[rows]]\nwikitext_source = "bogus"\n',
     "wikitext_source: --wikitext-source: unknown text source 'bogus' (choose wiki-lite, wiki-lite-long, "
     "wikitext, pg19 or text:PATH) (run 2: wikitext_source=bogus)"),
    # the key and its line, as for every other mistake (the message named neither)
    ('pg19_source = ["wiki-lite-long", "text:/no/such/books"]\n',
     "line 1: pg19_source: --pg19-source: text source /no/such/books: no such file or folder (run 2: "
     "pg19_source=text:/no/such/books)"),
    ('task = "passkey"\n\nhaystack = "text:/no/such/books"\n', "line 3: haystack: --haystack: text source"),
    # ...in a [[rows]] table too (its line was not found: the message named the file only)
    ('task = "niah"\n[[rows]]\nhaystack = "bogus"\n', "line 3: haystack: --haystack: unknown text source"),
    ('model = ["smollm2-135m", "/no/such/model"]\n', "model path does not exist: /no/such/model"),
])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_bad_study_files_fail_before_anything_runs(tmp_path, text, message, dry_run):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--config", str(path), "--db", str(db), *(["--dry-run"] * dry_run)])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not db.exists()


def test_dry_run_counts_question_task_cells(tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--dry-run", "--json", "--db", str(db), "--task", "ruler", "--context-lengths",
                              "1024,2048", "--subtasks", "niah_single_1,vt", "--samples-per-task", "3",
                              "--presses", "knorm,streaming", "--keep-ratios", "0.5"])
    assert res.exit_code == 0, res.output
    # 2 lengths x 2 subtasks x 3 samples, x (full cache + 2 presses)
    assert json.loads(res.stdout)["cells"] == 2 * 2 * 3 * 3
    res = runner.invoke(app, ["sweep", "--dry-run", "--json", "--db", str(db), "--task", "niah", "--context-lengths",
                              "1024", "--needle-depths", "0,0.5,1", "--keep-ratios", "0.5,0.25", "--repeats", "2"])
    assert json.loads(res.stdout)["cells"] == 1 * 3 * 1 * 3 * 2  # samples x (full + knorm x 2) x repeats


def test_dry_run_counts_every_passkey_seed(tmp_path):
    """If this fails, a passkey sweep's --dry-run shows too few cells (and too short a time) for --passkey-seeds > 1."""
    res = runner.invoke(app, ["sweep", "--dry-run", "--json", "--db", str(tmp_path / "r.db"), "--task", "passkey",
                              "--passkey-lengths", "256,512", "--passkey-depths", "0,0.5", "--passkey-seeds", "3",
                              "--presses", "knorm", "--keep-ratios", "0.5"])
    assert res.exit_code == 0, res.output
    # 2 lengths x 2 depths x 3 seeds = 12 prompts, x (full cache + knorm at 0.5)
    assert json.loads(res.stdout)["cells"] == 2 * 2 * 3 * 2


def test_a_study_is_not_sharded(tiny_llama_dir, books_dir, tmp_path):
    # study resume matches runs by settings (shard excluded): shards on two machines would collide
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    res = runner.invoke(app, ["sweep", "--config", path, "--shard", "1/2", "--db", str(db)])
    assert res.exit_code == 2
    assert "--shard cannot be combined with --config" in res.output and not db.exists()


def test_a_stored_study_that_newer_rules_refuse_says_why_it_cannot_be_continued(tmp_path):
    """A study stored by an older knormctl (here: a duplicate keep ratio, refused since) cannot be
    planned again: the refusal says it is the stored plan, and what still works."""
    from knormctl.store import open_store

    db = tmp_path / "r.db"
    old = {"name": "old", "source": "old.toml", "settings": {"task": "passkey", "keep_ratios": [0.5, 0.5]},
           "rows": [], "overrides": {}, "plan": 2}
    with open_store(db) as store:
        run_id = store.create_run(command="sweep", task="passkey", model_requested="m", config={"study": old},
                                  command_line="knormctl sweep --config old.toml", group_name="old")
        store.finish_run(run_id, "interrupted")
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["sweep", "--resume-group", "old", "--db", str(db), *extra])
        assert res.exit_code == 2, res.output
        assert res.stderr.strip() == (
            "Error: group 'old' was planned under rules this knormctl refuses (old.toml: keep_ratios: duplicate "
            "values in [0.5, 0.5]), so it cannot be continued as a study; read it with `knormctl report --group "
            f"old --db {db}`, or resume its runs one by one with --resume N")


def test_an_interrupt_before_a_study_run_starts_says_what_is_kept(tiny_llama_dir, books_dir, tmp_path, monkeypatch):
    """Interrupted while its second run was being prepared, the study said 'nothing was stored'
    with run 1 complete, and gave no way on."""
    from knormctl import runner as runner_mod

    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir)
    real, calls = runner_mod.Runner.prepare, {"n": 0}

    def stop_preparing_the_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(runner_mod.Runner, "prepare", stop_preparing_the_second)
    res = runner.invoke(app, ["sweep", "--config", path, "--db", str(db)])
    assert res.exit_code == 130
    assert " ".join(res.stderr.split()).endswith(
        "interrupted before this run of the study started (nothing of it was stored); finish the study with: "
        f"knormctl sweep --resume-group tiny-study --db {db}")
    assert [s for _, _, s, _ in _runs(db)] == ["complete"]


@pytest.mark.parametrize("flags, message", [
    (["--passkey-lengths", "256"], "--passkey-lengths applies to --task passkey, not niah"),
    (["--haystack", "bogus"], "--haystack: unknown text source 'bogus'"),
])
def test_a_command_line_mistake_is_not_blamed_on_the_study_file(tmp_path, flags, message):
    """Both were reported as '<file>: passkey_lengths: ...', a key the file does not hold."""
    path = tmp_path / "niah.toml"
    path.write_text('task = "niah"\ncontext_lengths = [512]\n')
    res = runner.invoke(app, ["sweep", "--config", str(path), *flags, "--dry-run", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"Error: {message}") and "niah.toml" not in res.stderr, res.stderr


def test_a_study_stored_before_ignored_options_were_left_out_is_kept_as_it_is(tmp_path):
    """Its passkey run's stored key held the file's needle_depths (read by no passkey run); planned
    again, the key left it out, and both the study file and --resume-group refused the group as
    'not part of this study ... delete them: knormctl runs delete 1'."""
    from report_data import Cfg, fill_run

    from knormctl.store import open_store
    from knormctl.study import parse_study

    text = 'name = "old"\ntask = ["passkey", "niah"]\nneedle_depths = [0.3]\npasskey_lengths = [512]\n'
    path = tmp_path / "old.toml"
    path.write_text(text)
    study = parse_study(text, path=str(path))
    db = str(tmp_path / "r.db")
    with open_store(db) as store:
        for run in study.runs:
            old = run.config.to_dict()
            old["needle_depths"], old["passkey_lengths"] = [0.3], [512]  # as planned before: every run had both
            for k in ("group", "shard", "threads", "study"):
                old.pop(k)
            plan = {**study.resolved, "index": run.index, "key": repr(sorted(old.items()))}
            fill_run(store, task=run.config.task, group="old", configs=(Cfg(mode="prefill"),),
                     settings={**run.config.to_dict(), "study": plan})
    for args in (["--config", str(path)], ["--resume-group", "old"]):
        res = runner.invoke(app, ["sweep", *args, "--dry-run", "--json", "--db", db])
        assert res.exit_code == 0, (args, res.output)
        assert [r["stored"] for r in json.loads(res.stdout)["runs"]] == ["kept: run 1, complete",
                                                                           "kept: run 2, complete"], res.stdout
    report = runner.invoke(app, ["report", "--group", "old", "--db", db, "--format", "json"])
    assert report.exit_code == 0 and "not stored yet" not in report.stdout


def test_command_line_options_of_a_question_task_study_apply_to_its_runs(tmp_path):
    """--context-lengths on a niah study was checked against the default task (lm) and refused
    before the study's runs saw it; so were --protocol and prefill-only presses."""
    path = tmp_path / "n.toml"
    path.write_text('[[rows]]\ntask = "niah"\ncontext_lengths = [512]\n[[rows]]\ntask = "passkey"\n')
    base = ["sweep", "--config", str(path), "--dry-run", "--json", "--db", str(tmp_path / "r.db")]
    res = runner.invoke(app, base)
    assert res.exit_code == 0, res.output
    before = {r["varying"]["task"]: r["cells"] for r in json.loads(res.stdout)["runs"]}
    res = runner.invoke(app, [*base, "--context-lengths", "1024,2048", "--protocol", "query-aware",
                              "--presses", "pyramidkv"])
    assert res.exit_code == 0, res.output
    after = {r["varying"]["task"]: r["cells"] for r in json.loads(res.stdout)["runs"]}
    assert after["niah"] == 2 * before["niah"] and after["passkey"] == before["passkey"]


def _study_toml(tmp_path, body: str) -> str:
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\nmodel = "smollm2-135m"\nnum_wikitext_samples = 2\nnum_pg19_samples = 0\n'
                    'presses = ["knorm"]\nkeep_ratios = [0.5]\n' + body)
    return str(path)


def test_dry_run_total_estimate_is_the_sum_of_the_runs(tmp_path, monkeypatch):
    from knormctl import estimate
    from knormctl.store import open_store

    db = tmp_path / "r.db"
    open_store(db).close()  # a database to estimate from (the estimate itself is stubbed)
    monkeypatch.setattr(estimate, "from_stored_run", lambda store, cfg, cells: estimate.Estimate(10.0 * cells, "x"))
    path = _study_toml(tmp_path, "prune_after = [0, 16, 32]\n")
    res = runner.invoke(app, ["sweep", "--config", path, "--dry-run", "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [r["estimate_s"] for r in plan["runs"]] == [40.0, 40.0, 40.0]  # 2 samples x 2 configurations
    assert plan["estimate_s"] == pytest.approx(120.0) and plan["cells"] == 12


def test_sample_on_the_command_line_overrides_a_studys_sampling(tmp_path, monkeypatch):
    """--sample is RunConfig.sampling: a study run with --sample must sample."""
    from knormctl.cli import _study

    seen = {}
    monkeypatch.setattr(_study, "run_study", lambda study, db, **kw: seen.setdefault("study", study))
    path = _study_toml(tmp_path, "prune_after = [0, 16]\n")
    res = runner.invoke(app, ["sweep", "--config", path, "--sample", "--temperature", "0.7",
                              "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 0, res.output
    runs = seen["study"].runs
    assert len(runs) == 2 and all(r.config.sampling is True and r.config.temperature == 0.7 for r in runs)


def test_resume_group_refuses_options_that_would_change_the_study(tmp_path):
    res = runner.invoke(app, ["sweep", "--resume-group", "g", "--keep-ratios", "0.3", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2
    assert "--keep-ratios cannot change it" in " ".join(res.stderr.split())


def _tiny_study(tmp_path, model_dir, books_dir, samples: int):
    """A one-run study of the tiny model: knorm 0.5 in prefill mode, ``samples`` prompts."""
    path = tmp_path / "st.toml"
    path.write_text(f'name = "st"\nmodel = "{model_dir}"\nwikitext_source = "text:{books_dir}"\n'
                    f'num_wikitext_samples = {samples}\nnum_pg19_samples = 0\nwikitext_prompt_tokens = 48\n'
                    'max_new_tokens = 4\neval_tokens = 4\nthreads = 1\npresses = ["knorm"]\nkeep_ratios = [0.5]\n'
                    'compress_mode = "prefill"\nprune_after = 0\n')
    return path


def test_a_resume_plan_counts_only_the_cells_left(tiny_llama_dir, books_dir, tmp_path):
    """A run interrupted after some cells: the dry run's cells (and the total) are those still to measure."""
    import sqlite3

    db = tmp_path / "r.db"
    path = _tiny_study(tmp_path, tiny_llama_dir, books_dir, samples=2)
    res = runner.invoke(app, ["sweep", "--config", str(path), "--db", str(db)])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE runs SET status = 'interrupted', samples_done = 3")
    con.close()
    res = runner.invoke(app, ["sweep", "--resume-group", "st", "--db", str(db), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    [run] = plan["runs"]
    assert run["stored"].startswith("resumes run 1 (interrupted, 3 cells kept)")
    assert run["cells"] == 1 and plan["cells"] == 1  # 2 samples x 2 configurations, 3 kept


def test_a_study_run_complete_with_errors_is_kept(tiny_llama_dir, books_dir, tmp_path):
    import sqlite3

    db = tmp_path / "r.db"
    path = _tiny_study(tmp_path, tiny_llama_dir, books_dir, samples=1)
    assert runner.invoke(app, ["sweep", "--config", str(path), "--db", str(db)]).exit_code == 0
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE runs SET status = 'complete_with_errors'")
    con.close()
    res = runner.invoke(app, ["sweep", "--resume-group", "st", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "kept (run 1, complete_with_errors)" in res.stderr


@pytest.mark.parametrize("extra, fragment", [
    ({"skip_layers": [[0], [5]]}, "line 14: skip_layers: --skip-layers: skip layer(s) [5] do not exist: the model "
                                  "has 2 layers (0..1)"),
    ({"keep_recent": [0, 24]}, "line 14: keep_recent: --keep-recent 24 covers the whole budget of knorm keep 0.5 "
                               "(24 of 48 entries kept per cut)"),
])
def test_a_runs_mistake_is_found_before_the_studys_first_run(tiny_llama_dir, books_dir, tmp_path, extra, fragment):
    """The study's second run was refused when it started, after its first run had been
    measured and stored (a dry run had planned it fine)."""
    db = tmp_path / "r.db"
    path = _study_file(tmp_path, tiny_llama_dir, books_dir, **extra)
    for dry in (["--dry-run"], []):
        res = runner.invoke(app, ["sweep", "--config", path, "--db", str(db), *dry])
        assert res.exit_code == 2, (dry, res.output)
        assert fragment in res.stderr, res.stderr
        assert not db.exists()  # a run refused before it started creates no database
