"""Sharing results: `knormctl export` -> `knormctl import` keeps every column of every row, on
SQLite and PostgreSQL, adds nothing the second time, remaps ids, and imports nothing from a
bad file; `knormctl runs delete` asks first."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from db_fixtures import pg_database
from report_data import fill_run
from sqlalchemy import func, select
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.store import Run, Sample, open_store
from knormctl.store.connect import make_engine
from knormctl.store.migrate import SCHEMA_HEAD

runner = CliRunner()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def source_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'source.db'}"
    else:
        yield from pg_database()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'target.db'}"
    else:
        yield from pg_database()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)  # exited and reaped


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def rows(url: str, table, **where) -> list[dict]:
    """Every column of every row, as the database returns them (raw Core: no verdicts, no defer)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            stmt = select(table).order_by(table.c.id)
            for name, value in where.items():
                stmt = stmt.where(table.c[name].in_(value) if isinstance(value, list) else table.c[name] == value)
            return [dict(r._mapping) for r in conn.execute(stmt)]
    finally:
        engine.dispose()


def count(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(conn.scalar(select(func.count()).select_from(t)) for t in (Run.__table__, Sample.__table__))
    finally:
        engine.dispose()


def fill_source(url: str) -> list[int]:
    """Three runs with every kind of value: blobs, NULLs, a failed cell, passkey answers, a resume link."""
    with open_store(url) as store:
        a = fill_run(store, n_samples=3, group="shared", fail=(1, "knorm|kr=0.7|pa=512|skip=0|decode"))
        b = fill_run(store, n_samples=2, task="passkey", seed=1, memory=False, token_match=False)
        c = fill_run(store, n_samples=2, seed=2, status="interrupted", stop_after=5, group="shared")
        store.update_run(c, resumed_from=b, env_json={"nested": {"list": [1, 2.5, None], "ok": True}})
        store.add_sample(c, sample_index=9, config_key="none", dataset="d", prompt_tokens=3, press="none",
                         keep_ratio=1.0, prune_after=512, compress_mode="decode", extra_json={"why": "é ✓"},
                         answers_json=[], repeat=2)
    return [a, b, c]


def without(row: dict, *names: str) -> dict:
    return {k: v for k, v in row.items() if k not in names}


def test_export_import_round_trip_keeps_every_column(source_url, target_url, tmp_path):
    ids = fill_source(source_url)
    with open_store(target_url) as store:  # the target already holds runs: ids must be remapped
        fill_run(store, seed=5)
        fill_run(store, seed=6)
    out = tmp_path / "shared.jsonl"
    res = cli("export", "--run-id", str(ids[0]), "--run-id", str(ids[1]), "--run-id", str(ids[2]), "-o", str(out),
              "--db", source_url)
    assert res.exit_code == 0, res.output
    n_samples = len(rows(source_url, Sample.__table__))
    assert res.stdout.strip() == f"exported 3 run(s) with {n_samples} sample(s) to {out}"

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["format"] == "knormctl-results" and lines[0]["version"] == 1
    assert lines[0]["schema_revision"] == SCHEMA_HEAD and lines[-1] == {"end": {"runs": 3, "samples": n_samples}}
    # every column of the tables, read from the models: a new column would be exported as well
    assert set(lines[1]["run"]) == set(Run.__table__.c.keys())
    assert all(set(line["sample"]) == set(Sample.__table__.c.keys()) for line in lines if "sample" in line)

    res = cli("import", str(out), "--db", target_url)
    assert res.exit_code == 0, res.output
    new_ids = [3, 4, 5]
    assert res.stdout.strip().startswith(f"imported 3 run(s) (now id 3, 4, 5) with {n_samples} sample(s) from {out}")

    src_runs = rows(source_url, Run.__table__, id=ids)
    dst_runs = rows(target_url, Run.__table__, id=new_ids)
    assert [r["uuid"] for r in dst_runs] == [r["uuid"] for r in src_runs]
    for src, dst in zip(src_runs, dst_runs):
        assert without(dst, "id", "resumed_from") == without(src, "id", "resumed_from")  # all other columns equal
    assert dst_runs[2]["resumed_from"] == dst_runs[1]["id"]  # the link follows the remapped id
    assert dst_runs[2]["env_json"] == {"nested": {"list": [1, 2.5, None], "ok": True}}
    assert dst_runs[0]["started_utc"].microsecond == src_runs[0]["started_utc"].microsecond

    for old, new in zip(ids, new_ids):
        src_samples = rows(source_url, Sample.__table__, run_id=old)
        dst_samples = rows(target_url, Sample.__table__, run_id=new)
        assert len(dst_samples) == len(src_samples) > 0
        for s, d in zip(src_samples, dst_samples):
            assert without(d, "id", "run_id") == without(s, "id", "run_id")
    blobs = rows(target_url, Sample.__table__, run_id=new_ids[0])[0]
    assert blobs["step_latencies_json"] and blobs["generated_ids_json"] and blobs["generated_text"]
    assert rows(target_url, Sample.__table__, run_id=new_ids[2])[-1]["extra_json"] == {"why": "é ✓"}

    # the imported runs report like the originals (only the run's id differs)
    reports = []
    for url, run_id in ((source_url, ids[0]), (target_url, new_ids[0])):
        rep = cli("report", "--run-id", str(run_id), "--format", "json", "--db", url)
        assert rep.exit_code == 0, rep.output
        data = json.loads(rep.stdout)
        assert data["header"].pop("run_ids") == [run_id]
        assert [m.pop("run_ids") for m in data["header"]["machines"]] == [[run_id]]
        reports.append(json.dumps(data).replace(f"run {run_id})", "run N)"))  # flags name the run
    assert json.loads(reports[1]) == json.loads(reports[0])


def test_importing_twice_adds_nothing_and_a_partly_known_file_adds_the_rest(tmp_path):
    src, dst = tmp_path / "a.db", tmp_path / "b.db"
    ids = fill_source(str(src))
    first, both = tmp_path / "first.jsonl.gz", tmp_path / "both.jsonl"
    assert cli("export", "--run-id", str(ids[0]), "-o", str(first), "--db", str(src)).exit_code == 0
    assert first.read_bytes()[:2] == b"\x1f\x8b"  # .gz: compressed
    assert cli("export", "--group", "shared", "-o", str(both), "--db", str(src)).exit_code == 0  # runs a and c

    res = cli("import", str(first), "--db", str(dst))
    assert res.exit_code == 0 and "imported 1 run(s) (now id 1)" in res.stdout
    after_first = count(f"sqlite:///{dst}")
    res = cli("import", str(first), "--db", str(dst))
    assert res.exit_code == 0
    assert res.stdout.strip() == f"nothing imported from {first}: its 1 run(s) are already in {dst}"
    assert count(f"sqlite:///{dst}") == after_first

    res = cli("import", str(both), "--db", str(dst))
    assert res.exit_code == 0, res.output
    c_samples = len(rows(f"sqlite:///{src}", Sample.__table__, run_id=ids[2]))
    a_samples = len(rows(f"sqlite:///{src}", Sample.__table__, run_id=ids[0]))
    assert res.stdout.strip().endswith(f"with {c_samples} sample(s) from {both} into {dst}; skipped 1 run(s) "
                                       f"already in the database ({a_samples} sample(s))")
    assert count(f"sqlite:///{dst}") == (2, a_samples + c_samples)
    resumed = rows(f"sqlite:///{dst}", Run.__table__, id=2)[0]
    assert resumed["resumed_from"] is None  # run b did not come along: no link to an unrelated run 2


def test_a_run_repeated_in_one_file_is_read_once_and_said_so(tmp_path):
    """A hand-made file holding one run's block twice (end counts fixed to match): the first
    copy is imported, the second neither imported nor counted as 'already in the database'."""
    src, dst, path = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "twice.jsonl"
    ids = fill_source(str(src))
    assert cli("export", "--run-id", str(ids[0]), "-o", str(path), "--db", str(src)).exit_code == 0
    lines = path.read_text().splitlines()
    header, block, end = lines[0], lines[1:-1], json.loads(lines[-1])
    end["end"] = {kind: 2 * n for kind, n in end["end"].items()}
    path.write_text("\n".join([header, *block, *block, json.dumps(end)]) + "\n")
    n = len(rows(f"sqlite:///{src}", Sample.__table__, run_id=ids[0]))

    res = cli("import", str(path), "--db", str(dst))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (f"imported 1 run(s) (now id 1) with {n} sample(s) from {path} into {dst}; "
                                  "1 run record(s) repeat a run that came earlier in the file (the same uuid): "
                                  "the first copy was read")
    assert count(f"sqlite:///{dst}") == (1, n)
    res = cli("import", str(path), "--db", str(dst))  # again: both copies are known now
    assert res.stdout.strip() == (f"nothing imported from {path}: its 1 run(s) are already in {dst}; 1 run "
                                  "record(s) repeat a run that came earlier in the file (the same uuid): the "
                                  "first copy was read"), res.output
    assert count(f"sqlite:///{dst}") == (1, n)


def test_a_later_export_of_a_known_run_replaces_its_earlier_copy(tmp_path):
    """Export an interrupted run, import it, finish it at home, export and import again: the
    second import said 'nothing imported ... already in' and the team's copy stayed interrupted
    for good. The copy with more cells now replaces the stored one (same id here); an older
    copy is not imported over a newer one, and says so."""
    early_db, late_db, team = tmp_path / "early.db", tmp_path / "late.db", tmp_path / "team.db"
    with open_store(str(early_db)) as store:
        early = fill_run(store, status="interrupted", stop_after=4, seed=3)
        uuid = store.get_run(early).uuid
    with open_store(str(late_db)) as store:
        fill_run(store, seed=9)  # another run first: the finished copy has another id there
        late = fill_run(store, seed=3)
    with make_engine(f"sqlite:///{late_db}").begin() as conn:  # the same run, resumed to the end
        conn.execute(Run.__table__.update().where(Run.__table__.c.id == late).values(uuid=uuid))
    files = {}
    for name, db, run in (("early", early_db, early), ("late", late_db, late)):
        files[name] = tmp_path / f"{name}.jsonl"
        assert cli("export", "--run-id", str(run), "-o", str(files[name]), "--db", str(db)).exit_code == 0
    n_late = len(rows(f"sqlite:///{late_db}", Sample.__table__, run_id=late))
    assert n_late > 4

    assert cli("import", str(files["early"]), "--db", str(team)).exit_code == 0
    res = cli("import", str(files["late"]), "--db", str(team))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (f"updated 1 run(s) from {files['late']} in {team}: run 1 (interrupted, 4 cells) "
                                  f"-> complete, {n_late} cells")
    [stored] = rows(f"sqlite:///{team}", Run.__table__)
    assert (stored["id"], stored["uuid"], stored["status"], stored["samples_done"]) == (1, uuid, "complete", n_late)
    ours = sorted((r["sample_index"], r["config_key"], r["ttft_s"]) for r in rows(f"sqlite:///{team}", Sample.__table__))
    theirs = sorted((r["sample_index"], r["config_key"], r["ttft_s"])
                    for r in rows(f"sqlite:///{late_db}", Sample.__table__, run_id=late))
    assert ours == theirs

    res = cli("import", str(files["early"]), "--db", str(team))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (f"nothing imported from {files['early']}: its 1 run(s) are already in {team} "
                                  f"(run 1 holds more cells there than in the file: kept)")
    assert len(rows(f"sqlite:///{team}", Sample.__table__)) == n_late


def _two_copies(tmp_path, early_fields: dict, late_fields: dict):
    """One run exported twice (the same uuid), the copies' run rows edited; returns the files."""
    db = tmp_path / "src.db"
    with open_store(str(db)) as store:
        run = fill_run(store, seed=4)
    files = []
    for name, fields in (("early", early_fields), ("late", late_fields)):
        with make_engine(f"sqlite:///{db}").begin() as conn:
            conn.execute(Run.__table__.update().where(Run.__table__.c.id == run).values(**fields))
        files.append(tmp_path / f"{name}.jsonl")
        assert cli("export", "--run-id", str(run), "-o", str(files[-1]), "--db", str(db)).exit_code == 0
    return files


def test_a_resume_that_measured_failed_cells_again_replaces_the_earlier_copy(tmp_path):
    """A resume measures failed cells again: as many cells, more of them done. That copy was
    skipped as 'already in'."""
    early, late = _two_copies(tmp_path, dict(status="complete_with_errors", samples_done=13, samples_failed=2),
                              dict(status="complete", samples_done=15, samples_failed=0))
    team = tmp_path / "team.db"
    assert cli("import", str(early), "--db", str(team)).exit_code == 0
    res = cli("import", str(late), "--db", str(team))
    assert res.exit_code == 0, res.output
    assert "run 1 (complete_with_errors, 15 cells) -> complete, 15 cells" in res.stdout
    assert rows(f"sqlite:///{team}", Run.__table__)[0]["status"] == "complete"


def test_a_stored_run_is_replaced_unless_a_live_process_measures_it(tmp_path):
    """'running' in the store: replaced when its owner is gone (as readers show it), kept while a
    live process measures it, and the line says why."""
    import os

    early, late = _two_copies(tmp_path, dict(status="interrupted", samples_done=5),
                              dict(status="complete", samples_done=15))
    for owner, replaced in ((os.getpid(), False), (dead_pid(), True)):
        team = tmp_path / f"team-{replaced}.db"
        assert cli("import", str(early), "--db", str(team)).exit_code == 0
        with make_engine(f"sqlite:///{team}").begin() as conn:  # resumed here: running, owned by `owner`
            conn.execute(Run.__table__.update().values(status="running", pid=owner, hostname=socket.gethostname(),
                                                       heartbeat_utc=datetime.utcnow()))
        res = cli("import", str(late), "--db", str(team))
        assert res.exit_code == 0, res.output
        [stored] = rows(f"sqlite:///{team}", Run.__table__)
        if replaced:
            assert stored["status"] == "complete" and "run 1 (running, 5 cells) -> complete, 15 cells" in res.stdout
        else:
            assert stored["status"] == "running" and "run 1 is being measured there now" in res.stdout


def _set_run(db: Path, run_id: int, **fields) -> None:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            conn.execute(Run.__table__.update().where(Run.__table__.c.id == run_id).values(**fields))
    finally:
        engine.dispose()


def test_an_update_keeps_the_stored_resumed_from_link_when_the_file_lacks_that_run(tmp_path):
    """If this fails, re-importing a later export of a resumed run, without the run it came from, erases its link."""
    src, team = tmp_path / "src.db", tmp_path / "team.db"
    with open_store(str(src)) as store:
        origin = fill_run(store, seed=1, status="interrupted", stop_after=3)
        resumed = fill_run(store, seed=4)
        store.update_run(resumed, resumed_from=origin)
        uuids = {run_id: store.get_run(run_id).uuid for run_id in (origin, resumed)}
    early, late = tmp_path / "early.jsonl", tmp_path / "late.jsonl"
    _set_run(src, resumed, status="interrupted", samples_done=5)
    assert cli("export", "--run-id", str(origin), "--run-id", str(resumed), "-o", str(early), "--db", str(src)
               ).exit_code == 0
    _set_run(src, resumed, status="complete", samples_done=15)  # resumed further; exported alone
    assert cli("export", "--run-id", str(resumed), "-o", str(late), "--db", str(src)).exit_code == 0

    assert cli("import", str(early), "--db", str(team)).exit_code == 0
    here = {r["uuid"]: r for r in rows(f"sqlite:///{team}", Run.__table__)}
    origin_here = here[uuids[origin]]["id"]
    assert here[uuids[resumed]]["resumed_from"] == origin_here  # both came along: linked here
    res = cli("import", str(late), "--db", str(team))
    assert res.exit_code == 0 and "updated 1 run(s)" in res.stdout, res.output
    [updated] = rows(f"sqlite:///{team}", Run.__table__, uuid=uuids[resumed])
    assert updated["status"] == "complete" and updated["resumed_from"] == origin_here


def _known_and_new(tmp_path):
    """A source store with two runs -- one the team store will know already, one new -- and the
    team store's path."""
    src, team = tmp_path / "src.db", tmp_path / "team.db"
    with open_store(str(src)) as store:
        known = fill_run(store, seed=4)
        new = fill_run(store, seed=7, n_samples=2)
    return src, team, known, new


def test_a_file_that_adds_and_updates_runs_counts_only_the_new_runs_samples(tmp_path):
    """If this fails, 'imported N run(s) with M sample(s)' also counts the samples of the runs it updated."""
    src, team, known, new = _known_and_new(tmp_path)
    early, mixed = tmp_path / "early.jsonl", tmp_path / "mixed.jsonl"
    _set_run(src, known, status="interrupted", samples_done=5)
    assert cli("export", "--run-id", str(known), "-o", str(early), "--db", str(src)).exit_code == 0
    _set_run(src, known, status="complete", samples_done=15)
    assert cli("export", "--run-id", str(known), "--run-id", str(new), "-o", str(mixed), "--db", str(src)
               ).exit_code == 0
    new_samples = len(rows(f"sqlite:///{src}", Sample.__table__, run_id=new))
    known_samples = len(rows(f"sqlite:///{src}", Sample.__table__, run_id=known))
    assert new_samples > 0 and known_samples > 0  # the updated run brings samples too

    assert cli("import", str(early), "--db", str(team)).exit_code == 0  # the known run is run 1 here
    res = cli("import", str(mixed), "--db", str(team))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (f"imported 1 run(s) (now id 2) with {new_samples} sample(s) from {mixed} into "
                                  f"{team}; updated 1 run(s) from {mixed} in {team}: run 1 (interrupted, 5 cells) "
                                  f"-> complete, 15 cells")
    assert count(f"sqlite:///{team}") == (2, new_samples + known_samples)


def test_a_run_whose_owner_is_gone_is_exported_as_readers_show_it(tmp_path):
    """Exported raw, a dead 'running' run arrived as 'running' elsewhere and blocked every later
    replacement there."""
    db = tmp_path / "src.db"
    with open_store(str(db)) as store:
        run = fill_run(store, status="running", stop_after=3)
        store.update_run(run, pid=dead_pid())
    out = tmp_path / "x.jsonl"
    assert cli("export", "--run-id", str(run), "-o", str(out), "--db", str(db)).exit_code == 0
    exported = json.loads(out.read_text().splitlines()[1])["run"]
    assert exported["status"] == "interrupted" and "no longer exists" in exported["error"]
    assert rows(f"sqlite:///{db}", Run.__table__)[0]["status"] == "running"  # the store itself unchanged


def sample_file(tmp_path: Path) -> tuple[Path, list[str]]:
    src = tmp_path / "src.db"
    fill_source(str(src))
    path = tmp_path / "all.jsonl"
    assert cli("export", "--run-id", "1", "--run-id", "2", "--run-id", "3", "-o", str(path), "--db", str(src)).exit_code == 0
    return path, path.read_text().splitlines(keepends=True)


def _edit(lines, what):
    if what == "not-json":
        return "this is not json\n" + "".join(lines)
    if what == "csv":
        return "run_id,config_key\n1,none\n"
    if what == "version":
        return json.dumps(json.loads(lines[0]) | {"version": 99}) + "\n" + "".join(lines[1:])
    if what == "schema":
        return json.dumps(json.loads(lines[0]) | {"schema_revision": "0099"}) + "\n" + "".join(lines[1:])
    if what == "no-end":
        return "".join(lines[:-1])
    if what == "cut-mid-line":
        text = "".join(lines)
        return text[: len(text) // 2]
    if what == "wrong-count":
        return "".join(lines[:-2] + lines[-1:])  # one sample line dropped
    if what == "orphan-sample":
        return "".join(lines[:1] + lines[2:])  # the first run line dropped: its samples have no run
    if what == "unknown-column":
        run = json.loads(lines[1])
        run["run"]["colour"] = "blue"
        return "".join(lines[:1]) + json.dumps(run) + "\n" + "".join(lines[2:])
    if what == "bad-timestamp":
        run = json.loads(lines[1])
        run["run"]["started_utc"] = "yesterday"
        return "".join(lines[:1]) + json.dumps(run) + "\n" + "".join(lines[2:])
    if what == "unknown-status":
        run = json.loads(lines[1])
        run["run"]["status"] = "bogus"
        return "".join(lines[:1]) + json.dumps(run) + "\n" + "".join(lines[2:])
    if what == "config-not-a-mapping":
        run = json.loads(lines[1])
        run["run"]["config_json"] = "{not json"
        return "".join(lines[:1]) + json.dumps(run) + "\n" + "".join(lines[2:])
    if what in ("text-for-a-number", "bool-for-a-number"):
        sample = json.loads(lines[2])
        assert "sample" in sample
        sample["sample"]["ttft_s" if what == "text-for-a-number" else "keep_ratio"] = \
            "abc" if what == "text-for-a-number" else True
        return "".join(lines[:2]) + json.dumps(sample) + "\n" + "".join(lines[3:])
    if what == "no-task":  # a column with a default, left out: the store's default is taken
        rec = json.loads(lines[1])
        del rec["run"]["task"]
        return "".join(lines[:1]) + json.dumps(rec) + "\n" + "".join(lines[2:])
    if what in ("null-config", "null-config-key", "no-command"):
        at = 1 if what != "null-config-key" else 2
        rec = json.loads(lines[at])
        kind = next(iter(rec))
        if what == "no-command":
            del rec[kind]["command"]
        else:
            rec[kind]["config_json" if what == "null-config" else "config_key"] = None
        return "".join(lines[:at]) + json.dumps(rec) + "\n" + "".join(lines[at + 1:])
    if what == "empty":
        return ""
    raise AssertionError(what)


BAD = [
    ("not-json", "is not a knormctl export (line 1 is not its JSON header)"),
    ("csv", "is not a knormctl export (line 1 is not its JSON header)"),
    ("version", "is an export of format version 99; this knormctl reads version 1"),
    ("schema", f"was exported by a newer knormctl (schema 0099, this one knows up to {SCHEMA_HEAD}); upgrade knormctl"),
    ("no-end", "is truncated (no end line); nothing was imported"),
    ("cut-mid-line", "is not a JSON object (the file is damaged)"),
    ("wrong-count", "is damaged: its end line counts"),
    ("orphan-sample", "outside that run's block (the file is damaged)"),
    ("unknown-column", "unknown runs column(s) colour"),
    ("bad-timestamp", "started_utc is not a timestamp ('yesterday')"),
    ("empty", "is empty (not a knormctl export)"),
    ("unknown-status", "line 2: runs.status 'bogus' is not a run status (running, complete, complete_with_errors, "
                       "interrupted, failed; the file is damaged"),
    # values that would import and then break every later read of the store
    ("config-not-a-mapping", "line 2: runs.config_json should be dict, not str '{not json' (the file is damaged"),
    ("text-for-a-number", "line 3: samples.ttft_s should be float or int, not str 'abc'"),
    ("bool-for-a-number", "line 3: samples.keep_ratio should be float or int, not bool 'True'"),
    # what the store's NOT NULL refused only inside the database (after creating a new one)
    ("null-config", "line 2: runs.config_json is empty, which the store does not allow (the file is damaged"),
    ("null-config-key", "line 3: samples.config_key is empty, which the store does not allow"),
    ("no-command", "line 2: runs.command is missing, which the store does not allow"),
]


@pytest.mark.parametrize("what,message", BAD, ids=[w for w, _ in BAD])
def test_a_bad_file_imports_nothing(tmp_path, what, message):
    good, lines = sample_file(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_edit(lines, what))
    dst = tmp_path / "dst.db"
    with open_store(dst) as store:
        fill_run(store, seed=9)
    before = count(f"sqlite:///{dst}")
    res = cli("import", str(bad), "--db", str(dst))
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert line.startswith(f"Error: {bad}") and message in line and "\n" not in line
    assert count(f"sqlite:///{dst}") == before  # one transaction: the runs before the damage are gone too
    assert cli("import", str(good), "--db", str(dst)).exit_code == 0  # and the good file still imports


def test_a_timestamp_with_an_offset_is_stored_in_utc(tmp_path):
    """The store keeps naive UTC: '12:00+05:00' is 07:00 UTC, not 12:00."""
    good, lines = sample_file(tmp_path)
    run = json.loads(lines[1])
    run["run"]["started_utc"] = "2026-01-02T12:00:00+05:00"
    edited = tmp_path / "offset.jsonl"
    edited.write_text("".join(lines[:1]) + json.dumps(run) + "\n" + "".join(lines[2:]))
    db = tmp_path / "t.db"
    assert cli("import", str(edited), "--db", str(db)).exit_code == 0
    with open_store(db) as store:
        assert store.get_run(1).started_utc == datetime(2026, 1, 2, 7, 0, 0)


def test_import_refuses_a_missing_file_or_garbage_without_creating_a_database(tmp_path):
    dst = tmp_path / "new.db"
    res = cli("import", str(tmp_path / "nope.jsonl"), "--db", str(dst))
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {tmp_path / 'nope.jsonl'} does not exist"
    assert not dst.exists()
    garbage = tmp_path / "x.jsonl.gz"
    garbage.write_bytes(gzip.compress(b"\xff\xfe\x00 binary"))
    res = cli("import", str(garbage), "--db", str(dst))
    assert res.exit_code == 2 and "is not a knormctl export" in res.stderr
    # a real export, compressed, then damaged inside its stream or cut short: exit 2, said as such
    src = tmp_path / "src.db"
    fill_source(str(src))
    plain = tmp_path / "one.jsonl"
    assert cli("export", "--run-id", "1", "-o", str(plain), "--db", str(src)).exit_code == 0
    lines = plain.read_text().splitlines(keepends=True)
    packed = gzip.compress("".join(lines).encode())
    damaged, cut = tmp_path / "d.jsonl.gz", tmp_path / "c.jsonl.gz"
    damaged.write_bytes(packed[:60] + bytes(b ^ 0xFF for b in packed[60:90]) + packed[90:])
    cut.write_bytes(packed[: len(packed) // 2])
    for path, said in ((damaged, "is damaged: its compressed stream cannot be read"),
                       (cut, "is truncated: its compressed stream ends early")):
        res = cli("import", str(path), "--db", str(dst))
        assert res.exit_code == 2 and said in res.stderr and "\n" not in res.stderr.strip(), res.output
        assert not dst.exists()
    # a record the store's NOT NULL refuses: refused before the database is created
    nulls = tmp_path / "n.jsonl"
    nulls.write_text(_edit(lines, "null-config"))
    res = cli("import", str(nulls), "--db", str(dst))
    assert res.exit_code == 2 and "runs.config_json is empty" in res.stderr and not dst.exists()
    nulls.write_text(_edit(lines, "no-task"))  # a column the store gives a default: imported with it
    res = cli("import", str(nulls), "--db", str(dst))
    assert res.exit_code == 0, res.output
    assert [r["task"] for r in rows(f"sqlite:///{dst}", Run.__table__)] == ["lm"]


def test_export_reads_only_and_refuses_what_it_cannot_export(tmp_path):
    db = tmp_path / "r.db"
    with open_store(db) as store:
        done = fill_run(store, group="g")
        live = fill_run(store, status="running", stop_after=2)  # owned by this live process
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    out = tmp_path / "x.jsonl"
    for args, message in [
        ([], "give the runs to export: --run-id N (repeatable) or --group NAME"),
        (["--run-id", "1", "--group", "g"], "choose one of --run-id, --group"),
        (["--run-id", "77"], f"no run 77 in {db}"),
        (["--group", "nope"], f"no runs in group 'nope' in {db}"),
        (["--run-id", str(live)], f"run {live} is still running (process"),
        (["--run-id", str(done), "-o", str(tmp_path / "no" / "x.jsonl")], f"folder {tmp_path / 'no'} does not exist"),
        (["--run-id", str(done), "-o", str(tmp_path)], "is a folder"),
        (["--run-id", str(done), "-o", str(db / "x.jsonl")], f"{db} is a file, not a folder"),
    ]:
        if "-o" not in args:
            args = [*args, "-o", str(out)]
        res = cli("export", *args, "--db", str(db))
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr.strip() and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # no partial file left
    assert cli("export", "--group", "g", "-o", str(out), "--db", str(db)).exit_code == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # the source is never written


def test_runs_delete_asks_first(tmp_path):
    db = tmp_path / "r.db"
    with open_store(db) as store:
        ids = [fill_run(store, seed=s) for s in range(4)]
    n = len(rows(f"sqlite:///{db}", Sample.__table__, run_id=ids[0]))
    res = cli("runs", "delete", str(ids[0]), "--db", str(db), input="n\n")
    assert res.exit_code == 1 and "nothing deleted" in res.stderr
    # the piped answer ends the question's line (it ran on into 'Error: ...'), and stdout stays empty
    assert res.stderr.splitlines()[-2:] == [f"Delete 1 run(s) and their samples from {db}? [y/N]: n",
                                            "Error: nothing deleted"], res.stderr
    assert res.stdout == ""
    assert "run 1: sweep smollm2-135m, complete" in res.stderr and "Delete 1 run(s)" in res.stderr
    res = cli("runs", "delete", str(ids[0]), "--db", str(db))  # no answer at all (a script)
    assert res.exit_code == 2 and "add --yes" in res.stderr
    assert count(f"sqlite:///{db}") == (4, 4 * n)
    res = cli("runs", "delete", str(ids[0]), "99", "--yes", "--db", str(db))
    assert res.exit_code == 2 and "no run 99" in res.stderr and count(f"sqlite:///{db}") == (4, 4 * n)

    res = cli("runs", "delete", str(ids[0]), "--db", str(db), input="y\n")
    assert res.exit_code == 0 and res.stdout == f"deleted 1 run(s) and {n} sample(s) from {db}\n"  # no stray blank
    res = cli("runs", "delete", str(ids[1]), str(ids[2]), "--yes", "--db", str(db))
    assert res.exit_code == 0 and f"deleted 2 run(s) and {2 * n} sample(s)" in res.stdout
    assert count(f"sqlite:///{db}") == (1, n)
    assert [r["id"] for r in rows(f"sqlite:///{db}", Run.__table__)] == [ids[3]]
    with open_store(db) as store:
        live = fill_run(store, status="running", stop_after=2)  # owned by this live process
    res = cli("runs", "delete", str(live), "--yes", "--db", str(db))
    [line] = res.stderr.strip().splitlines()  # one line: nothing listed before the refusal
    assert res.exit_code == 2 and line.startswith(f"Error: run {live} is still running (process {os.getpid()}")
    assert line.endswith("nothing deleted") and count(f"sqlite:///{db}")[0] == 2
    res = cli("runs", "delete", "1", "--yes", "--db", str(tmp_path / "typo.db"))
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {tmp_path / 'typo.db'} does not exist"
    assert not (tmp_path / "typo.db").exists()  # a typo creates no empty database
    empty = tmp_path / "empty.db"  # an empty file (touched by hand): refused, and left empty
    empty.touch()
    for args in (["runs", "delete", "1", "--yes"], ["runs", "upgrade"], ["sweep", "--resume", "1"]):
        res = cli(*args, "--db", str(empty))
        assert res.exit_code == 2 and res.stderr.strip() == f"Error: {empty} holds no knormctl results (an empty file)"
        assert empty.stat().st_size == 0, args


def test_a_refused_file_leaves_the_database_as_it_was(tmp_path):
    """import opened (created, or upgraded with a backup) the database before reading the file:
    a damaged file still left a new empty database, or an old one upgraded. The whole file is
    read first now; a good file into an old database says that it upgraded it."""
    from test_migrations import make_0001_database

    src = tmp_path / "src.db"
    with open_store(src) as store:
        fill_run(store)
    good = tmp_path / "good.jsonl"
    assert cli("export", "--run-id", "1", "-o", str(good), "--db", str(src)).exit_code == 0
    damaged = tmp_path / "damaged.jsonl"
    lines = good.read_text().splitlines()
    damaged.write_text("\n".join(lines[:-2] + ['{"sample": {"run_id": 1, "ttft_s": "fast"}}', lines[-1]]) + "\n")
    old = tmp_path / "old.db"
    make_0001_database(f"sqlite:///{old}")
    before = hashlib.sha256(old.read_bytes()).hexdigest()
    for db in (old, tmp_path / "new.db"):
        res = cli("import", str(damaged), "--db", str(db))
        assert res.exit_code == 2 and "damaged.jsonl line" in res.stderr, res.output
    assert hashlib.sha256(old.read_bytes()).hexdigest() == before
    assert not (tmp_path / "new.db").exists() and not list(tmp_path.glob("old.db.bak-*"))
    res = cli("import", str(good), "--db", str(old))
    assert res.exit_code == 0, res.output
    assert "upgraded the database schema of" in res.stderr and list(tmp_path.glob("old.db.bak-*"))


def test_a_file_that_adds_a_run_says_which_known_run_was_kept(tmp_path):
    """New runs imported and a known run whose stored copy is newer: the line names the kept run too."""
    src, team, known, new = _known_and_new(tmp_path)
    late, mixed = tmp_path / "late.jsonl", tmp_path / "mixed.jsonl"
    assert cli("export", "--run-id", str(known), "-o", str(late), "--db", str(src)).exit_code == 0
    _set_run(src, known, status="interrupted", samples_done=5)
    assert cli("export", "--run-id", str(known), "--run-id", str(new), "-o", str(mixed), "--db", str(src)
               ).exit_code == 0
    assert cli("import", str(late), "--db", str(team)).exit_code == 0  # the known run, finished: run 1 here
    res = cli("import", str(mixed), "--db", str(team))
    assert res.exit_code == 0, res.output
    out = res.stdout.strip()
    assert out.startswith("imported 1 run(s) (now id 2) with ") and "skipped 1 run(s) already in the database" in out
    assert out.endswith("(run 1 holds more cells there than in the file: kept)"), out
