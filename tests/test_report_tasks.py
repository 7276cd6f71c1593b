"""Question-task accuracy in the report (hand-made rows, the columns of schema 0003): per
configuration x subtask x length with intervals, the mean over subtasks, the full cache
beside every compressed row, and subtasks where the full cache itself is near chance."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict

import pytest
from report_data import Cfg, fill_run
from typer.testing import CliRunner

from knormctl import stats
from knormctl.cli import app
from knormctl.render.summary import REFERENCE_KEY

runner = CliRunner()
CONFIGS = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"), Cfg("random", 0.5, mode="prefill"))
KNORM = CONFIGS[1].pc.key
SUBTASKS = ("niah_single_1", "vt", "cwe")
LENGTHS = (4096, 8192)


def ruler_score(i, pc, sub, depth, length):
    """niah: exact (0/1), compression loses shallow needles; vt: the model cannot do it (near
    chance even with the full cache); cwe: partial credit (not binary)."""
    if sub.startswith("niah"):
        return float(pc.press == "none" or (depth or 0) > 0.3)
    if sub == "vt":
        return float(i == 1)  # one question of 16, whatever the cache
    return 0.9 if pc.press == "none" else (0.6 if pc.press == "knorm" else 0.3) + 0.05 * (i % 3)


def report_json(db, *args):
    result = runner.invoke(app, ["report", "--db", db, *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def ruler(store):
    # 48 questions: 8 per subtask x length
    return fill_run(store, task="ruler", configs=CONFIGS, n_samples=48, subtasks=SUBTASKS, lengths=LENGTHS,
                    depths=(0.1, 0.5, 0.9, 0.25), score=ruler_score, score_metric="string_match_all",
                    prompt_tokens=(4096,))


def test_accuracy_per_configuration_subtask_and_length_with_intervals(store, db, ruler):
    data = report_json(db, "--run-id", str(ruler))
    expected = defaultdict(dict)
    for s in store.samples(ruler):
        expected[(s.subtask, s.context_length, s.config_key)][s.sample_index] = s.score
    rows = {(t["subtask"], t["context_length"], t["config_key"]): t for t in data["tasks"] if t["subtask"]}
    assert set(rows) == set(expected)
    for key, scores in expected.items():
        t = rows[key]
        xs = list(scores.values())
        assert t["n"] == len(xs) == 8 and t["task"] == "ruler"
        assert t["accuracy"] == pytest.approx(statistics.fmean(xs))
        if all(x in (0.0, 1.0) for x in xs):
            assert t["interval_method"] == "wilson"
            assert t["interval"] == pytest.approx(list(stats.wilson_interval(sum(xs), len(xs))))
            assert t["correct"] == sum(xs)
        else:  # partial matches: a bootstrap over questions
            assert t["interval_method"] == "bootstrap" and t["correct"] is None
            assert t["interval"][0] <= t["accuracy"] <= t["interval"][1]
        ref = expected[(key[0], key[1], REFERENCE_KEY)]
        assert t["reference_accuracy"] == pytest.approx(statistics.fmean(ref.values()))  # the full cache beside it
        if key[2] == REFERENCE_KEY:
            assert t["change_pp"] is None and t["is_reference"]
        else:  # paired by question
            diffs = [(scores[i] - ref[i]) * 100 for i in scores]
            assert t["change_pp"] == pytest.approx(statistics.fmean(diffs))
            lo, hi = t["change_interval"]
            assert lo <= t["change_pp"] <= hi
    cwe = rows[("cwe", 4096, KNORM)]
    assert cwe["verdict"] == "worse" and cwe["score_metric"] == "string_match_all"


def test_mean_over_subtasks_weighs_each_subtask_equally(store, db, ruler):
    data = report_json(db, "--run-id", str(ruler))
    subs = {(t["subtask"], t["context_length"], t["config_key"]): t for t in data["tasks"] if t["subtask"]}
    means = [t for t in data["tasks"] if t["subtask"] is None]
    assert len(means) == len(LENGTHS) * len(CONFIGS)
    for m in means:
        parts = [subs[(s, m["context_length"], m["config_key"])] for s in SUBTASKS]
        assert m["n_subtasks"] == 3 and m["n"] == 24
        assert m["accuracy"] == pytest.approx(statistics.fmean(p["accuracy"] for p in parts))
        assert m["interval_method"] == "stratified bootstrap"
        assert m["interval"][0] <= m["accuracy"] <= m["interval"][1]
        if m["config_key"] != REFERENCE_KEY:
            assert m["change_pp"] == pytest.approx(statistics.fmean(p["change_pp"] for p in parts))
    # the mean comes first in each task's listing, as the headline
    assert data["tasks"][0]["subtask"] is None


def test_a_mean_over_subtasks_averages_only_those_every_configuration_measured(store, db, ruler):
    """knorm lost its cwe cells at 4096 (failed, or the run stopped first): its mean over 2
    subtasks sat beside the full cache's over 3, under the title 'mean of 3 subtasks', and its
    change was against a full-cache mean the table never showed."""
    import sqlite3

    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM samples WHERE run_id = ? AND config_key = ? AND subtask = ? AND context_length = ?",
                    (ruler, KNORM, "cwe", 4096))
    data = report_json(db, "--run-id", str(ruler))
    subs = {(t["subtask"], t["context_length"], t["config_key"]): t for t in data["tasks"] if t["subtask"]}
    at = {(t["context_length"], t["config_key"]): t for t in data["tasks"] if t["subtask"] is None}
    for key in (c.pc.key for c in CONFIGS):
        m = at[(4096, key)]
        assert m["n_subtasks"] == 2 and m["left_out"] == ["cwe"]
        assert m["accuracy"] == pytest.approx(statistics.fmean(subs[(s, 4096, key)]["accuracy"]
                                                               for s in ("niah_single_1", "vt")))
        assert at[(8192, key)]["n_subtasks"] == 3 and at[(8192, key)]["left_out"] == []
    ref, knorm = at[(4096, REFERENCE_KEY)], at[(4096, KNORM)]
    assert knorm["reference_accuracy"] == pytest.approx(ref["accuracy"])  # the change is against the row shown
    [flag] = [f for f in data["flags"] if f["kind"] == "mean_left_out"]
    assert flag["message"].startswith("ruler at 4096 tokens: the mean over subtasks leaves out cwe"), flag
    text = runner.invoke(app, ["report", "--db", db, "--run-id", str(ruler)], env={"COLUMNS": "200"}).stdout
    assert "ruler: mean of 2-3 subtasks" in text, text
    # knorm down to one subtask at 4096: no mean there for anyone (the full cache's went unsaid)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM samples WHERE run_id = ? AND config_key = ? AND subtask = ? AND context_length = ?",
                    (ruler, KNORM, "vt", 4096))
    data = report_json(db, "--run-id", str(ruler))
    assert not [t for t in data["tasks"] if t["subtask"] is None and t["context_length"] == 4096]
    [flag] = [f for f in data["flags"] if f["kind"] == "mean_left_out"]
    assert flag["message"].startswith("ruler at 4096 tokens: no mean over subtasks: cwe, vt, which not every "
                                      "configuration measured"), flag


def test_questions_that_all_agree_are_not_read_as_certainty(store, db):
    """Three passkey questions, every one right with and without compression: the bootstrap's
    change interval was [+0, +0], read 'same', and the power flag stayed silent. Right/wrong
    scores get the exact binomial bound on the share of questions the caches could answer
    differently; the mean over subtasks the mean of its subtasks' bounds."""
    run = fill_run(store, task="ruler", configs=CONFIGS[:2], n_samples=6, subtasks=("niah_single_1", "vt"),
                   lengths=(4096,), score=lambda *a: 1.0, score_metric="string_match_all", prompt_tokens=(4096,))
    data = report_json(db, "--run-id", str(run))
    h = 100 * (1 - 0.025 ** (1 / 3))  # 71 pp at 3 questions
    for t in data["tasks"]:
        if t["config_key"] == KNORM:
            assert t["change_pp"] == 0 and t["change_interval"] == pytest.approx([-h, h]), t
            assert t["verdict"] == "noise" and t["n_needed"] > 3
        if t["subtask"] is None:
            assert t["interval"] == pytest.approx([1 - h / 100, 1.0]), t  # no longer [100, 100]
    assert any(f["kind"] == "underpowered" and "ruler accuracy" in f["message"] for f in data["flags"])
    # partial scores keep the bootstrap's interval: 8 questions all 20 pp worse are a finding
    rows = {(t["subtask"], t["config_key"]): t for t in report_json(db, "--run-id", str(fill_run(
        store, task="ruler", configs=CONFIGS[:2], n_samples=4, subtasks=("cwe",), lengths=(4096,),
        score=lambda i, pc, *a: 0.9 if pc.press == "none" else 0.7, score_metric="string_match_part",
        prompt_tokens=(4096,))))["tasks"]}
    assert rows[("cwe", KNORM)]["change_interval"] == pytest.approx([-20, -20])
    assert rows[("cwe", KNORM)]["verdict"] == "worse"


def test_subtasks_where_the_full_cache_is_near_chance_are_flagged(store, db, ruler):
    data = report_json(db, "--run-id", str(ruler))
    near = {(t["subtask"], t["config_key"]) for t in data["tasks"] if t["near_chance"] and t["subtask"]}
    assert {sub for sub, _ in near} == {"vt"}
    assert ("vt", KNORM) in near  # every configuration's row on that subtask carries it
    [flag] = [f for f in data["flags"] if f["kind"] == "near_chance"]
    assert "ruler vt at 4096, 8192 tokens" in flag["message"] and "cannot do this task" in flag["message"]
    # underpowered accuracy changes on a near-chance subtask are not worth more prompts
    power = " ".join(f["message"] for f in data["flags"] if f["kind"] == "underpowered")
    assert "(vt)" not in power
    out = " ".join(runner.invoke(app, ["report", "--db", db, "--run-id", str(ruler)]).stdout.split())
    assert "FULL CACHE NEAR CHANCE" in out and "ruler: mean of 3 subtasks" in out and "ruler: vt" in out


def test_a_stored_chance_level_counts_cwe_scoring_below_its_copy_baseline(store, db, ruler):
    """cwe/fwe store what copying the list would score (extra_json chance): a full cache at 90%
    where copying scores 80% cannot do the task either. The report used chance 0 for every
    subtask and missed it; benchmarks/tasks.py used another margin. One rule now (catalog)."""
    import sqlite3

    from knormctl.tasks.catalog import NEAR_CHANCE_MARGIN, chance_of, near_chance

    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET extra_json = ? WHERE subtask = 'cwe'", (json.dumps({"chance": 0.8}),))
    data = report_json(db, "--run-id", str(ruler))
    near = {t["subtask"] for t in data["tasks"] if t["near_chance"] and t["subtask"]}
    assert near == {"vt", "cwe"}
    [flag] = [f for f in data["flags"] if f["kind"] == "near_chance" and "cwe" in f["message"]]
    assert "accuracy 90% at 4096, 90% at 8192" in flag["message"]

    class S:  # a stored sample's fields chance_of reads
        def __init__(self, subtask, extra=None):
            self.subtask, self.extra_json = subtask, extra

    assert chance_of([S("cwe", {"chance": 0.5}), S("cwe", {"chance": 0.7})]) == pytest.approx(0.6)
    assert chance_of([S("trec")]) == pytest.approx(1 / 50) and chance_of([S("niah_single_1")]) == 0.0
    assert chance_of([S("qasper")]) is None and chance_of([]) is None  # no chance level defined
    assert not near_chance(0.0, None)
    assert near_chance(0.6 + NEAR_CHANCE_MARGIN, 0.6) and not near_chance(0.9, 0.6)
    assert near_chance(0.9, 0.6, interval=(0.55, 0.98))  # the interval reaches down to chance


def test_no_near_chance_verdict_where_the_metric_has_no_chance_level(store, db):
    """LongBench's F1 and ROUGE-L have no chance level: GPT-3.5 scores 23.6 F1 on NarrativeQA
    and 23.4 ROUGE-L on QMSum (LongBench's README). With chance taken as 0, such a full cache
    was flagged "cannot do this task". trec (chance 1/50) still gets the verdict."""
    subs = ("narrativeqa", "qmsum", "trec")
    run = fill_run(store, task="longbench", configs=CONFIGS, n_samples=30, subtasks=subs, lengths=(4096,),
                   score=lambda i, pc, sub, depth, length: {"narrativeqa": 0.2, "qmsum": 0.23}.get(sub, 0.1)
                   + 0.01 * (i % 4), score_metric="qa_f1", prompt_tokens=(4096,))
    data = report_json(db, "--run-id", str(run))
    near = {t["subtask"] for t in data["tasks"] if t["near_chance"] and t["subtask"]}
    assert near == {"trec"}
    flagged = " ".join(f["message"] for f in data["flags"] if f["kind"] == "near_chance")
    assert "trec" in flagged and "narrativeqa" not in flagged and "qmsum" not in flagged


def test_needle_cells_pool_every_subtask_with_a_depth(store, db):
    run = fill_run(store, task="niah", configs=CONFIGS, n_samples=24, subtasks=("niah_single_1", "niah_multikey_1"),
                   lengths=(2048, 4096), depths=(0.0, 0.5, 1.0), score=ruler_score)
    data = report_json(db, "--run-id", str(run))
    expected = defaultdict(list)
    for s in store.samples(run):
        expected[(s.config_key, s.needle_depth, s.context_length)].append(s.score)
    cells = {(c["config_key"], c["needle_depth"], c["context_length"]): c for c in data["needle_cells"]}
    assert set(cells) == set(expected)
    for k, xs in expected.items():
        assert cells[k]["n"] == len(xs) and cells[k]["accuracy"] == pytest.approx(statistics.fmean(xs))
        assert cells[k]["subtasks"] == ["niah_multikey_1", "niah_single_1"]
    assert cells[(KNORM, 0.0, 2048)]["accuracy"] == 0.0 and cells[(KNORM, 1.0, 2048)]["accuracy"] == 1.0


def test_passkey_has_one_subtask_and_no_mean_row(store, db):
    run = fill_run(store, task="passkey", configs=CONFIGS, n_samples=6, prompt_tokens=(1024, 2048))
    data = report_json(db, "--run-id", str(run))
    assert data["tasks"] and all(t["subtask"] == "passkey" for t in data["tasks"])
    got = {(t["config_key"], t["context_length"]): t for t in data["tasks"]}
    assert set(got) == {(c.pc.key, n) for c in CONFIGS for n in (1024, 2048)}
    knorm = got[(KNORM, 1024)]
    assert knorm["change_pp"] == pytest.approx((knorm["accuracy"] - got[(REFERENCE_KEY, 1024)]["accuracy"]) * 100)
    out = runner.invoke(app, ["report", "--db", db, "--run-id", str(run)]).stdout
    assert "passkey" in out and "accuracy" in out


def test_task_rows_as_csv_and_markdown(store, db, ruler):
    result = runner.invoke(app, ["report", "--db", db, "--run-id", str(ruler), "--format", "csv", "--tasks"])
    assert result.exit_code == 0, result.output
    recs = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(recs) == (len(SUBTASKS) + 1) * len(LENGTHS) * len(CONFIGS)
    assert {"task", "subtask", "context_length", "accuracy", "accuracy_ci_lo", "accuracy_ci_hi", "change_pp",
            "change_ci_lo", "change_ci_hi", "near_chance", "interval_method"} <= set(recs[0])
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(ruler), "--format", "markdown"]).stdout
    assert "ruler: mean of 3 subtasks" in md and "| yes |" in md


def test_an_lm_run_has_no_task_rows(store, db):
    run = fill_run(store)
    data = report_json(db, "--run-id", str(run))
    assert data["tasks"] == [] and data["needle_cells"] == []
    assert all(r["values"]["accuracy"] is None for r in data["rows"])
    # --tasks: the csv's header alone, and a line that says why (exit 0: scripts loop over runs)
    res = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--tasks", "--format", "csv"])
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 1
    assert res.stderr.strip() == f"run {run} (task lm) has no question-task rows: the csv holds only its header"


def test_the_mean_over_subtasks_is_near_chance_only_when_every_subtask_is(store, db):
    """Guards against (any instead of all): one subtask the model cannot do (vt) marked the mean over all
    three subtasks near chance, and its table 'FULL CACHE NEAR CHANCE: results mean nothing'."""
    run = fill_run(store, task="ruler", configs=CONFIGS, n_samples=48, subtasks=SUBTASKS, lengths=LENGTHS,
                   depths=(0.1, 0.5, 0.9, 0.25), score=ruler_score, score_metric="string_match_all",
                   prompt_tokens=(4096,))
    data = report_json(db, "--run-id", str(run))
    assert any(t["near_chance"] for t in data["tasks"] if t["subtask"] == "vt")
    means = [t for t in data["tasks"] if t["subtask"] is None]
    assert means and not any(t["near_chance"] for t in means)


def test_samples_needed_of_a_mean_over_unequal_subtasks_counts_the_smallest(store, db):
    """Guards against (max instead of min): the mean row's prompts-needed estimate took the largest
    subtask's question count as if every subtask had as many."""
    from sqlalchemy import text

    from knormctl import stats
    from knormctl.render.metrics import DETECTABLE_EFFECT

    configs = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"))
    run = fill_run(store, task="ruler", configs=configs, n_samples=40, subtasks=("niah_single_1", "niah_single_2"),
                   lengths=(4096,), depths=(0.5,), prompt_tokens=(4096,), score_metric="string_match_all",
                   score=lambda i, pc, sub, d, n: float((i * (7 if pc.press == "knorm" else 3)) % 5 > 1))
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM samples WHERE subtask = 'niah_single_2' AND sample_index > 20"))
    data = report_json(db, "--run-id", str(run))
    subs = {t["subtask"]: t for t in data["tasks"] if t["config_key"] != REFERENCE_KEY and t["subtask"]}
    assert subs["niah_single_1"]["n"] == 20 and subs["niah_single_2"]["n"] == 10
    [mean] = [t for t in data["tasks"] if t["subtask"] is None and t["config_key"] != REFERENCE_KEY]
    assert mean["n_needed"] is not None, mean
    assert mean["n_needed"] == stats.samples_needed(10 * 2, tuple(mean["change_interval"]), DETECTABLE_EFFECT)


def test_task_accuracy_averages_a_questions_repeats(store, db):
    """Guards against (a question's repeats reduced by their best score): a question answered once in two
    rounds counts 0.5, not 1."""
    from sqlalchemy import text

    configs = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"))
    run = fill_run(store, task="passkey", configs=configs, n_samples=6, repeats=2, prompt_tokens=(1024,),
                   score=lambda i, pc, sub, d, n: 1.0)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE samples SET score = 0.0 WHERE repeat = 1 AND config_key != 'none'"))
    data = report_json(db, "--run-id", str(run))
    knorm = [t for t in data["tasks"] if t["config_key"] != REFERENCE_KEY]
    assert knorm and all(t["accuracy"] == pytest.approx(0.5) for t in knorm)
    assert all(t["change_pp"] == pytest.approx(-50.0) for t in knorm)


def test_task_markdown_gives_correct_of_asked_and_marks_only_near_chance_rows(store, db):
    """Guards against (the markdown accuracy text 'n/correct') and (the 'full cache near chance'
    column marking every row but the near-chance ones)."""
    run = fill_run(store, task="ruler", configs=CONFIGS, n_samples=48, subtasks=SUBTASKS, lengths=LENGTHS,
                   depths=(0.1, 0.5, 0.9, 0.25), score=ruler_score, score_metric="string_match_all",
                   prompt_tokens=(4096,))
    data = report_json(db, "--run-id", str(run))
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "markdown"]).stdout
    lines = [ln for ln in md.splitlines() if ln.startswith("| ruler")]
    assert len(lines) == len(data["tasks"])
    for t, ln in zip(data["tasks"], lines):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[2] == t["label"]
        if t["correct"] is not None:
            assert f"({t['correct']}/{t['n']})" in cells[3], (cells, t)
        assert cells[4] == ("yes" if t["near_chance"] else ""), (cells, t["near_chance"])
    assert any(t["correct"] not in (None, t["n"]) for t in data["tasks"])
    assert any(t["near_chance"] for t in data["tasks"]) and not all(t["near_chance"] for t in data["tasks"])


def test_the_header_names_the_task_settings_that_change_its_scores(store, db):
    """--protocol paper reads the first answer token before any cut: a pasted report that did not
    say which protocol (nor chat template, answer length, haystack) could not be read."""
    settings = {"protocol": "paper", "chat_template": "auto", "answer_tokens": None, "haystack": None,
                "pg19_source": "wiki-lite-long", "ruler_source": "generated", "needle_depths": [0.5]}
    run = fill_run(store, task="ruler", configs=CONFIGS[:2], n_samples=4, subtasks=SUBTASKS, lengths=(4096,),
                   score=ruler_score, prompt_tokens=(4096,), settings=settings)
    said = ("protocol paper, chat template auto, answer tokens per subtask, haystack wiki-lite-long "
            "(--pg19-source), RULER source generated")
    assert report_json(db, "--run-id", str(run))["header"]["task_settings"] == said  # needle_depths: niah's
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "markdown"]).stdout
    assert f"ruler: {said}" in md, md
    assert report_json(db, "--run-id", str(fill_run(store)))["header"]["task_settings"] is None  # lm


def test_longbench_prompts_that_lost_their_middle_are_flagged(store, db):
    """LongBench cuts the middle of a document longer than the room (the model's context, by
    default); the run stored how much, and no table, json or flag said so."""
    import sqlite3

    run = fill_run(store, task="longbench", configs=CONFIGS[:2], n_samples=4, subtasks=("narrativeqa", "qasper"),
                   lengths=(None,), score=lambda i, *a: 0.3, score_metric="qa_f1", prompt_tokens=(8000,))
    data = report_json(db, "--run-id", str(run))
    assert not [f for f in data["flags"] if f["kind"] == "truncated"]
    with sqlite3.connect(db) as con:  # samples 0 and 2 ask narrativeqa: one lost 1200 tokens, one 300
        for index, over in ((0, 1200), (2, 300)):
            con.execute("UPDATE samples SET extra_json = ? WHERE run_id = ? AND sample_index = ?",
                        (json.dumps({"truncated": over}), run, index))
    [flag] = [f for f in report_json(db, "--run-id", str(run))["flags"] if f["kind"] == "truncated"]
    assert flag["message"].startswith("longbench: prompts longer than the context they were given lost the middle "
                                      "of their document to fit (LongBench's truncation): narrativeqa 2 of 2 (up "
                                      "to 1200 tokens)."), flag


def test_the_configuration_rows_accuracy_is_the_task_tables(store, db, ruler):
    """One definition: a configuration's accuracy (its row, the study's quality) is the mean over
    context lengths of the task table's mean over subtasks, not a mean of the pooled questions."""
    data = report_json(db, "--run-id", str(ruler))
    for row in data["rows"]:
        means = [t for t in data["tasks"] if t["config_key"] == row["config_key"] and t["subtask"] is None]
        assert len(means) == 2  # 4096 and 8192
        assert row["values"]["accuracy"] == pytest.approx(statistics.fmean(t["accuracy"] for t in means))
        if not row["is_reference"]:
            assert row["changes"]["accuracy"] == pytest.approx(statistics.fmean(t["change_pp"] for t in means))
            lo, hi = row["change_intervals"]["accuracy"]
            assert lo <= row["changes"]["accuracy"] <= hi


def test_unequal_question_counts_do_not_weigh_a_length_more(store, db):
    """4 questions at 160 tokens (knorm: all wrong) and 2 at 320 (all right): accuracy 50%, as
    the per-length rows average and the study reads it; pooled questions said 33%."""
    run = fill_run(store, task="passkey", configs=CONFIGS[:2], n_samples=8, samples=[0, 2, 4, 6, 1, 3],
                   lengths=(160, 320), score=lambda i, pc, sub, depth, length: float(pc.press == "none" or length == 320),
                   prompt_tokens=(160, 320))
    data = report_json(db, "--run-id", str(run))
    row = {r["config_key"]: r for r in data["rows"]}[KNORM]
    per_length = {t["context_length"]: t for t in data["tasks"] if t["config_key"] == KNORM}
    assert {k: t["n"] for k, t in per_length.items()} == {160: 4, 320: 2}
    assert row["values"]["accuracy"] == pytest.approx(0.5)
    assert row["changes"]["accuracy"] == pytest.approx(-50.0)
    lo, hi = row["intervals"]["accuracy"]
    assert 0 < lo < 0.5 < hi < 1  # a stratified interval: each length's answers all agree, bounded, not a point


def test_one_subtask_at_one_length_gives_the_row_the_task_rows_numbers(store, db):
    """Three passkey questions right with and without compression: the configuration table said
    'same' on [+0, +0] while the task table said 'noise' on the binomial bound [-71, +71]."""
    run = fill_run(store, task="passkey", configs=CONFIGS[:2], n_samples=3, lengths=(160,),
                   score=lambda *a: 1.0, prompt_tokens=(160,))
    data = report_json(db, "--run-id", str(run))
    row = {r["config_key"]: r for r in data["rows"]}[KNORM]
    [task] = [t for t in data["tasks"] if t["config_key"] == KNORM]
    h = 100 * (1 - 0.025 ** (1 / 3))
    assert row["change_intervals"]["accuracy"] == task["change_interval"]
    assert task["change_interval"] == pytest.approx([-h, h])
    assert row["verdicts"]["accuracy"] == task["verdict"] == "noise"
    assert row["n_needed"]["accuracy"] == task["n_needed"] > 3
    assert row["intervals"]["accuracy"] == task["interval"]


def test_a_length_the_full_cache_failed_leaves_every_rows_accuracy(store, db, ruler):
    """The full cache failed at 8192 (out of memory at the longest context): each compressed row
    kept 8192 and lost its change (nothing to pair there), and its value set two lengths beside
    the full cache's one. Every row now averages the cells all configurations measured."""
    import sqlite3

    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET error = 'RuntimeError: out of memory' WHERE run_id = ? AND config_key = ? "
                    "AND context_length = 8192", (ruler, REFERENCE_KEY))
    data = report_json(db, "--run-id", str(ruler))
    at_4096 = {t["config_key"]: t for t in data["tasks"] if t["subtask"] is None and t["context_length"] == 4096}
    for row in data["rows"]:
        assert row["values"]["accuracy"] == pytest.approx(at_4096[row["config_key"]]["accuracy"])
        if not row["is_reference"]:
            assert row["changes"]["accuracy"] == pytest.approx(at_4096[row["config_key"]]["change_pp"])
            assert row["verdicts"]["accuracy"] == at_4096[row["config_key"]]["verdict"] is not None


def test_one_question_per_subtask_and_length_still_gets_an_interval(store, db):
    """--samples-per-task 1: a stratified bootstrap cannot resample a cell of one question, and
    the row had no interval, no verdict and no prompts-needed; the questions are resampled with
    their cells' weights instead."""
    run = fill_run(store, task="ruler", configs=CONFIGS[:2], n_samples=6, subtasks=("niah_single_1", "vt", "cwe"),
                   lengths=LENGTHS, score=lambda i, pc, *a: float(pc.press == "none" or i % 3 == 0),
                   score_metric="string_match_all", prompt_tokens=(4096,))
    row = {r["config_key"]: r for r in report_json(db, "--run-id", str(run))["rows"]}[KNORM]
    lo, hi = row["change_intervals"]["accuracy"]
    assert lo < row["changes"]["accuracy"] < hi and row["verdicts"]["accuracy"] in ("worse", "noise")
    lo, hi = row["intervals"]["accuracy"]
    assert lo < row["values"]["accuracy"] < hi
