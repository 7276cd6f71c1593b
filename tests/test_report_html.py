"""`report --format html`: one self-contained page, checked in a real headless browser.

The browser is Debian's Chromium driven by Playwright (``.ci/chromium.sh`` installs it for CI;
with KNORMCTL_REQUIRE_BROWSER=1, as scripts/test.sh sets, a missing browser fails the test
instead of skipping it).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from report_data import Cfg, fill_run
from typer.testing import CliRunner

from knormctl.cli import app

runner = CliRunner()
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _browser_or_skip():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        why = "no chromium on PATH" if exe is None else "playwright is not installed"
        if os.environ.get("KNORMCTL_REQUIRE_BROWSER"):
            pytest.fail(f"the HTML report must be checked in a browser, but {why} (.ci/chromium.sh installs it)")
        pytest.skip(why)
    return exe, sync_playwright


def _report(db, *args):
    res = runner.invoke(app, ["report", "--db", db, *args])
    assert res.exit_code == 0, res.output
    return res


def test_html_report_opens_in_a_browser_with_every_table_and_figure(store, db, tmp_path):
    exe, sync_playwright = _browser_or_skip()
    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.9), Cfg("knorm", 0.5), Cfg("streaming", 0.5)), n_samples=4)
    page_path = tmp_path / "report.html"
    _report(db, "--run-id", str(run), "--format", "html", "-o", str(page_path))
    data = json.loads(_report(db, "--run-id", str(run), "--format", "json").stdout)

    from knormctl.render.figures import figures_for
    from knormctl.render.summary import build_summary

    n_figures = len(figures_for(build_summary([store.get_run(run)], store.samples(run, with_blobs=True))))
    html = page_path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_path.as_uri())
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            tables = page.evaluate("""Array.from(document.querySelectorAll('table')).map(t =>
                Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.innerText)))""")
            title = page.title()
        finally:
            browser.close()

    assert title.startswith(f"knormctl report \u2014 run {run}")
    assert len(images) == n_figures >= 4
    assert all(done and width > 0 for done, width, _ in images), images  # every figure decoded
    configs = tables[0]
    assert configs[0][:3] == ["configuration", "prompts", "failed"]
    assert [row[0] for row in configs[1:]] == [r["label"] for r in data["rows"]]
    # the same numbers as the json: each row's prompt count, and its TPOT cell's value and signed change
    from knormctl.render.format import fmt_change, fmt_interval, fmt_value

    col = configs[0].index("TPOT")
    for row, rec in zip(configs[1:], data["rows"]):
        assert int(row[1]) == rec["n_prompts"]
        assert row[col].startswith(fmt_value("tpot_s", rec["values"]["tpot_s"])), (row[col], rec["label"])
        change = rec["changes"]["tpot_s"]
        if change is not None:
            assert f"{fmt_change('tpot_s', change)} {fmt_interval(rec['change_intervals']['tpot_s'])}" in row[col], \
                (row[col], change)


def test_html_needs_a_file_or_stdout_and_refuses_list(store, db, tmp_path):
    fill_run(store)
    res = runner.invoke(app, ["report", "--db", db, "--format", "html"])
    assert res.exit_code == 0 and res.stdout.startswith("<!DOCTYPE html>")
    res = runner.invoke(app, ["report", "--db", db, "--list", "--format", "html"])
    assert res.exit_code == 2 and "--format html shows one run or a group" in res.stderr
    res = runner.invoke(app, ["report", "--db", db, "-o", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "--output needs --format" in res.stderr
    assert not (tmp_path / "x.txt").exists()


def test_by_dataset_draws_only_the_figure_that_names_each_rows_dataset(store, db, tmp_path):
    """The bar figures drew every dataset's rows unlabelled (full cache ... twice) and one dataset's
    full-cache line: with --by-dataset only the table figure, which names the dataset, is drawn."""
    run = fill_run(store, n_samples=4)  # two datasets (report_data: samples 0-1, 2-3)
    pages = {}
    for extra in ([], ["--by-dataset"]):
        out = tmp_path / f"r{len(extra)}.html"
        res = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "html", "-o", str(out),
                                  *extra])
        assert res.exit_code == 0, res.output
        pages[bool(extra)] = out.read_text()
    assert pages[False].count("data:image/png") > 1 and pages[True].count("data:image/png") == 1
    assert f"`knormctl plot --run-id {run}` draws the others" in pages[True]


def _page(store, run) -> str:
    from knormctl.render.html import summary_page
    from knormctl.render.summary import build_summary

    return summary_page(build_summary([store.get_run(run)], store.samples(run, with_blobs=True)), figures=False)


def _html_rows(page: str, title: str) -> list[list[tuple[str | None, str]]]:
    """(class, text) of each body cell of the table headed ``title``."""
    import re
    from html import unescape

    section = page.split(f"<h2>{title}</h2>", 1)[1].split("</table>", 1)[0]
    body = section.split("<tbody>", 1)[1]
    return [[(cls or None, unescape(txt)) for cls, txt in re.findall(r'<td(?: class="([^"]*)")?>(.*?)</td>', tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", body)]


def test_html_escapes_names_that_look_like_markup(store):
    """A model path, and a document title in the samples table (a text file's name), with markup in them."""
    from knormctl.render.html import summary_page
    from knormctl.render.summary import build_summary
    from report_data import fill_run

    run = fill_run(store, group="<script>alert(1)</script>&g", model="/models/m<b>&x")
    page = _page(store, run)
    assert "<script>" not in page and "<b>" not in page
    assert "m&lt;b&gt;&amp;x" in page
    samples = store.samples(run, with_blobs=True)
    samples[0].doc_title = "<img src=x onerror=alert(1)> & co"
    page = summary_page(build_summary([store.get_run(run)], samples), figures=False, samples=samples)
    assert "<img" not in page
    assert any(text == "<img src=x onerror=alert(1)> & co" for row in _html_rows(page, "samples") for _, text in row)


def test_html_cells_carry_the_reports_verdict_colours(store, db):
    from report_data import Cfg, fill_run

    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.5)), n_samples=8, tpot_factor={Cfg("knorm", 0.5).pc.key: 3.0})
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    page = _page(store, run)
    rows = _html_rows(page, "configurations")
    header = page.split("<h2>configurations</h2>", 1)[1].split("</thead>", 1)[0]
    import re
    cols = re.findall(r"<th>(.*?)</th>", header)
    col = cols.index("TPOT")
    knorm = [r for r, rec in zip(rows, data["rows"]) if not rec["is_reference"]][0]
    rec = [rec for rec in data["rows"] if not rec["is_reference"]][0]
    assert rec["verdicts"]["tpot_s"] == "worse"
    assert knorm[col][0] == "worse"


def test_html_marks_only_the_near_chance_task_rows_and_lists_the_flags(store, db):
    from report_data import fill_run
    from test_report_tasks import CONFIGS, LENGTHS, SUBTASKS, ruler_score

    run = fill_run(store, task="ruler", configs=CONFIGS, n_samples=48, subtasks=SUBTASKS, lengths=LENGTHS,
                   depths=(0.1, 0.5, 0.9, 0.25), score=ruler_score, score_metric="string_match_all",
                   prompt_tokens=(4096,))
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    page = _page(store, run)
    rows = _html_rows(page, "question tasks")
    assert len(rows) == len(data["tasks"])
    assert [r[4][1] for r in rows] == ["yes" if t["near_chance"] else "" for t in data["tasks"]]
    assert "yes" in [r[4][1] for r in rows]
    # the flags are listed under their heading, each message once
    from html import escape
    assert "<h2>Read before quoting these numbers</h2>" in page
    assert data["flags"] and all(f"<li>{escape(f['message'])}</li>" in page for f in data["flags"])
