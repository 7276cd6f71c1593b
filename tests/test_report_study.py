"""report / plot --group on a study: runs that differ in model or settings, read run by run."""

from __future__ import annotations

import json

import pytest

from report_data import Cfg, fill_run
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.render.pareto import Point, frontier
from knormctl.render.summary import REFERENCE_KEY

runner = CliRunner()
CONFIGS = (Cfg(), Cfg("knorm", 0.9), Cfg("knorm", 0.5), Cfg("streaming", 0.5), Cfg("random", 0.25))


def _study(store, group="s1"):
    """2 models x 2 budgets; every run has its own full-cache reference."""
    runs = {}
    for seed, (model, pa) in enumerate([("smollm2-135m", 256), ("smollm2-135m", 1024), ("tiny-llama", 256),
                                        ("tiny-llama", 1024)]):
        runs[(model, pa)] = fill_run(store, configs=CONFIGS, n_samples=4, seed=seed, model=model, group=group,
                                     settings={"prune_after": pa}, prompt_tokens=(2048,) * 4)
    return runs


def _json(db, *args):
    res = runner.invoke(app, ["report", "--db", db, *args, "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_shards_of_one_sweep_are_merged_not_read_as_a_study(store, db):
    for part in ((0, 1), (2, 3)):
        fill_run(store, configs=CONFIGS, n_samples=4, samples=part, group="shards")
    data = _json(db, "--group", "shards")
    assert "rows" in data and "study" not in data  # one merged summary


def test_study_points_are_each_runs_own_paired_numbers(store, db):
    runs = _study(store)
    data = _json(db, "--group", "s1")
    assert data["study"] == "s1" and data["axes"] == ["prune_after"] and data["quality"] == "ppl ratio"
    assert data["models"] == ["smollm2-135m", "tiny-llama"]
    assert data["scales"] == data["models"]  # prune_after leaves the full cache as it is: one scale per model
    assert len(data["points"]) == 4 * len(CONFIGS)
    for (model, pa), run_id in runs.items():
        own = {r["config_key"]: r for r in _json(db, "--run-id", str(run_id))["rows"]}
        mine = [p for p in data["points"] if p["run_id"] == run_id]
        assert {p["model"] for p in mine} == {model} and {p["settings"]["prune_after"] for p in mine} == {pa}  # typed
        for p in mine:
            r = own[p["config_key"]]
            if p["is_reference"]:
                assert p["quality"] == 1.0 and p["kv_held"] == 1.0
                continue
            assert p["quality"] == 1 + r["changes"]["ppl_compressed"] / 100
            lo, hi = r["change_intervals"]["ppl_compressed"]
            assert p["quality_interval"] == [1 + lo / 100, 1 + hi / 100]
            assert p["kv_held"] == 1 + r["changes"]["kv_bytes_final"] / 100
            assert p["tpot_ratio"] == 1 + r["changes"]["tpot_s"] / 100


@pytest.mark.parametrize("flags", [["--samples"], ["--by-dataset"], ["--tasks", "--format", "csv"]])
def test_options_the_study_view_has_no_room_for_are_refused(store, db, flags):
    """report --group STUDY --samples printed the study view unchanged: the option was dropped."""
    runs = _study(store)
    res = runner.invoke(app, ["report", "--db", db, "--group", "s1", *flags])
    assert res.exit_code == 2, res.output
    ids = ", ".join(str(i) for i in sorted(runs.values()))
    assert res.stderr.strip() == (f"Error: {flags[0]} cannot be used with study 's1': read one of its runs with "
                                  f"--run-id (its runs: {ids})")


def test_a_study_without_perplexity_says_so_instead_of_no_configuration_fits(store, db):
    """eval_tokens = 0: no ppl anywhere. Every budget line said 'no configuration fits', the
    100% budget included, which the full cache always fits."""
    for seed, pa in enumerate((256, 1024)):
        run = fill_run(store, configs=CONFIGS, n_samples=4, seed=seed, group="noeval", settings={"prune_after": pa},
                       prompt_tokens=(2048,) * 4)
        with store.engine.begin() as conn:
            from sqlalchemy import update

            from knormctl.store import Run, Sample
            conn.execute(update(Sample).where(Sample.run_id == run).values(ppl_compressed=None, ppl_context=None))
            conn.execute(update(Run).where(Run.id == run).values(
                config_json=store.get_run(run).config_json | {"eval_tokens": 0}))
    data = _json(db, "--group", "noeval")
    assert {b["na"] for b in data["best_at_budget"]} == {"N/A: no perplexity measured (eval_tokens = 0)"}
    res = runner.invoke(app, ["report", "--db", db, "--group", "noeval"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "no configuration fits" not in res.stdout
    assert res.stdout.count("smollm2-135m: N/A: no perplexity measured (eval_tokens = 0)") == 1


def test_a_study_with_planned_runs_not_stored_says_which(store, db):
    """An interrupted study's report covered the runs it had and did not say a planned run
    never ran: the frontier and budgets looked final."""
    from sqlalchemy import update

    from knormctl.store import Run

    runs = _study(store)
    for index, run_id in enumerate(sorted(runs.values())):  # what a study file stores with each run
        cfg = store.get_run(run_id).config_json | {"study": {"name": "s1", "runs": 6, "index": index + (index > 1)}}
        with store.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(config_json=cfg))
    data = _json(db, "--group", "s1")
    assert data["planned_runs"] == 6 and data["missing_runs"] == [3, 6]
    res = runner.invoke(app, ["report", "--db", db, "--group", "s1"], env={"COLUMNS": "200"})
    # the command names the database the report read: copied as printed it continues this study
    assert ("study s1: 4 of 6 planned runs (run 3, 6 of the plan not stored yet: knormctl sweep --resume-group s1 "
            f"--db {db})") in res.stdout
    shared = runner.invoke(app, ["report", "--db", db, "--group", "s1", "--format", "markdown"]).stdout
    assert "--resume-group s1)" in shared and db not in shared  # a file to share holds no local path


def test_missing_runs_are_those_of_the_newest_plan(store, db):
    """A study file extended under the same name: runs of the older plan that the newer one
    keeps are not missing, whatever their place in the older plan."""
    from sqlalchemy import update

    from knormctl.store import Run
    from knormctl.study import key_id

    runs = sorted(_study(store).values())
    old_plan = {"name": "s1", "runs": 2, "key_ids": ["k0", "k1"]}
    new_plan = {"name": "s1", "runs": 5, "key_ids": [key_id(f"k{i}") for i in range(5)]}
    for i, run_id in enumerate(runs):
        plan = (old_plan if i < 2 else new_plan) | {"index": i, "key": f"k{i}"}
        cfg = store.get_run(run_id).config_json | {"study": plan}
        with store.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(config_json=cfg))
    data = _json(db, "--group", "s1")
    assert data["planned_runs"] == 5 and data["missing_runs"] == [5]


def test_a_study_with_one_run_stored_reads_as_the_study_and_names_the_missing_ones(store, db):
    """One run stored, the next interrupted before it stored anything: the group read as a
    plain summary (another json form than the study's, another figure), and said nothing of
    the planned runs that never ran."""
    from sqlalchemy import update

    from knormctl.store import Run
    from knormctl.study import key_id

    run_id = fill_run(store, configs=CONFIGS, n_samples=4, group="s9")
    cfg = store.get_run(run_id).config_json | {"study": {"name": "s9", "runs": 3, "index": 0, "key": "k0",
                                                         "key_ids": [key_id(f"k{i}") for i in range(3)]}}
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(config_json=cfg))
    res = runner.invoke(app, ["report", "--db", db, "--group", "s9", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # the study's form, as it will be once more runs are stored
    assert data["study"] == "s9" and data["planned_runs"] == 3 and data["missing_runs"] == [2, 3]
    assert {p["run_id"] for p in data["points"]} == {run_id}
    text = runner.invoke(app, ["report", "--db", db, "--group", "s9"], env={"COLUMNS": "200"}).stdout
    assert ("study s9: 1 of 3 planned runs (run 2, 3 of the plan not stored yet: knormctl sweep --resume-group s9 "
            f"--db {db})") in text


def test_frontier_and_best_per_budget_follow_the_points(store, db):
    _study(store)
    data = _json(db, "--group", "s1")
    for model in data["models"]:
        pts = [p for p in data["points"] if p["model"] == model]
        hand = frontier([Point(f'{p["run_id"]}|{p["config_key"]}', "", p["kv_held"], p["quality"]) for p in pts],
                        higher_quality=False)
        assert {f'{p["run_id"]}|{p["config_key"]}' for p in pts if p["on_frontier"]} == \
            {q.key for q in hand}
        for b in (x for x in data["best_at_budget"] if x["model"] == model):
            fits = [p for p in pts if p["kv_held"] <= b["budget"]]
            assert b["best"]["quality"] == min(p["quality"] for p in fits)
    # 25 % budget: only random 0.25 (and nothing else) holds that little KV in this data
    assert all(b["best"]["label"] == "random 0.25" for b in data["best_at_budget"] if b["budget"] == 0.25)


def test_the_leaderboard_holds_each_press_and_keep_ratios_best_run(store, db):
    """Per press, model and keep ratio the leaderboard names the study's best point (lowest
    perplexity ratio) across the runs' settings, not its worst."""
    _study(store)
    data = _json(db, "--group", "s1")
    for press, by_model in data["leaderboard"].items():
        for model, by_kr in by_model.items():
            for kr, best in by_kr.items():
                rivals = [p["quality"] for p in data["points"] if p["press"] == press and p["model"] == model
                          and p["keep_ratio"] == float(kr) and p["quality"] is not None]
                assert len(rivals) == 2 and best["quality"] == min(rivals)  # one point per prune_after


def test_the_leaderboard_is_per_scale_as_the_frontier(store, db):
    """A float32 run's ratios are to a float32 full cache: the leaderboard took each press's best
    over both dtypes into one row, under the model's name, without saying which dtype won."""
    for seed, dtype in enumerate(("float32", "bfloat16")):
        fill_run(store, configs=CONFIGS, n_samples=4, seed=seed, dtype=dtype, group="dt",
                 prompt_tokens=(2048,) * 4)
    data = _json(db, "--group", "dt")
    assert set(data["leaderboard"]["knorm"]) == set(data["scales"]) and len(data["scales"]) == 2
    for press, by_scale in data["leaderboard"].items():
        for scale, by_kr in by_scale.items():
            for kr, best in by_kr.items():
                own = [p for p in data["points"] if p["scale"] == scale and p["press"] == press
                       and p["keep_ratio"] == float(kr)]
                assert len(own) == 1 and best["run_id"] == own[0]["run_id"] and best["scale"] == scale
    out = runner.invoke(app, ["report", "--db", db, "--group", "dt"], env={"COLUMNS": "120"}).stdout
    for scale in data["scales"]:
        assert f"leaderboard, {scale}: ppl ratio at each keep ratio" in out, out


def test_the_leaderboard_names_the_setting_that_won_and_not_a_lucky_prompt(store, db):
    """Runs differing in prune_after (one scale): the board names the winning prune_after, and
    a setting an interrupted run measured on fewer prompts does not win on them."""
    configs = (Cfg(), Cfg("knorm", 0.5))
    full = fill_run(store, configs=configs, n_samples=4, group="lb", settings={"prune_after": 256},
                    prompt_tokens=(2048,) * 4)
    cut = fill_run(store, configs=configs, n_samples=4, seed=1, group="lb", settings={"prune_after": 512},
                   prompt_tokens=(2048,) * 4, status="interrupted", stop_after=4)
    data = _json(db, "--group", "lb")
    knorm = {p["run_id"]: p for p in data["points"] if p["label"] == "knorm 0.5"}
    # the case: the interrupted run's setting looks better, on fewer prompts
    assert knorm[cut]["n_prompts"] < knorm[full]["n_prompts"] and knorm[cut]["quality"] < knorm[full]["quality"]
    assert data["leaderboard"]["knorm"]["smollm2-135m"]["0.5"]["run_id"] == full
    out = runner.invoke(app, ["report", "--db", db, "--group", "lb"], env={"COLUMNS": "120"}).stdout
    assert "prune_after=256" in out.split("leaderboard")[1], out
    md = runner.invoke(app, ["report", "--db", db, "--group", "lb", "--format", "markdown"]).stdout
    row = next(line for line in md.split("**leaderboard")[1].splitlines() if line.startswith("| knorm |"))
    assert "prune_after=256" in row, row
    # the frontier and the budget lines choose among the same points: they named the lucky one
    assert not knorm[cut]["on_frontier"]
    assert all(b["best"]["run_id"] == full for b in data["best_at_budget"] if b["best"] is not None)


def test_an_accuracy_study_picks_the_higher_accuracy(store, db):
    """Question tasks: the frontier and the best per budget take the HIGHER accuracy (with the
    perplexity rule they would recommend the configuration that answers worst)."""
    configs = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"), Cfg("random", 0.5, mode="prefill"))
    for run_seed, depths in enumerate(([0.9], [0.1])):
        fill_run(store, task="passkey", group="acc", configs=configs, n_samples=6, seed=run_seed, depths=depths,
                 settings={"task": "passkey", "passkey_depths": depths})
    data = _json(db, "--group", "acc")
    assert data["quality_higher_is_better"] is True
    for scale in data["scales"]:
        pts = [p for p in data["points"] if p["scale"] == scale]
        half = [p for p in pts if p["kv_held"] <= 0.5]
        [b] = [x for x in data["best_at_budget"] if x["scale"] == scale and x["budget"] == 0.5]
        assert b["best"]["quality"] == max(p["quality"] for p in half)
    # knorm answers at depth 0.9 (passkey_score), random never: the 0.9 run's best at half the KV is knorm
    knorm_run = [b for b in data["best_at_budget"] if b["budget"] == 0.5 and "0.9" in b["scale"]]
    assert [b["best"]["label"] for b in knorm_run] == ["knorm 0.5"]


def test_a_setting_that_changes_the_full_cache_gets_its_own_frontier_and_budgets(store, db, tmp_path):
    """dtype halves the full cache's bytes: a bfloat16 run's 100% is a float32 run's 50%, so one
    frontier over both runs' ratios would compare percentages of different caches."""
    for seed, dtype in enumerate(("float32", "bfloat16")):
        for pa in (256, 1024):
            fill_run(store, configs=CONFIGS, n_samples=4, seed=seed * 2 + pa, dtype=dtype, group="dt",
                     settings={"prune_after": pa}, prompt_tokens=(2048,) * 4)
    data = _json(db, "--group", "dt")
    assert data["axes"] == ["dtype", "prune_after"] and data["models"] == ["smollm2-135m"]
    assert data["scales"] == ["smollm2-135m (dtype=bfloat16)", "smollm2-135m (dtype=float32)"]
    for scale in data["scales"]:
        pts = [p for p in data["points"] if p["scale"] == scale]
        assert len(pts) == 2 * len(CONFIGS) and len({p["settings"]["dtype"] for p in pts}) == 1
        hand = frontier([Point(f'{p["run_id"]}|{p["config_key"]}', "", p["kv_held"], p["quality"]) for p in pts],
                        higher_quality=False)
        assert {f'{p["run_id"]}|{p["config_key"]}' for p in pts if p["on_frontier"]} == {q.key for q in hand}
        lines = [b for b in data["best_at_budget"] if b["scale"] == scale]
        assert len(lines) == 4 and all(b["best"] is None or b["best"]["scale"] == scale for b in lines)
    out = runner.invoke(app, ["report", "--db", db, "--group", "dt"], env={"COLUMNS": "200"}).stdout
    assert "smollm2-135m (dtype=bfloat16), KV held \u2264 50% of its full cache:" in out
    assert "frontiers and budgets per model and dtype" in " ".join(out.split())
    csv = runner.invoke(app, ["report", "--db", db, "--group", "dt", "--format", "csv"]).stdout
    assert csv.splitlines()[0].startswith("model,dtype,prune_after,scale,run_id,")
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    with open_store(db, readonly=True) as store_ro:
        view = study_view(store_ro, select_runs(store_ro, group="dt"), "dt")
    fig = pareto(view)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split(":")[0] for t in titles[::2]] == data["scales"]  # a row of panels per scale
    fronts = {line.get_gid() for ax in fig.axes for line in ax.lines if (line.get_gid() or "").endswith("|frontier")}
    assert fronts == {f"pareto|{scale}|frontier" for scale in data["scales"]}


def test_study_tables_leaderboard_and_sentences(store, db):
    _study(store)
    res = runner.invoke(app, ["report", "--db", db, "--group", "s1"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "smollm2-135m" in out and "tiny-llama" in out and "prune_after" in out
    assert "leaderboard" in out and "best configuration per memory budget" in out
    assert "KV held \u2264 50% of the full cache:" in out
    md = runner.invoke(app, ["report", "--db", db, "--group", "s1", "--format", "markdown"]).stdout
    assert md.count("| prune_after | configuration |") == 2  # one table per model



@pytest.mark.parametrize("width", [80, 120])
def test_the_frontier_mark_survives_a_narrow_terminal(store, db, width):
    _study(store)
    on_front = {(str(p["settings"]["prune_after"]), p["label"]) for p in _json(db, "--group", "s1")["points"]
                if p["on_frontier"] and p["model"] == "tiny-llama"}
    res = runner.invoke(app, ["report", "--db", db, "--group", "s1"], env={"COLUMNS": str(width)})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= width
    table = lines[next(i for i, line in enumerate(lines) if line.strip() == "tiny-llama"):]
    marked = {(cells[0], " ".join(cells[1:cells.index("*")])) for cells in (line.split() for line in table)
              if "*" in cells and cells[0].isdigit()}
    assert marked == on_front and on_front


def test_plot_group_draws_the_pareto_chart_with_the_reports_points(store, db, tmp_path):
    _study(store)
    res = runner.invoke(app, ["plot", "--db", db, "--group", "s1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("knormpress_pareto.png") and (tmp_path / "knormpress_pareto.png").exists()
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    with open_store(db, readonly=True) as store_ro:
        view = study_view(store_ro, select_runs(store_ro, group="s1"), "s1")
    fig = pareto(view)
    drawn = {}
    for ax in fig.axes:
        for coll in ax.collections:
            gid = coll.get_gid() or ""
            if gid.startswith("pareto|") and "|kv_held|" in gid:
                drawn[gid.split("|kv_held|")[1]] = tuple(coll.get_offsets()[0])
    data = _json(db, "--group", "s1")
    assert len(drawn) == len(data["points"])
    for p in data["points"]:
        x, y = drawn[f'{p["run_id"]}|{p["config_key"]}']
        assert abs(x - p["kv_held"] * 100) < 1e-9 and abs(y - p["quality"]) < 1e-9


def test_the_pareto_chart_keeps_titles_clear_of_the_legend_and_labels_inside_their_panels(store, db):
    """A scale named by its settings ('smollm2-135m (task=niah, needle_depths=0.2)') made a
    title that ran under the legend, and the full cache's label at 100% ran off the panel."""
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    for depths, lengths in (([0.1], [4096, 8192]), ([0.9], [16384, 32768])):
        fill_run(store, task="niah", group="long", configs=(Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")),
                 settings={"task": "niah", "needle_depths": depths, "context_lengths": lengths})
    with open_store(db, readonly=True) as store_ro:
        view = study_view(store_ro, select_runs(store_ro, group="long"), "long")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = pareto(view)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    [legend] = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not ax.title.get_window_extent(renderer).overlaps(box), ax.get_title()
        panel = ax.get_window_extent(renderer)
        for text in ax.texts:  # the frontier's labels
            label = text.get_window_extent(renderer)
            assert panel.x0 <= label.x0 and label.x1 <= panel.x1, text.get_text()


def test_a_flag_line_over_several_runs_says_whose_numbers_it_quotes(store, db):
    """'runs 1, 2 (ttft artifact): knorm 0.5: TTFT 45.8% lower...' quoted run 1's configuration
    and numbers as if both runs had them; run 2's own artifacts were not mentioned."""
    knorm, streaming = Cfg("knorm", 0.5).pc.key, Cfg("streaming", 0.5).pc.key
    a = fill_run(store, configs=CONFIGS, n_samples=4, group="fl", settings={"prune_after": 256},
                 ttft_factor={knorm: 0.5})
    fill_run(store, configs=CONFIGS, n_samples=4, seed=1, group="fl", settings={"prune_after": 1024},
             ttft_factor={streaming: 0.5})
    res = runner.invoke(app, ["report", "--db", db, "--group", "fl", "--format", "markdown"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if "(ttft artifact)" in x)
    assert line.startswith(f"- runs {a}, {a + 1} (ttft artifact): in run {a}, knorm 0.5: TTFT "), line
    assert line.endswith("(1 more differ; each run's own: knormctl report --run-id N)"), line  # no local path
    table = " ".join(runner.invoke(app, ["report", "--db", db, "--group", "fl"], env={"COLUMNS": "200"}).stdout.split())
    assert f"(1 more differ; each run's own: knormctl report --run-id N --db {db})" in table
    own = _json(db, "--run-id", str(a))["flags"]
    quoted = line.split(f"in run {a}, ", 1)[1].rsplit(" (1 more differ", 1)[0]
    assert quoted in [f["message"] for f in own if f["kind"] == "ttft_artifact"]


def test_the_count_of_other_messages_counts_each_message_once(store, db):
    """Two runs with the same two full-cache-path messages said '3 more differ': it counted (run,
    message) pairs, not messages."""
    configs = (Cfg(), Cfg("knorm", 1.0), Cfg("streaming", 1.0))
    for i, pa in enumerate((256, 1024)):
        fill_run(store, configs=configs, n_samples=4, seed=i, group="same", settings={"prune_after": pa})
    res = runner.invoke(app, ["report", "--db", db, "--group", "same", "--format", "markdown"])
    line = next(x for x in res.stdout.splitlines() if "(full cache path)" in x)
    assert "(1 more differ;" in line, line


def test_a_printed_value_is_never_outside_its_printed_interval():
    """'1.149 [1.15,1.16]': the value rounded to 3 decimals, its interval's ends to 2, both to nearest."""
    from types import SimpleNamespace

    from knormctl.render.study import fmt_quality

    ppl, acc = SimpleNamespace(higher_quality=False), SimpleNamespace(higher_quality=True)
    assert fmt_quality(ppl, 1.14856, (1.14744, 1.15916)) == "1.149 [1.14,1.16]"
    assert fmt_quality(ppl, 1.006, (1.0051, 1.0089)) == "1.006 [1.00,1.01]"
    assert fmt_quality(ppl, 1.5, (1.2, 1.7)) == "1.500 [1.20,1.70]"  # exact ends stay as they are
    assert fmt_quality(acc, 0.62, (0.616, 0.702)) == "62% [61,71]"


def test_a_study_of_two_tasks_varies_only_in_what_each_runs_task_reads(store, db):
    """A passkey run stores needle_depths at its default and a niah run passkey_lengths at theirs
    (options their tasks ignore): the report listed both as axes and labelled each run with
    the other task's settings."""
    fill_run(store, task="passkey", group="pk", configs=(Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")),
             settings={"task": "passkey", "passkey_lengths": [256], "needle_depths": [0.0, 0.5, 1.0]})
    for depths in ([0.1], [0.9]):
        fill_run(store, task="niah", group="pk", configs=(Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")),
                 settings={"task": "niah", "passkey_lengths": [1024, 2048], "needle_depths": depths})
    data = _json(db, "--group", "pk")
    assert data["axes"] == ["task", "needle_depths"]  # passkey_lengths differs only where no one reads it
    # settings typed in json; None where the run's task does not read it
    assert sorted(p["settings"]["needle_depths"] for p in data["points"] if p["settings"]["task"] == "niah") == [
        [0.1], [0.1], [0.9], [0.9]]
    assert {p["settings"]["needle_depths"] for p in data["points"] if p["settings"]["task"] == "passkey"} == {None}
    text = runner.invoke(app, ["report", "--db", db, "--group", "pk"], env={"COLUMNS": "80"}).stdout
    assert "passkey_lengths" not in text and "varying: task, needle_depths" in text
    # the leaderboard's title wraps at the terminal's width, not at its narrow table's
    title = next(line for line in text.splitlines() if line.startswith("leaderboard, smollm2-135m (task=passkey)"))
    assert len(title.rstrip()) > 70, text
    # the passkey run's scale is named by what it varies in: no "needle_depths=-"
    assert "needle_depths=-" not in text and "(task=passkey)" in text, text


def test_scales_of_list_settings_are_ordered_by_value_not_text(store, db):
    """Context lengths [16384], [4096], [8192] were listed in that (text) order."""
    for lengths in ([16384], [4096], [8192]):
        fill_run(store, task="niah", group="ctx", configs=(Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")),
                 settings={"task": "niah", "context_lengths": lengths})
    scales = _json(db, "--group", "ctx")["scales"]
    assert [s.split("context_lengths=")[1].rstrip(")") for s in scales] == ["4096", "8192", "16384"], scales


def test_a_pareto_panel_of_an_interrupted_run_says_so(store, db):
    """An interrupted run that stored only its full-cache cells drew one unexplained point at
    (100, 1) in its row of panels; the row now says which run stopped and how far it got."""
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    fill_run(store, configs=CONFIGS, n_samples=4, seed=1, model="smollm2-135m", group="pa",
             settings={"prune_after": 0})
    stopped = fill_run(store, configs=CONFIGS, n_samples=4, seed=2, model="tiny-llama", group="pa",
                       settings={"prune_after": 0}, stop_after=1, status="interrupted")
    with open_store(db, readonly=True) as store_ro:
        view = study_view(store_ro, select_runs(store_ro, group="pa"), "pa")
    notes = {}
    for ax in pareto(view).axes:
        for text in ax.texts:
            if (text.get_gid() or "").endswith("|status"):
                notes.setdefault(text.get_gid().split("|")[1], []).append(text.get_text())
    assert set(notes) == {"tiny-llama"}  # the complete run's panels carry no note
    assert notes["tiny-llama"] == [f"only the full cache stored\nrun {stopped} interrupted: 1 of 20 planned cells"] * 2


def test_study_tables_list_keep_ratios_from_the_largest_down(store, db):
    """Guards against (leaderboard columns ascending), (full cache row sorted among the presses) and
    (a press's settings ascending in the per-model table): both orders are the report's documented reading order, full cache first."""
    configs = (Cfg(), Cfg("knorm", 0.9), Cfg("knorm", 0.5), Cfg("knorm", 0.25))
    for seed, model in enumerate(("smollm2-135m", "tiny-llama")):
        fill_run(store, configs=configs, n_samples=4, seed=seed, model=model, group="ord", prompt_tokens=(2048,) * 4)
    md = runner.invoke(app, ["report", "--db", db, "--group", "ord", "--format", "markdown"]).stdout
    board = next(ln for ln in md.splitlines() if ln.startswith("| press |"))
    keeps = [float(c.strip().removeprefix("keep ")) for c in board.strip("|").split("|")[1:]]
    assert keeps == sorted(keeps, reverse=True) and len(keeps) == 4
    lines = md.splitlines()
    first_row = lines[lines.index(board) + 2]
    assert first_row.startswith("| full cache |"), first_row  # the full cache heads the leaderboard
    labels = [ln.split("|")[1].strip() for ln in md.splitlines()
              if ln.startswith(("| full cache", "| knorm"))]
    first_table = labels[:4]
    assert first_table == ["full cache", "knorm 0.9", "knorm 0.5", "knorm 0.25"], labels


def test_study_csv_intervals_hold_their_values(store, db):
    """Guards against (the csv's *_ci_lo and *_ci_hi swapped): each interval in the study csv is low, then high."""
    import csv
    import io

    for seed, model in enumerate(("smollm2-135m", "tiny-llama")):
        fill_run(store, configs=(Cfg(), Cfg("knorm", 0.5), Cfg("random", 0.5)), n_samples=6, seed=seed,
                 model=model, group="civ", prompt_tokens=(2048,) * 6)
    text = runner.invoke(app, ["report", "--db", db, "--group", "civ", "--format", "csv"]).stdout
    recs = [r for r in csv.DictReader(io.StringIO(text)) if r["config_key"] != REFERENCE_KEY]
    assert recs
    for r in recs:
        for value, lo, hi in (("quality", "quality_ci_lo", "quality_ci_hi"), ("kv_held", "kv_ci_lo", "kv_ci_hi"),
                              ("tpot_ratio", "tpot_ci_lo", "tpot_ci_hi")):
            if r[lo]:
                assert float(r[lo]) <= float(r[value]) <= float(r[hi]), (r["label"], value, r[lo], r[hi])
    assert any(r["quality_ci_lo"] and float(r["quality_ci_lo"]) < float(r["quality_ci_hi"]) for r in recs)


def test_the_pareto_line_joins_only_the_frontier(store, db):
    """Guards against (the dashed frontier joined every point): the line's vertices are the points the json
    marks on_frontier, by KV held."""
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    configs = (Cfg(), Cfg("knorm", 0.9), Cfg("knorm", 0.5), Cfg("random", 0.5), Cfg("random", 0.25))
    for seed, model in enumerate(("smollm2-135m", "tiny-llama")):
        fill_run(store, configs=configs, n_samples=4, seed=seed, model=model, group="pf", prompt_tokens=(2048,) * 4)
    data = _json(db, "--group", "pf")
    with open_store(db, readonly=True) as ro:
        view = study_view(ro, select_runs(ro, group="pf"), "pf")
    fig = pareto(view)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines if (ln.get_gid() or "").endswith("|frontier")}
    assert len(lines) == 2
    for scale in data["scales"]:
        front = sorted((p for p in data["points"] if p["scale"] == scale and p["on_frontier"]),
                       key=lambda p: p["kv_held"])
        assert len(front) < len([p for p in data["points"] if p["scale"] == scale])
        line = lines[f"pareto|{scale}|frontier"]
        assert list(line.get_xdata()) == pytest.approx([p["kv_held"] * 100 for p in front])


def test_a_points_n_counts_the_prompts_its_ratio_rests_on(store, db):
    """An interrupted run's configuration measured on prompts its full cache had not reached:
    the study table said n=2 for a ratio over the 1 prompt both have."""
    configs = (Cfg("knorm", 0.5), Cfg())  # stopped after 3 cells: knorm on 2 prompts, the full cache on 1
    fill_run(store, configs=configs, group="st", settings={"prune_after": 256})
    cut = fill_run(store, configs=configs, group="st", seed=1, settings={"prune_after": 512}, status="interrupted",
                   stop_after=3)
    points = {(p["run_id"], p["label"]): p for p in _json(db, "--group", "st")["points"]}
    own = _json(db, "--run-id", str(cut))["rows"]
    knorm = next(r for r in own if r["label"] == "knorm 0.5")
    assert knorm["n_pairs"]["ppl_compressed"] < knorm["n_prompts"]  # the case: fewer pairs than prompts
    assert points[(cut, "knorm 0.5")]["n_prompts"] == knorm["n_pairs"]["ppl_compressed"]
    assert points[(cut, "full cache")]["n_prompts"] == next(r for r in own if r["is_reference"])["n_prompts"]


@pytest.mark.parametrize("axes", [{"prune_after": (256, 1024)},
                                  {"prune_after": (256, 1024), "keep_recent": (0, 8), "skip_layers": ("0", "none")}])
def test_study_tables_at_80_columns_cut_no_number_and_no_frontier_mark(store, db, axes):
    """Two axes (a dtype and a budget) and expected-attention's long name: at 80 columns rich
    cut 'KV h…', '[0.99,1.…', 'expected-attention 0.…' (its frontier mark with it) and dropped
    the n column. The metrics now split over tables, each repeating the keys; four axes share
    one column."""
    configs = (Cfg(), Cfg("expected-attention", 0.5), Cfg("knorm", 0.25))
    import itertools

    names = list(axes)
    for seed, (dtype, *values) in enumerate(itertools.product(("float32", "bfloat16"), *axes.values())):
        fill_run(store, configs=configs, n_samples=4, seed=seed, dtype=dtype, group="w", prompt_tokens=(2048,) * 4,
                 settings=dict(zip(names, values)))
    data = _json(db, "--group", "w")
    res = runner.invoke(app, ["report", "--db", db, "--group", "w"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert max(len(line) for line in out.splitlines()) <= 80 and "\u2026" not in out, out
    tables = out.split("leaderboard,")[0]
    words = tables.split()
    for p in data["points"]:  # every number of every point is printed whole
        for key, iv in (("quality", "quality_interval"), ("kv_held", "kv_interval"), ("tpot_ratio", "tpot_interval")):
            shown = f"{p[key]:.3f}" if key == "quality" else f"{p[key] * 100:.0f}%"
            assert shown in words, (p["label"], key, shown)
    n_tables = sum(line.startswith("smollm2-135m") for line in tables.splitlines())
    on_front = sum(p["on_frontier"] for p in data["points"])
    assert n_tables > 1 and on_front and words.count("*") == on_front * n_tables  # each table marks them all


def test_a_scale_whose_full_cache_failed_says_so_and_keeps_the_figures_legend(store, db):
    """Every full-cache cell of the bfloat16 run failed (out of memory) while its compressed
    cells ran: the budget line said 'no perplexity stored (every evaluation failed)', the full
    cache still read KV held 100%, and the figure, whose legend came from the first panel only,
    lost its whole legend."""
    for seed, dtype in enumerate(("float32", "bfloat16")):
        fill_run(store, configs=CONFIGS, n_samples=4, seed=seed, dtype=dtype, group="oom", prompt_tokens=(2048,) * 4,
                 fail=(None, "none") if dtype == "bfloat16" else None)
    data = _json(db, "--group", "oom")
    bf16 = "smollm2-135m (dtype=bfloat16)"
    assert data["scales"][0] == bf16
    na = {b["na"] for b in data["best_at_budget"] if b["scale"] == bf16}
    assert na == {"N/A: the full cache finished no cell (every ratio is to it: see the runs' errors)"}
    ref = next(p for p in data["points"] if p["scale"] == bf16 and p["is_reference"])
    assert ref["kv_held"] is None and ref["tpot_ratio"] is None and ref["n_prompts"] == 0
    assert all(b["best"] is not None for b in data["best_at_budget"] if b["scale"] != bf16 and b["budget"] == 1.0)
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    with open_store(db, readonly=True) as store_ro:
        fig = pareto(study_view(store_ro, select_runs(store_ro, group="oom"), "oom"))
    [legend] = fig.legends
    assert {t.get_text() for t in legend.get_texts()} >= {"full cache", "knorm", "streaming", "random"}
    [why] = [t for ax in fig.axes for t in ax.texts if t.get_gid() == f"pareto|{bf16}|kv_held|na"]
    assert "finished no cell" in why.get_text() and max(len(line) for line in why.get_text().splitlines()) <= 60


def test_a_point_without_a_kv_ratio_does_not_push_a_placeable_rival_off_the_frontier(store, db):
    """Passkey, two prune_after runs: run 1's full cache failed everywhere (its accuracies have no
    KV ratio), run 2 was interrupted (fewer prompts). Run 1's knorm 0.5 won the 'most prompts'
    rivalry and then could not be placed: the table showed a 50% point while the 50% budget
    said 'no configuration fits'."""
    configs = (Cfg(), Cfg("knorm", 0.5))
    fill_run(store, configs=configs, task="passkey", n_samples=4, group="q", prompt_tokens=(2048,) * 4,
             settings={"prune_after": 256}, fail=(None, "none"))
    cut = fill_run(store, configs=configs, task="passkey", n_samples=4, seed=1, group="q", prompt_tokens=(2048,) * 4,
                   settings={"prune_after": 1024}, stop_after=6, status="interrupted")
    data = _json(db, "--group", "q")
    knorm = {p["run_id"]: p for p in data["points"] if p["label"] == "knorm 0.5"}
    assert knorm[cut]["kv_held"] is not None and knorm[cut]["on_frontier"]
    half = next(b for b in data["best_at_budget"] if b["budget"] == 0.5)
    assert half["best"] is not None and half["best"]["run_id"] == cut and half["best"]["label"] == "knorm 0.5"
    assert data["leaderboard"]["knorm"]["smollm2-135m"]["0.5"]["run_id"] == cut


def test_the_figure_names_the_full_cache_once_and_the_leaderboard_folds_a_long_setting(store, db):
    """Full caches of runs differing only in press-only settings are one point, tied on the
    frontier: the figure labelled it 'full cache' three times over. A winning setting with no
    space in it ('skip_layers=0,1,...,19') was cut with an ellipsis at 80 columns."""
    configs = (Cfg(), Cfg("knorm", 0.5))
    long = list(range(20))
    for seed, skip in ((0, [0]), (5, long), (2, [1])):  # seed 5: the long list's knorm 0.5 wins
        fill_run(store, configs=configs, n_samples=4, seed=seed, group="sk", prompt_tokens=(2048,) * 4,
                 settings={"skip_layers": skip})
    data = _json(db, "--group", "sk")
    assert sum(p["on_frontier"] for p in data["points"] if p["is_reference"]) == 3  # the case: three tied
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render.figures.pareto import pareto
    from knormctl.store import open_store

    with open_store(db, readonly=True) as store_ro:
        view = study_view(store_ro, select_runs(store_ro, group="sk"), "sk")
    fig = pareto(view)
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_gid() == "pareto|label")]
    assert texts.count("full cache") == 1, texts
    winner = data["leaderboard"]["knorm"]["smollm2-135m"]["0.5"]
    out = runner.invoke(app, ["report", "--db", db, "--group", "sk"], env={"COLUMNS": "80"}).stdout
    assert "\u2026" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert winner["settings"]["skip_layers"] == long  # the case: the long setting is the one shown
    board = "".join(out.split("leaderboard,")[1].split("best configuration")[0].split())
    assert "skip_layers=" + ",".join(map(str, long)) in board  # whole, folded over lines


def test_merged_settings_keep_list_values_apart():
    """Settings that share one column are joined with ' | ': skip_layers=[0] and keep_recent=1
    read '0, 1', as if skip_layers were '0,1'."""
    from rich.console import Console

    from knormctl.render.study import StudyPoint, StudyView
    from knormctl.render.study_output import print_study

    settings = {"skip_layers": "0", "keep_recent": "1", "prune_after": "256", "n_sink": "4"}
    p = StudyPoint(model="m" * 30, scale="m" * 30, run_id=1, settings=settings, order=(), config_key="none",
                   label="full cache", press="none", keep_ratio=1.0, is_reference=True, n_prompts=4, quality=1.0,
                   quality_interval=(1.0, 1.0), kv_held=1.0, kv_interval=(1.0, 1.0), tpot_ratio=1.0,
                   tpot_interval=(1.0, 1.0), on_frontier=True)
    view = StudyView(name="x", quality_kind="ppl ratio", higher_quality=False, axes=list(settings), models=[p.model],
                     scales=[p.scale], scale_axes=[], points=[p], best=[], leaderboard={})
    console = Console(width=60, record=True)
    print_study(view, console)
    text = console.export_text()
    assert "0 | 1 | 256 | 4" in text and "skip_layers | keep_recent" in " ".join(text.split()), text


def test_a_run_that_stored_no_cell_is_named_not_dropped(store, db):
    """A study run that failed before its first cell vanished: its model left the 'models:'
    line (empty when no run had cells) and its scale had no budget line at all."""
    fill_run(store, configs=CONFIGS, n_samples=4, group="nc", prompt_tokens=(2048,) * 4)
    failed = fill_run(store, configs=CONFIGS, n_samples=4, group="nc", model="tiny-llama", dtype="bfloat16",
                      stop_after=0, status="failed")
    data = _json(db, "--group", "nc")
    assert data["models"] == ["smollm2-135m", "tiny-llama"]
    lines = [b for b in data["best_at_budget"] if b["model"] == "tiny-llama"]
    assert lines and {b["na"] for b in lines} == {f"N/A: no cell stored (run {failed}: failed)"}
    out = " ".join(runner.invoke(app, ["report", "--db", db, "--group", "nc"], env={"COLUMNS": "80"}).stdout.split())
    assert "models: smollm2-135m, tiny-llama" in out and f"N/A: no cell stored (run {failed}: failed)" in out


def test_names_with_brackets_print_as_written(store, db):
    """Group and model names went through rich markup: 'exp [v2]' printed as 'exp' (two groups
    looked alike) and '[/x] g' ended the report with a MarkupError."""
    fill_run(store, n_samples=1, group="exp [v2]", model="[/bold]m:fire:")
    fill_run(store, n_samples=1, group="[/x] g")
    for args in (["--list"], ["--group", "exp [v2]"], ["--group", "[/x] g"], []):
        res = runner.invoke(app, ["report", "--db", db, *args], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (args, res.output)
        out = res.stdout
        assert ("[/x] g" if args in ([], ["--group", "[/x] g"]) else "exp [v2]") in out, (args, out)
    listed = runner.invoke(app, ["report", "--db", db, "--list"], env={"COLUMNS": "200"}).stdout
    assert "exp [v2]" in listed and "[/x] g" in listed and "[/bold]m:fire:" in listed
