"""`knormctl plot` on hand-built stores: every figure is written at its fixed size, decodes
as an image, differs between runs, and N/A data draws labelled empty panels, never warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.image
import pytest
from report_data import Cfg, fill_run
from typer.testing import CliRunner

from knormctl.cli import app

runner = CliRunner()
# Saved size in pixels (width, height): figure size x DPI, fixed so README embeds stay stable.
SIZES = {"comprehensive": (1600, 900), "summary": (1400, 800), "tradeoff": (1100, 800), "table": (1800, 800),
         "quality": (1100, 700), "latency": (1400, 700), "passkey_accuracy": (1100, 700),
         "passkey_heatmap": (1000, 700)}
LM_FIGURES = ["comprehensive", "summary", "tradeoff", "table", "quality", "latency"]
PASSKEY = (Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill"), Cfg("knorm", 0.2, mode="prefill"),
           Cfg("random", 0.5, mode="prefill"))


def plot(db, *args) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning (layout, empty data, fonts) fails the test
        result = runner.invoke(app, ["plot", "--db", db, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.exception is None
    return [Path(line) for line in result.stdout.splitlines()]


def name_of(path: Path) -> str:
    return path.stem.removeprefix("knormpress_")


def check_png(path: Path) -> None:
    assert path.is_file() and path.suffix == ".png"
    image = matplotlib.image.imread(path)
    width, height = SIZES[name_of(path)]
    assert image.shape[:2] == (height, width), path


def test_every_figure_is_written_at_its_size_and_differs_between_runs(store, db, tmp_path):
    a = fill_run(store, seed=1)
    b = fill_run(store, seed=2, fail=(1, Cfg("knorm", 0.7).pc.key))
    paths_a = plot(db, "--run-id", str(a), "--out", str(tmp_path / "a"))
    paths_b = plot(db, "--run-id", str(b), "--out", str(tmp_path / "b"))
    assert [name_of(p) for p in paths_a] == LM_FIGURES
    assert paths_a[0].name == "knormpress_comprehensive.png"  # the old visualize_results.py names
    for pa, pb in zip(paths_a, paths_b):
        check_png(pa)
        check_png(pb)
        assert pa.read_bytes() != pb.read_bytes(), pa.name


def test_all_memory_na_and_single_configuration_draw_without_warnings(store, db, tmp_path):
    na = fill_run(store, memory=False)
    for p in plot(db, "--run-id", str(na), "--out", str(tmp_path / "na")):
        check_png(p)
    single = fill_run(store, configs=(Cfg(),))
    for p in plot(db, "--run-id", str(single), "--out", str(tmp_path / "single")):
        check_png(p)
    interrupted = fill_run(store, status="interrupted", stop_after=2)
    for p in plot(db, "--run-id", str(interrupted), "--out", str(tmp_path / "interrupted")):
        check_png(p)
    empty = store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="x")
    for p in plot(db, "--run-id", str(empty), "--out", str(tmp_path / "empty")):
        check_png(p)


def test_passkey_run_adds_accuracy_and_heatmap(store, db, tmp_path):
    run = fill_run(store, task="passkey", configs=PASSKEY, n_samples=6, prompt_tokens=(1024, 2048))
    paths = plot(db, "--run-id", str(run), "--out", str(tmp_path / "pk"))
    assert [name_of(p) for p in paths] == LM_FIGURES + ["passkey_accuracy", "passkey_heatmap"]
    for p in paths:
        check_png(p)


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


def test_bad_input_is_one_line_and_exit_2(store, db, tmp_path):
    fill_run(store)
    result = runner.invoke(app, ["plot", "--db", db, "--run-id", "42"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"Error: run 42 does not exist in {db}"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, ["plot", "--db", db, "--out", str(afile)])
    assert result.exit_code == 2 and "is not a folder" in result.stderr


def test_figure_functions_return_figures_without_saving(store):
    from matplotlib.figure import Figure

    from knormctl.render import figures
    from knormctl.render.summary import build_summary

    run = fill_run(store, memory=False)
    summary = build_summary([store.get_run(run)], store.samples(run))  # no blobs: latency panel is N/A
    for spec in figures.figures_for(summary):
        fig = spec.draw(summary)
        assert isinstance(fig, Figure)
        assert tuple(fig.get_size_inches() * figures.DPI) == SIZES[spec.name]
    latency = figures.latency(summary)
    assert any("N/A" in t.get_text() for ax in latency.axes for t in ax.texts)
