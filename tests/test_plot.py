"""`knormctl plot` on hand-built stores: every figure is written at its size, decodes as an
image, differs between runs; what each figure draws (read back from its artists) equals
the report's json; colours follow the report's verdicts; legends stay off the data; N/A
data draws labelled empty panels, never warnings."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.colors import to_hex
from report_data import Cfg, fill_run
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.cli.report import load_samples

runner = CliRunner()
LM_FIGURES = ["comprehensive", "summary", "tradeoff", "table", "quality", "latency"]
TASK_CONFIGS = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"), Cfg("knorm", 0.2, mode="prefill"),
                Cfg("random", 0.5, mode="prefill"))


def plot(db, *args) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning (layout, empty data, fonts) fails the test
        result = runner.invoke(app, ["plot", "--db", db, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.exception is None
    return [Path(line) for line in result.stdout.splitlines()]


def report_json(db, *args):
    result = runner.invoke(app, ["report", "--db", db, *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def name_of(path: Path) -> str:
    return path.stem.removeprefix("knormpress_")


def summary_of(store, run_ids):
    """The Summary exactly as `plot` builds it."""
    from knormctl.render.summary import build_summary

    runs = [store.get_run(i) for i in run_ids]
    return build_summary(runs, load_samples(store, runs, blobs=True))


def check_png(path: Path, size_inches) -> None:
    from knormctl.render import figures

    assert path.is_file() and path.suffix == ".png"
    image = matplotlib.image.imread(path)
    width, height = (round(x * figures.DPI) for x in size_inches)
    assert image.shape[:2] == (height, width), path


def drawn(fig) -> dict[str, object]:
    """Every artist that carries a number, by its gid ("config_key|metric|kind")."""
    return {a.get_gid(): a for a in fig.findobj(lambda a: a.get_gid() is not None)}


def segment(artist) -> tuple[float, float]:
    (x0, y0), (x1, y1) = artist.get_segments()[0]
    return (y0, y1) if x0 == x1 else (x0, x1)


def spec(name):
    from knormctl.render import figures

    return next(f for f in figures.FIGURES if f.name == name)


# ------------------------------------------------------------------ files


def test_every_figure_is_written_at_its_size_and_differs_between_runs(store, db, tmp_path):
    a = fill_run(store, seed=1)
    b = fill_run(store, seed=2, fail=(1, Cfg("knorm", 0.7).pc.key))
    paths_a = plot(db, "--run-id", str(a), "--out", str(tmp_path / "a"))
    paths_b = plot(db, "--run-id", str(b), "--out", str(tmp_path / "b"))
    assert [name_of(p) for p in paths_a] == LM_FIGURES
    assert paths_a[0].name == "knormpress_comprehensive.png"  # the old visualize_results.py names
    sa, sb = summary_of(store, [a]), summary_of(store, [b])
    for pa, pb in zip(paths_a, paths_b):
        check_png(pa, spec(name_of(pa)).size(sa))
        check_png(pb, spec(name_of(pb)).size(sb))
        assert pa.read_bytes() != pb.read_bytes(), pa.name


def test_all_memory_na_and_single_configuration_draw_without_warnings(store, db, tmp_path):
    cases = {"na": fill_run(store, memory=False), "single": fill_run(store, configs=(Cfg(),)),
             "interrupted": fill_run(store, status="interrupted", stop_after=2),
             "empty": store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="x")}
    for name, run in cases.items():
        summary = summary_of(store, [run])
        for p in plot(db, "--run-id", str(run), "--out", str(tmp_path / name)):
            check_png(p, spec(name_of(p)).size(summary))


def test_task_run_adds_accuracy_and_needle_heatmap(store, db, tmp_path):
    run = fill_run(store, task="passkey", configs=TASK_CONFIGS, n_samples=6, prompt_tokens=(1024, 2048))
    paths = plot(db, "--run-id", str(run), "--out", str(tmp_path / "pk"))
    assert [name_of(p) for p in paths] == LM_FIGURES + ["accuracy", "needle_heatmap"]
    summary = summary_of(store, [run])
    for p in paths:
        check_png(p, spec(name_of(p)).size(summary))


def test_default_folder_last_run_and_svg(store, db, tmp_path, monkeypatch):
    fill_run(store)
    last = fill_run(store, seed=4)
    monkeypatch.chdir(tmp_path)
    paths = plot(db)
    assert all(p.parent == Path("knormctl-plots") / f"run-{last}" for p in paths)
    svgs = plot(db, "--last", "--format", "svg", "--out", str(tmp_path / "svg"))
    assert all(p.suffix == ".svg" and p.read_text().lstrip().startswith("<?xml") for p in svgs)


def test_group_plot_goes_to_a_group_folder(store, db, tmp_path, monkeypatch):
    fill_run(store, group="g", stop_after=6, status="interrupted")
    fill_run(store, group="g", seed=2)
    monkeypatch.chdir(tmp_path)
    paths = plot(db, "--group", "g")
    assert paths and all(p.parent == Path("knormctl-plots") / "group-g" for p in paths)


def test_a_group_name_with_slashes_stays_in_its_one_folder(store, db, tmp_path, monkeypatch):
    """A group named '../../esc' wrote its figures two folders up from ./knormctl-plots."""
    fill_run(store, group="../../esc")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    paths = plot(db, "--group", "../../esc")
    folder = Path("knormctl-plots") / ("group-.._.._esc-" + hashlib.sha256(b"../../esc").hexdigest()[:8])
    assert paths and all(p.parent == folder for p in paths)
    assert list(Path("knormctl-plots").iterdir()) == [folder]  # no stray "group-.."
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("r.db")) == ["cwd"]
    fill_run(store, group="a/b", seed=1)
    fill_run(store, group="a_b", seed=2)
    one, other = (plot(db, "--group", g)[0].parent for g in ("a/b", "a_b"))
    assert other == Path("knormctl-plots") / "group-a_b" and one != other  # neither overwrites the other's


def test_bad_input_is_one_line_and_exit_2(store, db, tmp_path):
    fill_run(store)
    result = runner.invoke(app, ["plot", "--db", db, "--run-id", "42"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"Error: run 42 does not exist in {db}"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, ["plot", "--db", db, "--out", str(afile)])
    assert result.exit_code == 2 and "is not a folder" in result.stderr


def test_a_failure_halfway_leaves_no_partial_set_and_a_full_disk_exits_1(store, db, tmp_path, monkeypatch):
    """A folder in a later figure's place, or a disk filling up after the first figure, left
    1-3 of 6 figures: beside an older run's figures, a mixed set. A full disk is a runtime
    failure (exit 1), not bad input."""
    import errno

    from matplotlib.figure import Figure

    run = fill_run(store)
    out = tmp_path / "figs"
    (out / "knormpress_table.png").mkdir(parents=True)  # in a later figure's place
    result = runner.invoke(app, ["plot", "--db", db, "--run-id", str(run), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"Error: cannot write figure {out / 'knormpress_table.png'}: Is a directory"
    assert sorted(p.name for p in out.iterdir()) == ["knormpress_table.png"]  # nothing new, no temporary file

    real, written = Figure.savefig, []

    def savefig(self, fname, *args, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(fname))
        written.append(fname)
        return real(self, fname, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    new = tmp_path / "new" / "figs"
    result = runner.invoke(app, ["plot", "--db", db, "--run-id", str(run), "--out", str(new)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (f"Error: cannot write figure {new / 'knormpress_summary.png'}: "
                                     "No space left on device")
    assert not (tmp_path / "new").exists()  # the folders it made are gone again


def test_figures_of_an_unfinished_run_say_so_and_a_group_points_to_its_report(store, db):
    """A shared PNG of an interrupted run read as a finished one; a group's table figure sent
    readers to one shard's report (other numbers, other flags)."""
    from knormctl.render import figures

    cut = fill_run(store, status="interrupted", stop_after=7)
    done = fill_run(store, seed=2)
    for run, second in ((cut, "INTERRUPTED: 7 of 15 planned cells"), (done, None)):
        summary = summary_of(store, [run])
        for spec_ in figures.figures_for(summary):
            fig = spec_.draw(summary)
            lines = fig.get_suptitle().split("\n")
            assert lines[0].endswith(f"run {run}, smollm2-135m"), lines
            assert (second in lines) if second else not any("planned cells" in line for line in lines), lines
    a = fill_run(store, group="shg", samples=[0, 1], tpot_factor={"knorm|kr=0.5": 1.5})
    b = fill_run(store, group="shg", samples=[2], seed=3)
    from knormctl.render.summary import build_summary

    runs = [store.get_run(a), store.get_run(b)]
    summary = build_summary(runs, load_samples(store, runs, blobs=True))
    assert summary.flags
    fig = spec("table").draw(summary)
    from matplotlib.text import Text

    text = " ".join(t.get_text() for t in fig.findobj(Text))
    assert "run `knormctl report --group shg` to read them" in " ".join(text.split())


def test_the_dashed_full_model_line_is_the_full_caches_number_and_a_failed_row_says_why(store, db):
    """The dashed line was the lowest of every configuration's medians, not the full cache's
    (they differ where configurations cover other prompts: an interrupted run). A configuration
    whose every cell failed showed a bare 'N/A' on the axis border, and was flagged as covering
    'the 0 prompts both have'."""
    from matplotlib.text import Text

    from knormctl.render.figures import speed

    cut = fill_run(store, n_samples=4, stop_after=12, status="interrupted", seed=5)
    data = report_json(db, "--run-id", str(cut))
    full = next(r for r in data["rows"] if r["is_reference"])["values"]["ppl_compressed"]
    others = [r["values"]["ppl_compressed"] for r in data["rows"] if r["keep_ratio"] < 1.0]
    assert min(others) != pytest.approx(full)  # the case where the old line was wrong
    # the bars' own quantity (the prompt's perplexity, ppl_context, is another text's)
    prompt_ppl = next(r for r in data["rows"] if r["is_reference"])["values"]["ppl_context"]
    assert prompt_ppl != pytest.approx(full)
    line = drawn(speed.comprehensive(summary_of(store, [cut])))[f"{Cfg().pc.key}|ppl_compressed|line"]
    assert line.get_ydata()[0] == pytest.approx(full)

    dead = Cfg("random", 0.7).pc.key  # the last bar: its only cell failed
    run = fill_run(store, n_samples=1, fail=(0, dead))
    data = report_json(db, "--run-id", str(run))
    assert not [f for f in data["flags"] if f["kind"] == "unpaired"], data["flags"]
    summary = summary_of(store, [run])
    for fig in (speed.comprehensive(summary), speed.summary_figure(summary)):
        marks = [t for t in fig.findobj(Text) if t.get_gid() in (f"{dead}|na|text", f"{dead}|tpot_s|text")]
        assert marks and all(t.get_text() == "N/A\n(1 failed)" for t in marks)
        for t in marks:  # inside its panel
            x0, x1 = sorted(t.axes.get_xlim())
            assert x0 < t.get_position()[0] < x1


def test_a_folder_holding_another_runs_figures_is_refused(store, db, tmp_path):
    """A passkey run's accuracy and heatmap figures stayed beside an lm run's set plotted into the
    same folder, read as one set. The same run again (or a run of the same figures) replaces them."""
    lm = fill_run(store)
    pk = fill_run(store, task="passkey", configs=TASK_CONFIGS, n_samples=6, prompt_tokens=(1024, 2048))
    out = tmp_path / "figs"
    plot(db, "--run-id", str(pk), "--out", str(out))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = runner.invoke(app, ["plot", "--db", db, "--run-id", str(lm), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == (f"Error: --out {out} holds figures this plot does not draw (knormpress_accuracy.png, "
                                  "knormpress_needle_heatmap.png): another run's; choose another folder or remove them")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written
    assert len(plot(db, "--run-id", str(pk), "--out", str(out))) == len(before)  # the same set: replaced


def test_figure_functions_return_figures_without_saving(store):
    from matplotlib.figure import Figure

    from knormctl.render import figures
    from knormctl.render.summary import build_summary

    run = fill_run(store, memory=False)
    summary = build_summary([store.get_run(run)], store.samples(run))  # no blobs: latency panel is N/A
    for f in figures.figures_for(summary):
        fig = f.draw(summary)
        assert isinstance(fig, Figure)
        assert tuple(fig.get_size_inches()) == pytest.approx(f.size(summary))
    latency = figures.FIGURES[5].draw(summary)
    assert any("N/A" in t.get_text() for ax in latency.axes for t in ax.texts)


# ------------------------------------------------------------------ what is drawn is what the report says


def test_speed_figures_draw_the_json_numbers(store, db):
    from knormctl.render.figures import speed
    from knormctl.render.figures._common import VERDICT_COLORS, VERDICT_FILLS
    from knormctl.render.format import fmt_change, fmt_interval

    run = fill_run(store, n_samples=8, mem_jitter=0.03)
    data = report_json(db, "--run-id", str(run))
    rows = {r["config_key"]: r for r in data["rows"]}
    summary = summary_of(store, [run])

    art = drawn(speed.comprehensive(summary))
    for key, row in rows.items():
        for name, k in (("ttft_s", 1e3), ("tpot_s", 1e3), ("throughput_tps", 1.0), ("ppl_compressed", 1.0)):
            assert art[f"{key}|{name}|value"].get_height() == pytest.approx(row["values"][name] * k)
        if row["is_reference"]:
            continue
        for name in ("ttft_s", "tpot_s"):  # bottom row: paired changes, their intervals, the verdict's colour
            bar = art[f"{key}|{name}|change"]
            assert bar.get_height() == pytest.approx(row["changes"][name])
            assert segment(art[f"{key}|{name}|ci"]) == pytest.approx(tuple(row["change_intervals"][name]))
            assert to_hex(bar.get_edgecolor()) == VERDICT_COLORS[row["verdicts"][name]]

    art = drawn(speed.summary_figure(summary))
    noise_cells = 0
    for key, row in rows.items():
        if row["is_reference"]:
            continue
        for name, change in row["changes"].items():
            if f"{key}|{name}|text" not in art:
                continue
            expected = "N/A" if change is None else f"{fmt_change(name, change)}\n{fmt_interval(row['change_intervals'][name])}"
            assert art[f"{key}|{name}|text"].get_text() == expected
            fill = to_hex(art[f"{key}|{name}|cell"].get_facecolor())
            assert fill == VERDICT_FILLS.get(row["verdicts"][name], "#ffffff"), (key, name)
            noise_cells += row["verdicts"][name] == "noise"
    # a small memory change whose interval spans zero is not red
    mem = rows[Cfg("knorm", 0.9).pc.key]
    assert mem["verdicts"]["peak_mem_bytes"] == "noise"
    assert to_hex(art[f"{Cfg('knorm', 0.9).pc.key}|peak_mem_bytes|cell"].get_facecolor()) == "#ffffff"
    assert noise_cells

    art = drawn(speed.tradeoff(summary))
    for key, row in rows.items():
        if row["is_reference"]:
            continue
        x, y = art[f"{key}|throughput_tps,ppl_compressed|change"].get_offsets()[0]
        assert (x, y) == pytest.approx((row["changes"]["throughput_tps"], row["changes"]["ppl_compressed"]))
        assert segment(art[f"{key}|throughput_tps|ci"]) == pytest.approx(tuple(row["change_intervals"]["throughput_tps"]))
        assert segment(art[f"{key}|ppl_compressed|ci"]) == pytest.approx(tuple(row["change_intervals"]["ppl_compressed"]))

    art = drawn(speed.quality(summary))
    for press in ("knorm", "random"):
        pr = sorted((r for r in rows.values() if r["press"] == press), key=lambda r: r["keep_ratio"])
        assert list(art[f"{press}|ppl_compressed|value"].get_ydata()) == pytest.approx(
            [r["values"]["ppl_compressed"] for r in pr])
        assert list(art[f"{press}|ppl_compressed|change"].get_ydata()) == pytest.approx(
            [r["changes"]["ppl_compressed"] for r in pr])


def test_table_image_cells_are_the_report_cells(store, db):
    from knormctl.render.figures import table
    from knormctl.render.figures._common import VERDICT_FILLS

    run = fill_run(store, n_samples=6)
    data = report_json(db, "--run-id", str(run))
    fig = table.table(summary_of(store, [run]))
    cells = fig.axes[0].tables[0].get_celld()
    header = [cells[(0, j)].get_text().get_text().replace("\n", " ") for j in range(len({j for _, j in cells}))]
    for i, row in enumerate(data["rows"], start=1):
        for j, head in enumerate(header[2:], start=2):
            name = next(n for n in row["values"] if head == _label(n))
            text = cells[(i, j)].get_text().get_text()
            from knormctl.render.format import fmt_change, fmt_value

            assert text.startswith(fmt_value(name, row["values"][name]))
            if row["changes"][name] is not None:
                assert fmt_change(name, row["changes"][name]) in text
            assert to_hex(cells[(i, j)].get_facecolor()) == VERDICT_FILLS.get(row["verdicts"][name], "#ffffff")


def _label(name):
    import textwrap

    from knormctl.render.metrics import METRIC

    return textwrap.fill(METRIC[name].label, 12).replace("\n", " ")


def test_task_figures_draw_the_json_accuracy(store, db):
    from knormctl.render.figures import tasks

    run = fill_run(store, task="niah", configs=TASK_CONFIGS, n_samples=24, subtasks=("niah_single_1", "niah_mk"),
                   lengths=(2048, 4096), depths=(0.0, 0.5, 1.0),
                   score=lambda i, pc, sub, d, n: float(pc.press == "none" or d > 0.3 or i % 5 == 0))
    data = report_json(db, "--run-id", str(run))
    summary = summary_of(store, [run])
    art = drawn(tasks.accuracy(summary))
    means = [t for t in data["tasks"] if t["subtask"] is None]
    assert means
    for length in (2048, 4096):
        for press in ("knorm", "random"):
            pr = sorted((t for t in means if t["press"] == press and t["context_length"] == length),
                        key=lambda t: t["keep_ratio"])
            line = art[f"{press}|niah|{length}|value"]
            assert list(line.get_ydata()) == pytest.approx([t["accuracy"] * 100 for t in pr])
            for t in pr:
                assert segment(art[f"{t['config_key']}|niah|{length}|ci"]) == pytest.approx(
                    tuple(x * 100 for x in t["interval"]))
        ref = next(t for t in means if t["is_reference"] and t["context_length"] == length)
        assert art[f"none|niah|{length}|value"].get_ydata()[0] == pytest.approx(ref["accuracy"] * 100)

    art = drawn(tasks.needle_heatmap(summary))
    depths = sorted({c["needle_depth"] for c in data["needle_cells"]})
    lengths = sorted({c["context_length"] for c in data["needle_cells"]})
    for c in data["needle_cells"]:
        grid = art[f"{c['config_key']}|needle|image"].get_array()
        assert grid[depths.index(c["needle_depth"]), lengths.index(c["context_length"])] == pytest.approx(c["accuracy"] * 100)


def test_plot_and_report_agree_on_a_group_with_token_match_to_compute(store, db):
    """Cells of one prompt in different runs: report --group computes the token match the plot draws."""
    from knormctl.render.figures import speed
    from knormctl.render.format import fmt_change

    a = fill_run(store, group="cells", configs=(Cfg(),), token_match=False, seed=3)
    b = fill_run(store, group="cells", configs=(Cfg("knorm", 0.7), Cfg("knorm", 0.9)), token_match=False, seed=3)
    data = report_json(db, "--group", "cells")
    art = drawn(speed.summary_figure(summary_of(store, [a, b])))
    for row in data["rows"]:
        if not row["is_reference"]:
            assert row["values"]["token_match"] is not None
            text = art[f"{row['config_key']}|token_match|text"].get_text()
            assert text.startswith(fmt_change("token_match", row["changes"]["token_match"]))


def test_legends_never_cover_data_and_captions_explain_error_bars(store):
    from knormctl.render.figures import speed

    run = fill_run(store, n_samples=6)
    summary = summary_of(store, [run])
    for draw in (speed.tradeoff, speed.quality):
        fig = draw(summary)
        fig.canvas.draw()
        assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside an axes
        [legend] = fig.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), draw.__name__
    for draw in (speed.comprehensive, speed.summary_figure, speed.tradeoff, speed.quality):
        text = draw(summary)._supxlabel.get_text()
        assert "95%" in text and "n = 6 prompts" in text, draw.__name__


def test_tradeoff_axes_fit_the_data_and_keep_the_noise_band(store):
    from knormctl.render.figures import speed

    run = fill_run(store, n_samples=6)
    summary = summary_of(store, [run])
    ax = speed.tradeoff(summary).axes[0]
    rows = [r for r in summary.rows if not r.is_reference]
    xs = [e for r in rows for e in (r.change_intervals["throughput_tps"] or ())]
    lo, hi = ax.get_xlim()
    assert lo <= min(xs + [-summary.noise_pct]) and hi >= max(xs + [summary.noise_pct])
    span = max(xs + [summary.noise_pct]) - min(xs + [-summary.noise_pct])
    assert hi - lo <= 1.5 * span  # fitted, not +-100%


PRESSES_AT_ONCE = ("knorm", "knorm-inverse", "random", "streaming", "snapkv", "tova", "keydiff",
                   "expected-attention")


def test_tradeoff_labels_name_each_point_without_running_over_each_other(store):
    """Presses at one keep ratio land close together; a fixed (6, 6) offset printed their names
    on top of each other, so only colour and marker were left to tell them apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from knormctl.render.figures import speed

    configs = (Cfg(), *(Cfg(p, kr) for p in PRESSES_AT_ONCE for kr in (0.75, 0.5)))
    summary = summary_of(store, [fill_run(store, configs=configs, n_samples=4)])
    fig = speed.tradeoff(summary)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    [ax] = fig.axes
    labels = [t for t in ax.texts if t.get_gid() == "tradeoff|label"]
    rows = {r.label: r for r in summary.rows if not r.is_reference}
    assert sorted(t.get_text() for t in labels) == sorted(rows)  # every point named once
    for t in labels:  # ...at its own point
        r = rows[t.get_text()]
        assert t.xy == pytest.approx((r.changes["throughput_tps"], r.changes["ppl_compressed"]))
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text's own box, not its leader line
    panel = ax.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
        for j in range(i + 1, len(boxes)):
            assert not box.overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
        for line in interval_lines(ax):  # ...and off every interval line
            assert not (box.x0 < line[2] and line[0] < box.x1 and box.y0 < line[3] and line[1] < box.y1), \
                labels[i].get_text()


def interval_lines(ax) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) in display pixels of each drawn interval line and cap, cut to the panel."""
    from matplotlib.collections import LineCollection

    panel = ax.get_window_extent()
    out = []
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                pts = coll.get_transform().transform(seg)
                box = (max(pts[:, 0].min(), panel.x0), max(pts[:, 1].min(), panel.y0),
                       min(pts[:, 0].max(), panel.x1), min(pts[:, 1].max(), panel.y1))
                if box[0] <= box[2] and box[1] <= box[3]:
                    out.append(box)
    assert out, "the figure draws no interval lines"
    return out


def test_plot_imports_neither_torch_nor_the_engine(store, db, tmp_path):
    import subprocess
    import sys

    fill_run(store, task="passkey", configs=TASK_CONFIGS, n_samples=3)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from knormctl.cli import app\n"
        f"r = CliRunner().invoke(app, ['plot', '--db', {db!r}, '--out', {str(tmp_path / 'p')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'knormctl.engine', 'knormctl.runner') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_dollar_sign_in_a_name_is_drawn_as_it_is(store, db, tmp_path):
    """A model saved as 'ckpt$v2_$' crashed plot and the html report ('unexpected ValueError: v2_'):
    matplotlib read '$...$' in the title as math."""
    run = fill_run(store, model="/models/ckpt$v2_$")
    paths = plot(db, "--run-id", str(run), "--out", str(tmp_path / "figs"))
    assert len(paths) == len(LM_FIGURES)
    summary = summary_of(store, [run])
    assert "ckpt$v2_$" in spec("summary").draw(summary).get_suptitle()


LONG_MODEL = "/very/long/path/to/checkpoints/Meta-Llama-3.1-8B-Instruct-finetuned-v2"


@pytest.mark.parametrize("task", ["lm", "passkey"])
def test_a_long_title_stays_inside_the_figure_and_clear_of_its_legend(store, task):
    """A model path made titles run off both edges ('curacy vs keep ratio -- ...8B') and under
    the legend at the top right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from knormctl.render import figures

    configs = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")) if task == "passkey" else \
        (Cfg(), Cfg("knorm", 0.7), Cfg("streaming", 0.7))
    summary = summary_of(store, [fill_run(store, task=task, model=LONG_MODEL, configs=configs, n_samples=6)])
    for spec_ in figures.figures_for(summary):
        fig = spec_.draw(summary)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        title = fig._suptitle.get_window_extent(renderer)
        page = fig.bbox
        assert page.x0 <= title.x0 and title.x1 <= page.x1, (spec_.name, fig.get_suptitle())
        for legend in fig.legends:
            assert not title.overlaps(legend.get_window_extent(renderer)), (spec_.name, fig.get_suptitle())


def test_presses_are_dodged_around_their_keep_ratio_however_many_there_are():
    """Each press was drawn k x 0.008 to the right: the tenth of ten at 0.322 for keep 0.25."""
    from knormctl.render.figures._common import MAX_DODGE, dodge

    for n in (1, 2, 5, 10, 30):
        offsets = [dodge(k, n) for k in range(n)]
        assert max(map(abs, offsets)) <= MAX_DODGE / 2 + 1e-12
        assert abs(sum(offsets)) < 1e-9  # centred on the keep ratio
        assert len(set(offsets)) == n  # still told apart


def test_a_single_keep_ratio_gets_an_axis_wide_enough_for_its_error_bar(store):
    """One keep ratio: the axis was 0.012 wide and the bar's caps spanned the whole panel."""
    from knormctl.render.figures.tasks import accuracy

    summary = summary_of(store, [fill_run(store, task="passkey", configs=(Cfg(mode="prefill"),
                                                                         Cfg("knorm", 0.5, mode="prefill")))])
    fig = accuracy(summary)
    lo, hi = sorted(fig.axes[0].get_xlim())
    assert hi - lo >= 0.19 and lo < 0.5 < hi
    assert fig.axes[0].get_xlim()[0] > fig.axes[0].get_xlim()[1]  # left = no compression


def test_the_table_figure_fits_every_configuration_label_in_its_cell(store):
    """Equal column widths cut 'expected-attention 0.75' to 'xpected-attention 0.7', which then
    read like its 0.25 row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.table import Table

    configs = tuple(Cfg(p, kr) for p in ("expected-attention", "knorm-inverse", "streaming", "random", "knorm")
                    for kr in (0.75, 0.25)) + (Cfg(),)
    summary = summary_of(store, [fill_run(store, configs=configs, n_samples=3)])
    fig = spec("table").draw(summary)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    [table] = fig.findobj(Table)
    cells = table.get_celld()
    labels = [cells[(i, 0)] for i in range(1, len(summary.rows) + 1)]
    assert {c.get_text().get_text() for c in labels} >= {"expected-attention 0.75", "expected-attention 0.25"}
    for c in labels:
        text, box = c.get_text().get_window_extent(renderer), c.get_window_extent(renderer)
        assert box.x0 <= text.x0 and text.x1 <= box.x1, c.get_text().get_text()


def test_bar_labels_stay_apart_with_many_configurations(store):
    """31 configurations: labels slanted at 30 degrees ran into each other in every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    configs = (Cfg(),) + tuple(Cfg(p, kr) for p in ("knorm", "knorm-inverse", "random", "streaming", "snapkv",
                                                     "tova", "keydiff", "expected-attention")
                               for kr in (0.75, 0.5, 0.25))
    summary = summary_of(store, [fill_run(store, configs=configs, n_samples=3)])
    fig = spec("comprehensive").draw(summary)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        if len(boxes) < 20:
            continue
        boxes.sort(key=lambda b: b.x0)
        for a, b in zip(boxes, boxes[1:]):
            assert a.x1 <= b.x0 + 0.5, ax.get_title()
        checked += 1
    assert checked >= 4


def test_table_image_numbers_its_memory_footnote_as_the_caption_does(store):
    """Guards against (the cell's footnote number started at 0 while the caption's starts at 1): every
    'N/A (k)' cell names a footnote the caption has."""
    from matplotlib.text import Text

    from knormctl.render.figures import table

    run = fill_run(store, memory=False)
    fig = table.table(summary_of(store, [run]))
    cells = fig.axes[0].tables[0].get_celld()
    marks = {c.get_text().get_text() for c in cells.values() if c.get_text().get_text().startswith("N/A (")}
    assert marks == {"N/A (1)"}
    caption = " ".join(t.get_text() for t in fig.findobj(Text))
    assert "(1) peak memory N/A:" in caption


def test_needle_heatmap_cells_say_questions_right_of_asked(store, db):
    """Guards against (the cell text counted wrong answers): each binary cell reads correct/asked, as the
    caption says, from the json's needle cells."""
    from knormctl.render.figures import tasks

    configs = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"))
    run = fill_run(store, task="passkey", configs=configs, n_samples=12, depths=(0.1, 0.9), prompt_tokens=(1024,))
    data = report_json(db, "--run-id", str(run))
    fig = tasks.needle_heatmap(summary_of(store, [run]))
    by_title = {ax.get_title(): ax for ax in fig.axes}
    checked = 0
    for c in data["needle_cells"]:
        ax = by_title[c["label"]]
        expected = f"{round(c['accuracy'] * c['n'])}/{c['n']}"
        texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
        depths = sorted({x["needle_depth"] for x in data["needle_cells"]})
        assert texts[(0, depths.index(c["needle_depth"]))] == expected
        checked += 1
    assert checked == 4
    # right and wrong counts differ somewhere (else counting the wrong answers would read the same)
    assert any(2 * round(c["accuracy"] * c["n"]) != c["n"] for c in data["needle_cells"])


def test_a_ttft_timing_artifact_bar_is_hatched(store):
    """Guards against (the artifact's hatch dropped): the caption says 'hatched a TTFT timing artifact';
    an artifact bar was filled like a finding, and only it is hatched."""
    from knormctl.render.figures import speed

    run = fill_run(store, ttft_factor={Cfg("knorm", 0.9).pc.key: 0.7})
    summary = summary_of(store, [run])
    fig = speed.comprehensive(summary)
    art = {a.get_gid(): a for a in fig.findobj(lambda a: a.get_gid() is not None)}
    verdicts = {r.config_key: r.verdicts["ttft_s"] for r in summary.rows if not r.is_reference}
    assert verdicts[Cfg("knorm", 0.9).pc.key] == "artifact"
    for key, v in verdicts.items():
        assert bool(art[f"{key}|ttft_s|change"].get_hatch()) == (v == "artifact"), key


def _na_texts(store, run) -> dict[str, list[str]]:
    """Each figure's "N/A: ..." panel texts."""
    from matplotlib.text import Text

    from knormctl.render.figures import figures_for
    from knormctl.render.summary import build_summary

    summary = build_summary([store.get_run(run)], store.samples(run, with_blobs=True))
    out = {}
    for spec in figures_for(summary):
        fig = spec.draw(summary)
        out[spec.name] = [t.get_text() for t in fig.findobj(Text) if t.get_text().startswith("N/A: ")]
    return out


def test_an_empty_panel_of_a_run_without_the_full_cache_says_so(store):
    """The trade-off needs paired changes: without a full-cache reference it must say that, not
    that no perplexity was stored (the run has perplexities)."""
    from report_data import Cfg, fill_run

    texts = _na_texts(store, fill_run(store, configs=(Cfg("knorm", 0.5), Cfg("streaming", 0.5))))
    assert texts["tradeoff"] == ["N/A: no full-cache reference in this run"], texts
