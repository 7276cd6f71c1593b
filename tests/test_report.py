"""`knormctl report` on hand-built stores: medians equal the stored samples' medians, honesty
flags appear exactly when they apply, every format parses, bad input is one line + exit 2."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from collections import defaultdict

import pytest
from report_data import NO_MEM, Cfg, fill_run, parse_tables
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.render.metrics import METRICS
from knormctl.render.summary import REFERENCE_KEY, build_summary

runner = CliRunner()
KNORM_07 = Cfg("knorm", 0.7).pc.key
KNORM_09 = Cfg("knorm", 0.9).pc.key


def report(db, *args):
    return runner.invoke(app, ["report", "--db", db, *args])


def report_json(db, *args):
    result = report(db, *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows_by_key(data):
    return {r["config_key"]: r for r in data["rows"]}


def kinds(data) -> list[str]:
    return [f["kind"] for f in data["flags"]]


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------ numbers


def test_json_medians_equal_medians_of_the_stored_samples(store, db):
    run = fill_run(store, fail=(1, KNORM_07), memory=True)
    data = report_json(db, "--run-id", str(run))

    by_key = defaultdict(list)
    for s in store.samples(run):
        by_key[s.config_key].append(s)
    rows = {r["config_key"]: r for r in data["rows"]}
    assert set(rows) == set(by_key)
    assert rows[REFERENCE_KEY]["is_reference"] and rows[REFERENCE_KEY]["label"] == "full cache"
    for key, samples in by_key.items():
        ok = [s for s in samples if s.error is None]
        row = rows[key]
        assert row["n_samples"] == len(samples)
        assert row["n_failed"] == len(samples) - len(ok)
        for col in ("ttft_s", "tpot_s", "itl_p90_s", "throughput_tps", "peak_mem_bytes", "kv_bytes_peak",
                    "kv_bytes_final", "compress_time_s", "ppl_context", "ppl_compressed"):
            assert row["values"][col] == pytest.approx(statistics.median(getattr(s, col) for s in ok)), (key, col)
        # a count stays a count: the lower median, an observed value (never 99.5)
        assert row["values"]["compress_events"] == statistics.median_low(s.compress_events for s in ok)
        assert row["values"]["token_match"] == pytest.approx(statistics.fmean(s.token_match for s in ok))
        assert row["values"]["accuracy"] is None  # an lm run has no task answers
    for key, row in rows.items():
        if key == REFERENCE_KEY:
            assert all(v is None for v in row["changes"].values())
            continue
        # changes are paired: the median over prompts of each prompt's change against the full cache
        for col in ("ttft_s", "throughput_tps", "kv_bytes_final", "ppl_compressed"):
            ref_by_prompt = {s.sample_index: getattr(s, col) for s in by_key[REFERENCE_KEY] if s.error is None}
            per_prompt = [(getattr(s, col) / ref_by_prompt[s.sample_index] - 1) * 100
                          for s in by_key[key] if s.error is None and s.sample_index in ref_by_prompt]
            assert row["changes"][col] == pytest.approx(statistics.median(per_prompt)), (key, col)
        assert row["changes"]["token_match"] == pytest.approx((row["values"]["token_match"] - 1.0) * 100)
        # no direction, no change: counts and the prompt's own perplexity (compression cannot move it)
        assert row["changes"]["compress_events"] is None and row["verdicts"]["compress_events"] is None
        assert row["changes"]["ppl_context"] is None
        for col, change in row["changes"].items():
            if change is not None:  # every change carries its interval, which contains it
                lo, hi = row["change_intervals"][col]
                assert lo <= change <= hi, (key, col)
    # direction: lower KV bytes is better, higher perplexity is worse
    assert rows[KNORM_09]["verdicts"]["kv_bytes_final"] == "better"
    assert rows[KNORM_09]["verdicts"]["ppl_compressed"] == "worse"
    assert rows[KNORM_09]["verdicts"]["token_match"] == "worse"
    assert data["header"]["run_ids"] == [run]
    assert data["header"]["device_name"].startswith("Intel") and data["header"]["threads"] == 2
    assert data["header"]["torch_version"] == "2.13.0+cpu"


def test_csv_and_markdown_parse_with_stable_columns(store, db):
    run = fill_run(store)
    result = report(db, "--run-id", str(run), "--format", "csv")
    assert result.exit_code == 0, result.output
    records = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(records) == 5
    assert {"config_key", "label", "ttft_s", "ttft_s_change_pct", "token_match_change_pp", "peak_mem_reason",
            "ttft_s_ci_lo", "ttft_s_ci_hi", "ttft_s_change_ci_lo", "ttft_s_change_ci_hi", "ttft_s_verdict",
            "ttft_s_n_needed", "n_prompts", "n_repeats"} <= set(records[0])
    data = report_json(db, "--run-id", str(run))
    for rec, row in zip(records, data["rows"]):
        assert rec["config_key"] == row["config_key"]
        assert float(rec["ttft_s"]) == row["values"]["ttft_s"]  # unrounded in csv
        if row["change_intervals"]["tpot_s"] is not None:
            assert float(rec["tpot_s_change_ci_lo"]) == row["change_intervals"]["tpot_s"][0]
            assert rec["tpot_s_verdict"] == row["verdicts"]["tpot_s"]

    md = report(db, "--run-id", str(run), "--format", "markdown").stdout
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 5
    assert len({ln.count("|") for ln in table}) == 1
    assert "noise: no detectable difference" in md  # the verdict words' legend (below)
    assert "knorm 0.9" in md and "run " + str(run) in md
    col = table[0].split("|").index(" throughput ")  # every value says its unit, throughput too
    assert all(ln.split("|")[col].split(" (")[0].strip().endswith(" tok/s") for ln in table[2:]), table
    # each markdown cell holds its own row's numbers, as the json gives them
    from knormctl.render.format import fmt_change, fmt_interval, fmt_value
    from knormctl.render.metrics import METRIC

    by_label = {m.label: name for name, m in METRIC.items()}
    heads = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {r["label"]: r for r in data["rows"]}
    checked = 0
    for line in table[2:]:
        cells = dict(zip(heads, (c.strip() for c in line.strip("|").split("|"))))
        row = rows[cells["configuration"]]
        assert int(cells["prompts"]) == row["n_prompts"]
        for head, text in cells.items():
            name = by_label.get(head)
            if name is None or row["values"][name] is None:
                continue
            value, change = fmt_value(name, row["values"][name]), row["changes"][name]
            # with the verdict the colours give elsewhere, in words: '(Δ +7.6% [+5.9, +9.2])' read as
            # a finding where the table called it noise (within the run's noise)
            word = f", {row['verdicts'][name]}" if row["verdicts"][name] else ""
            assert text == (value if change is None else
                            f"{value} (\u0394 {fmt_change(name, change)} "
                            f"{fmt_interval(row['change_intervals'][name])}{word})"), (row["label"], head, text)
            checked += 1
    assert checked >= 5 * 10


def test_token_match_is_computed_from_generated_ids_when_not_stored(store):
    run = fill_run(store, token_match=False)
    rows = store.samples(run, with_blobs=True)
    refs = {s.sample_index: s.generated_ids_json for s in rows if s.config_key == REFERENCE_KEY}
    expected = statistics.fmean(
        sum(a == b for a, b in zip(s.generated_ids_json, refs[s.sample_index]))
        / max(len(s.generated_ids_json), len(refs[s.sample_index]))
        for s in rows if s.config_key == KNORM_07)
    summary = build_summary([store.get_run(run)], rows)
    row = next(r for r in summary.rows if r.config_key == KNORM_07)
    assert row.values["token_match"] == pytest.approx(expected)
    # Without blobs the value stays unknown, and nothing tries to load the deferred column.
    lean = build_summary([store.get_run(run)], store.samples(run))
    assert next(r for r in lean.rows if r.config_key == KNORM_07).values["token_match"] is None


def test_a_computed_token_match_compares_with_the_same_rounds_full_cache(store):
    """With --repeats (and sampling, rounds differ), each round's output is compared with the full
    cache's output of the same round, not always with the first round's."""
    run = fill_run(store, token_match=False, repeats=2, n_samples=2)
    rows = store.samples(run, with_blobs=True)
    refs = {(s.sample_index, s.repeat): s.generated_ids_json for s in rows if s.config_key == REFERENCE_KEY}
    assert refs[(0, 0)] != refs[(0, 1)]  # the rounds' outputs differ: the choice of reference shows
    build_summary([store.get_run(run)], rows)  # fills the NULL token_match in place
    checked = 0
    for s in rows:
        if s.config_key == KNORM_07:
            ref = refs[(s.sample_index, s.repeat)]
            mine = s.generated_ids_json
            assert s.token_match == pytest.approx(sum(a == b for a, b in zip(mine, ref)) / max(len(mine), len(ref)))
            checked += 1
    assert checked == 4


def test_by_dataset_splits_rows_with_a_reference_each(store, db):
    run = fill_run(store)
    data = report_json(db, "--run-id", str(run), "--by-dataset")
    datasets = {r["dataset"] for r in data["rows"]}
    assert datasets == {"wiki-lite", "wiki-lite-long"}
    for d in datasets:
        rows = [r for r in data["rows"] if r["dataset"] == d]
        assert len(rows) == 5 and rows[0]["is_reference"]
    long_ref = next(r for r in data["rows"] if r["dataset"] == "wiki-lite-long" and r["is_reference"])
    only = [s for s in store.samples(run) if s.dataset == "wiki-lite-long" and s.config_key == REFERENCE_KEY]
    assert long_ref["values"]["ttft_s"] == pytest.approx(statistics.median(s.ttft_s for s in only))
    assert "wiki-lite-long" in report(db, "--run-id", str(run), "--by-dataset").stdout


# ------------------------------------------------------------------ honesty flags


def test_a_clean_run_has_no_flags(store, db):
    # enough prompts for a clear TPOT gain and a precise "no TTFT change"
    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.7)), n_samples=12, prompt_tokens=(1024,),
                   tpot_factor={KNORM_07: 0.8})
    data = report_json(db, "--run-id", str(run))
    assert data["flags"] == []
    assert data["noise_pct"] == 5.0 and not data["noise_measured"]  # no keep_ratio 1.0, no repeats: assumed
    assert "assumed" in data["noise_source"]
    assert "Read before quoting" not in report(db, "--run-id", str(run)).stdout


def test_failed_sample_is_flagged_with_its_error(store, db):
    run = fill_run(store, fail=(1, KNORM_07))
    data = report_json(db, "--run-id", str(run))
    failed = [f for f in data["flags"] if f["kind"] == "failed_sample"]
    assert len(failed) == 1
    assert "sample 1" in failed[0]["message"] and "knorm 0.7" in failed[0]["message"]
    assert "CUDA out of memory" in failed[0]["message"] and "Traceback" not in failed[0]["message"]
    assert "unpaired" in kinds(data)  # its medians cover 2 prompts, the reference's 3
    row = next(r for r in data["rows"] if r["config_key"] == KNORM_07)
    assert row["n_pairs"]["tpot_s"] == 2 and row["n_prompts"] == 2 and row["n_failed"] == 1
    out = report(db, "--run-id", str(run)).stdout
    assert "CUDA out of memory" in out


def test_changes_from_one_prompt_say_why_they_have_no_interval(store, db):
    run = fill_run(store, n_samples=1, prompt_tokens=(1024,))
    data = report_json(db, "--run-id", str(run))
    row = next(r for r in data["rows"] if r["config_key"] == KNORM_07)
    assert row["changes"]["tpot_s"] is not None and row["change_intervals"]["tpot_s"] is None
    assert row["verdicts"]["tpot_s"] is None
    [flag] = [f for f in data["flags"] if f["kind"] == "one_prompt"]
    assert flag["message"].startswith("knorm 1.0, knorm 0.9, knorm 0.7, random 0.7: paired with the full cache on "
                                      "one prompt only")
    assert "few_prompts" not in kinds(data)
    assert "one prompt only" in report(db, "--run-id", str(run)).stdout
    assert "one_prompt" not in kinds(report_json(db, "--run-id", str(fill_run(store, n_samples=2))))


def test_interrupted_run_says_how_far_it_got(store, db):
    run = fill_run(store, status="interrupted", stop_after=7)
    data = report_json(db, "--run-id", str(run))
    [flag] = [f for f in data["flags"] if f["kind"] == "interrupted"]
    assert f"run {run} was interrupted" in flag["message"]
    assert "7 of 15 planned cells finished" in flag["message"]
    assert data["header"]["status"] == "interrupted"
    assert "7 of 15 planned cells finished" in report(db, "--run-id", str(run)).stdout


def test_a_failed_run_says_so_and_how_far_it_got(store, db):
    """A run that ended on an error must not read as a finished one."""
    run = fill_run(store, status="failed", stop_after=4)
    data = report_json(db, "--run-id", str(run))
    [flag] = [f for f in data["flags"] if f["kind"] == "run_failed"]
    assert f"run {run} failed: 4 of 15 planned cells finished" in flag["message"]
    assert "interrupted" not in kinds(data)


def test_a_configuration_that_cut_only_some_prompts_is_flagged(store, db):
    """prune_after 1500: the 1024-token prompts (+ 100 new tokens) were never cut, the 2048-token
    one was. 'compressions' showed the lower median 0 beside a KV change, and no flag said the
    values mix cut and uncut prompts."""
    knorm = Cfg("knorm", 0.5, 1500)
    run = fill_run(store, configs=(Cfg(), knorm), prompt_tokens=(1024, 1024, 2048))
    data = report_json(db, "--run-id", str(run))
    [flag] = [f for f in data["flags"] if f["kind"] == "partly_compressed"]
    assert flag["config_key"] == knorm.pc.key
    assert flag["message"].startswith("knorm 0.5: only 1 of 3 samples were cut (in the others the prompt + new "
                                      "tokens never exceeded prune_after=1500)"), flag
    every = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.5, 512)), seed=1)  # every prompt over 512: no flag
    assert not [f for f in report_json(db, "--run-id", str(every))["flags"] if f["kind"] == "partly_compressed"]


def test_configuration_that_never_compressed_is_flagged(store, db):
    run = fill_run(store, prune_after=4096)  # prompts of 1024-2048 + 100 new tokens never reach it
    data = report_json(db, "--run-id", str(run))
    flagged = {f["config_key"] for f in data["flags"] if f["kind"] in ("no_compression", "full_cache_path")}
    assert flagged == {r["config_key"] for r in data["rows"] if not r["is_reference"]}
    msg = next(f["message"] for f in data["flags"] if f["kind"] == "no_compression" and f["config_key"] == Cfg("knorm", 0.9, 4096).pc.key)
    assert "prune_after=4096" in msg and "say nothing about compression" in msg
    # a decode-mode run: the reason is prompt + new tokens, not the prefill cut's rule
    assert "prompt + new tokens never exceeded prune_after=4096; the longest was 2148 tokens" in msg
    assert "prefill mode" not in msg
    null = next(f for f in data["flags"] if f["config_key"] == Cfg("knorm", 1.0, 4096).pc.key)
    assert null["kind"] == "full_cache_path"
    assert "full cache's code path" in null["message"] and "noise" in null["message"]
    assert "overhead" not in null["message"] and "prune_after" not in null["message"]
    # ...and it does not appear when the configurations did compress
    assert "no_compression" not in kinds(report_json(db, "--run-id", str(fill_run(store))))


def test_ttft_change_beyond_noise_is_called_a_timing_artifact(store, db):
    run = fill_run(store, ttft_factor={KNORM_09: 0.7})
    data = report_json(db, "--run-id", str(run))
    [flag] = [f for f in data["flags"] if f["kind"] == "ttft_artifact"]
    assert flag["config_key"] == KNORM_09
    assert "timing artifact" in flag["message"] and "not a gain" in flag["message"]
    assert "The press does nothing before the first token" in flag["message"]
    row = next(r for r in data["rows"] if r["config_key"] == KNORM_09)
    assert row["verdicts"]["ttft_s"] == "artifact"
    assert f"TTFT {abs(row['changes']['ttft_s']):.1f}% lower than the full cache" in flag["message"]
    slower = report_json(db, "--run-id", str(fill_run(store, ttft_factor={KNORM_09: 1.4})))
    [flag] = [f for f in slower["flags"] if f["kind"] == "ttft_artifact"]
    assert "% higher than the full cache" in flag["message"] and "not a slower prefill" in flag["message"]
    assert all(r["verdicts"]["ttft_s"] in (None, "noise", "same") for r in data["rows"] if r["config_key"] != KNORM_09)


def test_a_ttft_change_is_the_presss_where_it_works_before_the_first_token(store, db):
    """The context and query-aware protocols cut before what they feed after the cut, a chunked
    prefill cuts between chunks, an observing press hooks the prefill forward: all inside TTFT,
    so a TTFT change there is a finding (better/worse), not an artifact."""
    import sqlite3

    run = fill_run(store, task="passkey", configs=(Cfg(), Cfg("knorm", 0.5, mode="prefill")), n_samples=6,
                   ttft_factor={Cfg("knorm", 0.5, mode="prefill").pc.key: 1.5}, prompt_tokens=(160,))
    key = Cfg("knorm", 0.5, mode="prefill").pc.key
    row = rows_by_key(report_json(db, "--run-id", str(run)))[key]
    assert row["verdicts"]["ttft_s"] == "worse"  # protocol context, 12 question tokens (report_data)
    with sqlite3.connect(db) as con:  # query-aware: the answer prefix is fed after the cut
        con.execute("UPDATE samples SET protocol = 'query-aware' WHERE run_id = ?", (run,))
    assert rows_by_key(report_json(db, "--run-id", str(run)))[key]["verdicts"]["ttft_s"] == "worse"
    with sqlite3.connect(db) as con:  # paper: the first token comes from the prefill, before the cut
        con.execute("UPDATE samples SET protocol = 'paper' WHERE run_id = ?", (run,))
    data = report_json(db, "--run-id", str(run))
    assert rows_by_key(data)[key]["verdicts"]["ttft_s"] == "artifact"
    assert [f["config_key"] for f in data["flags"] if f["kind"] == "ttft_artifact"] == [key]
    with sqlite3.connect(db) as con:  # the same run, prefilled in chunks smaller than its prompts
        [(config,)] = con.execute("SELECT config_json FROM runs WHERE id = ?", (run,)).fetchall()
        con.execute("UPDATE runs SET config_json = ? WHERE id = ?",
                    (json.dumps({**json.loads(config), "prefill_chunk": 64}), run))
    assert rows_by_key(report_json(db, "--run-id", str(run)))[key]["verdicts"]["ttft_s"] == "worse"
    with sqlite3.connect(db) as con:  # no chunks, the paper's protocol, but a press that hooks the prefill
        con.execute("UPDATE runs SET config_json = ? WHERE id = ?", (config, run))
        con.execute("UPDATE samples SET press = 'snapkv' WHERE run_id = ? AND config_key = ?", (run, key))
    assert rows_by_key(report_json(db, "--run-id", str(run)))[key]["verdicts"]["ttft_s"] == "worse"


def test_disturbed_timings_are_flagged_when_a_null_configuration_moves(store, db):
    knorm_1 = Cfg("knorm", 1.0).pc.key
    calm = report_json(db, "--run-id", str(fill_run(store)))
    assert "noisy_timing" not in kinds(calm)
    data = report_json(db, "--run-id", str(fill_run(store, tpot_factor={knorm_1: 0.5})))
    [flag] = [f for f in data["flags"] if f["kind"] == "noisy_timing"]
    null = next(r for r in data["rows"] if r["config_key"] == knorm_1)
    assert null["changes"]["tpot_s"] < -40
    assert flag["config_key"] == knorm_1 and "evicts nothing" in flag["message"]
    assert f"by {null['changes']['tpot_s']:+.1f}%" in flag["message"]


def test_noise_estimate_uses_keep_ratio_one(store, db):
    knorm_1 = Cfg("knorm", 1.0).pc.key
    run = fill_run(store, ttft_factor={knorm_1: 1.2})  # the null configuration moves by ~20%
    data = report_json(db, "--run-id", str(run))
    null = next(r for r in data["rows"] if r["config_key"] == knorm_1)
    assert data["noise_pct"] == pytest.approx(abs(null["changes"]["ttft_s"])) and data["noise_pct"] > 10
    assert "knorm 1.0 vs the full cache" in data["noise_source"] and data["noise_measured"]


def test_single_configuration_and_missing_reference(store, db):
    only_ref = fill_run(store, configs=(Cfg(),))
    data = report_json(db, "--run-id", str(only_ref))
    assert len(data["rows"]) == 1 and data["flags"] == []
    assert all(v is None for v in data["rows"][0]["change_intervals"].values())
    assert report(db, "--run-id", str(only_ref)).exit_code == 0

    only_press = fill_run(store, configs=(Cfg("knorm", 0.7),))
    data = report_json(db, "--run-id", str(only_press))
    assert kinds(data) == ["no_reference"]
    assert all(v is None for v in data["rows"][0]["changes"].values())


def test_run_without_samples_reports_that(store, db):
    run = store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="knormctl sweep")
    data = report_json(db, "--run-id", str(run))
    assert data["rows"] == [] and data["tasks"] == [] and data["needle_cells"] == []
    result = report(db, "--run-id", str(run))
    assert result.exit_code == 0 and "no samples stored for this run" in result.stdout


def test_memory_all_na_shows_the_reason(store, db):
    run = fill_run(store, memory=False)
    data = report_json(db, "--run-id", str(run))
    assert all(r["values"]["peak_mem_bytes"] is None and r["peak_mem_reason"] == NO_MEM for r in data["rows"])
    out = " ".join(report(db, "--run-id", str(run)).stdout.split())  # rich wraps long lines
    assert "N/A" in out and NO_MEM in out
    md = report(db, "--run-id", str(run), "--format", "markdown").stdout
    assert f"N/A ({NO_MEM})" in md


# ------------------------------------------------------------------ other views


def test_list_shows_recent_runs_newest_first(store, db):
    a = fill_run(store)
    b = fill_run(store, status="interrupted", stop_after=3, model="other-model")
    runs = report_json(db, "--list")
    assert [r["id"] for r in runs] == [b, a]
    assert runs[0]["status"] == "interrupted" and runs[0]["model"] == "other-model"
    assert runs[1]["datasets"] == "wiki-lite x2, wiki-lite-long x1"
    out = report(db, "--list").stdout
    assert "other-model" in out and "interrupted" in out and "15/15" in out
    parsed = list(csv.DictReader(io.StringIO(report(db, "--list", "--format", "csv").stdout)))
    assert [int(r["id"]) for r in parsed] == [b, a]


def test_default_is_the_last_run_and_samples_view(store, db):
    fill_run(store)
    last = fill_run(store, seed=5, fail=(0, KNORM_09))
    assert report_json(db)["header"]["run_ids"] == [last]
    data = report_json(db, "--samples")
    assert len(data["samples"]) == 15 and data["samples"][0]["config_key"] == REFERENCE_KEY
    assert {"repeat", "subtask", "score", "score_metric", "context_length"} <= set(data["samples"][0])
    out = report(db, "--samples").stdout
    assert "samples" in out and "CUDA out of memory" in out
    assert len(list(csv.DictReader(io.StringIO(report(db, "--samples", "--format", "csv").stdout)))) == 15


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
@pytest.mark.parametrize("width", [80, 120])
def test_the_samples_table_splits_on_a_narrow_terminal_and_cuts_no_number(store, db, width, terminal):
    import re

    from rich.console import Console

    from knormctl.render.tables import print_samples

    run = fill_run(store, fail=(0, KNORM_09))
    samples = store.samples(run)
    out = io.StringIO()
    print_samples(samples, Console(file=out, width=width, force_terminal=terminal, color_system=None),
                  {REFERENCE_KEY: "full cache"})
    text = out.getvalue()
    lines = text.splitlines()
    assert "\u2026" not in text and max(map(len, lines)) <= width
    parts = [ln for ln in lines if re.match(r"samples( \(\d+/\d+\))?\s*$", ln)]
    assert len(parts) > 1 if width == 80 else len(parts) >= 1
    for head in ("TTFT ms", "TPOT ms", "tok/s", "ppl", "match", "error"):  # every value column, somewhere
        assert head in text, head
    # each part repeats which sample a line is: one line per sample in every part
    assert text.count("full cache") == len(parts) * sum(s.config_key == REFERENCE_KEY for s in samples)
    assert "CUDA out of" in text  # the error column folds its text (the one column that wraps)


def test_compare_shows_ratios_b_over_a(store, db):
    a = fill_run(store, seed=1)
    b = fill_run(store, seed=2)
    data = report_json(db, "--compare", str(a), str(b))
    assert data["a"]["run_ids"] == [a] and data["b"]["run_ids"] == [b]
    sa, sb = (report_json(db, "--run-id", str(r)) for r in (a, b))
    va = {r["config_key"]: r["values"] for r in sa["rows"]}
    vb = {r["config_key"]: r["values"] for r in sb["rows"]}
    assert len(data["rows"]) == 5
    for row in data["rows"]:
        k = row["config_key"]
        assert row["ratio"]["ttft_s"] == pytest.approx(vb[k]["ttft_s"] / va[k]["ttft_s"])
        assert row["ratio"]["ppl_compressed"] == pytest.approx(vb[k]["ppl_compressed"] / va[k]["ppl_compressed"])
    out = report(db, "--compare", str(a), str(b))
    assert out.exit_code == 0 and "B/A" in out.stdout
    # the table: each cell A, then B, then xB/A, under its own row and column
    from knormctl.render.format import fmt_value
    from knormctl.render.metrics import METRIC

    wide = runner.invoke(app, ["report", "--db", db, "--compare", str(a), str(b)], env={"COLUMNS": "120"})
    cells = parse_tables(wide.stdout)
    checked = 0
    for row in data["rows"]:
        for name in ("ttft_s", "tpot_s", "kv_bytes_final", "ppl_compressed"):
            cell = cells[(row["label"], METRIC[name].label)]
            assert cell == [fmt_value(name, va[row["config_key"]][name]), fmt_value(name, vb[row["config_key"]][name]),
                            f"x{row['ratio'][name]:.3f}"], (row["label"], name, cell)
            checked += 1
    assert checked == 5 * 4
    recs = list(csv.DictReader(io.StringIO(report(db, "--compare", str(a), str(b), "--format", "csv").stdout)))
    assert float(recs[0]["ttft_s_ratio"]) == pytest.approx(data["rows"][0]["ratio"]["ttft_s"])
    # a CPU peak RSS carries each process's history: the comparison says so wherever it shows it
    import sqlite3

    assert data["notes"] == []
    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET peak_mem_kind = 'cpu_process_rss_peak'")
    assert "process's RSS high-water mark" in report_json(db, "--compare", str(a), str(b))["notes"][0]
    for out in (report(db, "--compare", str(a), str(b)).stdout,
                report(db, "--compare", str(a), str(b), "--format", "markdown").stdout):
        assert "compare KV peak and KV final instead" in " ".join(out.split())


def test_compare_refuses_runs_of_different_models(store, db):
    a = fill_run(store)
    b = fill_run(store, model="pythia-70m")
    line = one_error_line(report(db, "--compare", str(a), str(b)))
    assert f"runs {a} and {b} used different models (smollm2-135m vs pythia-70m)" in line


def test_group_merges_its_runs(store, db):
    a = fill_run(store, group="g1", stop_after=8, status="interrupted")
    b = fill_run(store, group="g1", seed=3)
    fill_run(store)  # not in the group
    data = report_json(db, "--group", "g1")
    assert data["header"]["run_ids"] == [a, b] and data["header"]["group_name"] == "g1"
    assert sum(r["n_samples"] for r in data["rows"]) == 8 + 15
    assert "interrupted" in kinds(data)
    assert [r["id"] for r in report_json(db, "--list", "--group", "g1")] == [b, a]


# ------------------------------------------------------------------ errors


def test_unknown_run_id_is_one_line_and_exit_2(store, db):
    fill_run(store)
    line = one_error_line(report(db, "--run-id", "99"))
    assert "run 99 does not exist" in line
    assert "no runs in group 'nope'" in one_error_line(report(db, "--group", "nope"))
    assert "choose one of" in one_error_line(report(db, "--list", "--run-id", "1"))
    # --last was dropped beside --group; --list --group said nothing wrong about a group that is not there
    assert "--last and --group select different things" in one_error_line(report(db, "--last", "--group", "g"))
    assert "no runs in group 'nope'" in one_error_line(report(db, "--list", "--group", "nope"))
    res = runner.invoke(app, ["plot", "--db", db, "--last", "--group", "g"])
    assert res.exit_code == 2 and "--last and --group select different things" in res.stderr
    assert "different things" in one_error_line(report(db, "--run-id", "1", "--group", "g"))
    # an option the chosen view would ignore is refused, not dropped
    assert one_error_line(report(db, "--limit", "5")) == "Error: --limit applies to --list"
    assert "--tasks applies to --format csv" in one_error_line(report(db, "--tasks", "--format", "json"))
    assert one_error_line(report(db, "--list", "--samples", "--by-dataset")) == \
        "Error: --samples, --by-dataset cannot be used with --list"
    assert one_error_line(report(db, "--compare", "1", "1", "--samples")) == \
        "Error: --samples cannot be used with --compare"
    assert report(db, "--compare", "1", "1", "--by-dataset").exit_code == 0  # compare reads datasets apart
    assert report(db, "--list", "--limit", "1").exit_code == 0


def test_empty_database_says_so(store, db):  # an existing database without runs (a missing one is an error)
    result = report(db)
    assert "no runs in" in one_error_line(result, code=1)
    listed = report(db, "--list")
    assert listed.exit_code == 0 and "no runs in" in listed.stderr


def test_report_imports_neither_torch_nor_matplotlib(store, db):
    fill_run(store)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from knormctl.cli import app\n"
        f"for fmt in ('table', 'json'):\n"
        f"    r = CliRunner().invoke(app, ['report', '--db', {db!r}, '--format', fmt])\n"
        "    assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'knormctl.engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_metric_names_are_stable():
    """The json/csv keys are part of the interface (README, scripts): changing them is a breaking change."""
    assert [m.name for m in METRICS] == [
        "ttft_s", "tpot_s", "itl_p90_s", "throughput_tps", "peak_mem_bytes", "kv_bytes_peak", "kv_bytes_final",
        "compress_events", "compress_time_s", "ppl_context", "ppl_compressed", "token_match", "accuracy"]


def test_the_header_says_how_decode_steps_ran(store, db):
    """--decode-step changes what the timings measure: the header says so, in json and markdown,
    and runs merged into one header that ran their steps differently say that too."""
    from knormctl.render.header import run_header

    graphed = fill_run(store, settings={"decode_step": "graph"})
    launched = fill_run(store, seed=1)
    assert report_json(db, "--run-id", str(graphed))["header"]["decode_step"] == "graph"
    assert report_json(db, "--run-id", str(launched))["header"]["decode_step"] == "launched"
    assert "decode steps replayed from CUDA graphs" in report(db, "--run-id", str(graphed), "--format",
                                                              "markdown").stdout
    assert "decode step" not in report(db, "--run-id", str(launched), "--format", "markdown").stdout
    assert run_header([store.get_run(graphed), store.get_run(launched)]).decode_step is None


def test_the_header_and_compare_say_how_each_run_was_deployed(store, db):
    """A chunked prefill changes TTFT and the KV peak, a batch makes throughput per row: the single
    run's header did not name the chunk, and `--compare` named none of batch, chunk, decode step."""
    from knormctl.render.header import run_header

    chunked = fill_run(store, settings={"prefill_chunk": 32})
    plain = fill_run(store, seed=1)
    batched = fill_run(store, seed=2, settings={"batch_size": 3, "decode_step": "static"})
    assert report_json(db, "--run-id", str(chunked))["header"]["prefill_chunk"] == 32
    assert report_json(db, "--run-id", str(plain))["header"]["prefill_chunk"] == 0
    assert "prefill in chunks of 32 tokens (cut after each)" in report(db, "--run-id", str(chunked), "--format",
                                                                       "markdown").stdout
    assert "prefill in chunks" not in report(db, "--run-id", str(plain), "--format", "markdown").stdout
    assert run_header([store.get_run(chunked), store.get_run(plain)]).prefill_chunk is None
    res = runner.invoke(app, ["report", "--db", db, "--compare", str(chunked), str(batched)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    a_line = next(x for x in res.stdout.splitlines() if "A = run" in x)
    b_line = next(x for x in res.stdout.splitlines() if "B = run" in x)
    assert "; prefill in chunks of 32 tokens, cut after each, started" in a_line
    assert "; batch 3 (throughput per row); decode step static, started" in b_line


def test_every_csv_row_says_the_runs_status(store, db):
    """An interrupted run's csv (5 of 9 cells) looked complete: every other view says it."""
    cut = fill_run(store, status="interrupted", stop_after=7)
    for extra in ([], ["--samples"]):
        recs = list(csv.DictReader(io.StringIO(report(db, "--run-id", str(cut), "--format", "csv", *extra).stdout)))
        assert recs and {r["run_status"] for r in recs} == {"interrupted"}
    task = fill_run(store, task="passkey", configs=(Cfg(mode="prefill"), Cfg("knorm", 0.5, mode="prefill")),
                    n_samples=4, prompt_tokens=(1024,))
    recs = list(csv.DictReader(io.StringIO(report(db, "--run-id", str(task), "--format", "csv", "--tasks").stdout)))
    assert recs and {r["run_status"] for r in recs} == {"complete"}


def test_markdown_escapes_names_that_look_like_markup(store, db):
    """A group '<script>alert(1)</script>&"g' and a model dir 'm<b>&x' went into the markdown raw:
    a CommonMark renderer passed the script through and made the rest of the page bold."""
    run = fill_run(store, group="<script>alert(1)</script>&g", model="/models/m<b>&x")
    text = report(db, "--run-id", str(run), "--format", "markdown").stdout
    assert "<script>" not in text and "<b>" not in text
    assert "&lt;script>alert(1)&lt;/script>&amp;g" in text and "m&lt;b>&amp;x" in text


def test_values_are_formatted_in_the_units_the_docs_promise():
    """Guards against (ms up to 10 s: '1500.0 ms'), (bytes in decimal thousands under a binary
    unit), (a fraction interval's upper end left unscaled: '[44, 1]')."""
    from knormctl.render.format import fmt_bytes, fmt_pct_interval, fmt_value

    assert fmt_value("tpot_s", 0.0123) == "12.3 ms"
    assert fmt_value("ttft_s", 1.5) == "1.50 s"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_value("kv_bytes_final", 3 * 2**20) == "3.0 MiB"
    assert fmt_value("peak_mem_bytes", 2**30) == "1.0 GiB"
    assert fmt_pct_interval((0.44, 0.97)) == "[44, 97]"


def test_json_writes_a_non_finite_value_as_null_instead_of_failing(store, db):
    """Guards against (_finite passed NaN/inf through: json.dumps(allow_nan=False) raised, so one
    overflowed perplexity crashed `report --format json`)."""
    from sqlalchemy import text

    run = fill_run(store, n_samples=3)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE samples SET ppl_compressed = 1e999 WHERE config_key = :k"), {"k": KNORM_07})
    data = report_json(db, "--run-id", str(run))
    assert rows_by_key(data)[KNORM_07]["values"]["ppl_compressed"] is None


def test_the_header_names_a_batch_only_when_there_is_one(store, db):
    """Guards against (the batch note on every run): 'batch 1 (throughput per row...)' in the header of
    a run that ran one row at a time."""
    plain = fill_run(store)
    batched = fill_run(store, seed=1, settings={"batch_size": 3})
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(plain), "--format", "markdown"]).stdout
    assert "batch" not in md.split("\n\n")[0]
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(batched), "--format", "markdown"]).stdout
    assert "batch 3 (throughput per row; x3 per batch)" in md


def test_markdown_samples_escape_the_pipes_of_configuration_keys(store, db):
    """Guards against (no '|' escape in markdown cells): a configuration key ('knorm|kr=0.7|...') split
    its cell into several columns of the --samples table."""
    run = fill_run(store, n_samples=2)
    md = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--samples", "--format", "markdown"]).stdout
    table = [ln for ln in md.splitlines() if ln.startswith(("| run_id", "| " + str(run)))]
    assert len(table) > 5
    assert len({ln.replace("\\|", "").count("|") for ln in table}) == 1
    assert any("\\|" in ln for ln in table)


def test_compare_markdown_cells_are_a_then_b_and_only_in_lists_the_right_side(store, db):
    """Guards against (markdown compare cells B / A under an 'A / B' title) and (only_in_a listing the
    shared configurations instead of those A alone has)."""
    from knormctl.render.format import fmt_value

    a = fill_run(store, seed=1)
    b = fill_run(store, seed=2, configs=(Cfg(), Cfg("knorm", 0.7), Cfg("streaming", 0.5)))
    data = report_json(db, "--compare", str(a), str(b))
    assert sorted(data["only_in_a"]) == sorted([Cfg("knorm", 1.0).pc.key, KNORM_09, Cfg("random", 0.7).pc.key])
    assert data["only_in_b"] == [Cfg("streaming", 0.5).pc.key]
    va = rows_by_key(report_json(db, "--run-id", str(a)))
    vb = rows_by_key(report_json(db, "--run-id", str(b)))
    md = runner.invoke(app, ["report", "--db", db, "--compare", str(a), str(b), "--format", "markdown"]).stdout
    line = next(ln for ln in md.splitlines() if ln.startswith("| knorm 0.7 "))
    ttft = f"{fmt_value('ttft_s', va[KNORM_07]['values']['ttft_s'])} / {fmt_value('ttft_s', vb[KNORM_07]['values']['ttft_s'])}"
    assert ttft in line
    # the configurations one run alone has, as the table and json list them (markdown and csv dropped them)
    assert f"- only in B: {Cfg('streaming', 0.5).pc.key}" in md
    recs = list(csv.DictReader(io.StringIO(runner.invoke(
        app, ["report", "--db", db, "--compare", str(a), str(b), "--format", "csv"]).stdout)))
    only = {(r["config_key"], r["only_in"]) for r in recs if r["only_in"]}
    assert only == {(k, "A") for k in data["only_in_a"]} | {(k, "B") for k in data["only_in_b"]}
    assert all(r["ttft_s_a"] == "" and r["ttft_s_b"] == "" for r in recs if r["only_in"])


def test_a_group_with_an_interrupted_run_is_not_called_complete(store, db):
    """Guards against (the group's status was its mildest run's): a group of a complete and an interrupted
    run read 'complete' in its header and in every csv row's run_status."""
    fill_run(store, group="g", stop_after=8, status="interrupted")
    fill_run(store, group="g", seed=3)
    assert report_json(db, "--group", "g")["header"]["status"] == "interrupted"
    csv_text = runner.invoke(app, ["report", "--db", db, "--group", "g", "--format", "csv"]).stdout
    assert {line.split(",")[0] for line in csv_text.splitlines()[1:]} == {"interrupted"}


def test_a_shard_is_named_for_one_run_only(store, db):
    """Guards against (a merged group's header named its first run's shard, as if the group were that shard)."""
    a = fill_run(store, group="sh", samples=[0, 1])
    b = fill_run(store, group="sh", samples=[2], seed=1)
    store.update_run(a, shard="1/2")
    store.update_run(b, shard="2/2")
    assert report_json(db, "--run-id", str(a))["header"]["shard"] == "1/2"
    assert report_json(db, "--group", "sh")["header"]["shard"] is None


def test_one_run_of_a_group_points_to_its_own_report(store):
    """Guards against (report_command named the group for a single run that has one): a figure of run 3
    sent readers to `report --group`, whose merged numbers and flags are not that run's."""
    from knormctl.render.header import run_header

    a = fill_run(store, group="g2", samples=[0, 1])
    b = fill_run(store, group="g2", samples=[2], seed=1)
    assert run_header([store.get_run(a)]).report_command == f"knormctl report --run-id {a}"
    assert run_header([store.get_run(a), store.get_run(b)]).report_command == "knormctl report --group g2"


def test_the_table_says_how_many_cells_of_a_configuration_failed(store, db):
    """Guards against (the configuration cell lost its 'N failed' line): the rich table showed a row
    with one prompt fewer and no word why."""
    run = fill_run(store, fail=(1, KNORM_07))
    out = runner.invoke(app, ["report", "--db", db, "--run-id", str(run)], env={"COLUMNS": "200"}).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("│")]
    assert sum("│ 1 failed" in ln for ln in lines) >= 1
    assert not any("│ 2 failed" in ln for ln in lines)


def test_compare_goes_by_the_model_hash_when_both_runs_have_one(store, db):
    """Guards against (same_model ignored the hashes): two runs of 'smollm2-135m' whose weights differ
    (another snapshot under the same name) were compared as one model."""
    a = fill_run(store, seed=1)
    b = fill_run(store, seed=2)
    store.update_run(b, model_hash="sha256:another-snapshot")
    res = runner.invoke(app, ["report", "--db", db, "--compare", str(a), str(b)])
    assert res.exit_code == 2 and "used different models" in res.stderr, res.output


def test_a_group_with_a_run_of_unknown_plan_has_no_planned_total(store, db):
    """Guards against (an unknown plan counted as 0): '11 of 8 planned cells' for a group one of whose
    runs stored no planned count."""
    a = fill_run(store, group="pl", samples=[0, 1])
    fill_run(store, group="pl", samples=[2], seed=1)
    store.update_run(a, samples_planned=None)
    h = report_json(db, "--group", "pl")["header"]
    assert h["samples_planned"] is None
    md = runner.invoke(app, ["report", "--db", db, "--group", "pl", "--format", "markdown"]).stdout
    assert "planned cells" not in md and f"{h['samples_done']} cells" in md


def test_the_run_list_shows_cells_done_of_planned(store, db):
    """Guards against (the list's cells column 'planned/done'): an interrupted run of 7 of 15 cells read '15/7'."""
    run = fill_run(store, status="interrupted", stop_after=7)
    out = runner.invoke(app, ["report", "--db", db, "--list"], env={"COLUMNS": "160"}).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(str(run)))
    assert "7/15" in line and "15/7" not in line, line


def test_identical_outputs_on_a_few_prompts_are_not_read_as_the_same(store, db):
    """knorm 0.7 produced the full cache's tokens on all 3 prompts: its token-match change was
    [+0, +0], 'same', as certain as knorm 1.0's (which runs the full cache's code path). A
    configuration that evicts gets the binomial bound instead; keep 1.0 stays 'same'."""
    import sqlite3

    run = fill_run(store, n_samples=3)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET token_match = 1.0 WHERE run_id = ?", (run,))
    rows = rows_by_key(report_json(db, "--run-id", str(run)))
    h = 100 * (1 - 0.025 ** (1 / 3))
    assert rows[KNORM_07]["changes"]["token_match"] == 0
    assert rows[KNORM_07]["change_intervals"]["token_match"] == pytest.approx([-h, 0])  # it cannot beat 100%
    assert rows[KNORM_07]["verdicts"]["token_match"] == "noise"
    keep_all = Cfg("knorm", 1.0).pc.key
    assert rows[keep_all]["change_intervals"]["token_match"] == [0, 0]
    assert rows[keep_all]["verdicts"]["token_match"] == "same"
    with sqlite3.connect(db) as con:  # no token in common on any prompt: worse, even from 3 prompts
        con.execute("UPDATE samples SET token_match = 0.0 WHERE run_id = ? AND config_key = ?", (run, KNORM_07))
    row = rows_by_key(report_json(db, "--run-id", str(run)))[KNORM_07]
    assert row["change_intervals"]["token_match"] == pytest.approx([-100, -100 + h])
    assert row["verdicts"]["token_match"] == "worse"


def test_every_na_cell_says_why_in_every_output(store, db):
    """Only peak memory carried a reason: a configuration whose answers were one token long
    showed a bare N/A for TPOT in the table, markdown, JSON (null) and figures."""
    import sqlite3

    from knormctl.render.figures import speed, table

    run = fill_run(store, n_samples=3)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET tpot_s = NULL, itl_p90_s = NULL, new_tokens = 1 "
                    "WHERE run_id = ? AND config_key = ?", (run, KNORM_07))
    why = "one new token per answer: no decode step to time"
    row = rows_by_key(report_json(db, "--run-id", str(run)))[KNORM_07]
    assert row["values"]["tpot_s"] is None and row["na_reasons"]["tpot_s"] == why
    assert "ttft_s" not in row["na_reasons"]  # only the metrics that are N/A
    plain = " ".join(report(db, "--run-id", str(run)).stdout.split())
    assert f"TPOT N/A for knorm 0.7: {why}" in plain
    markdown = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "markdown"]).stdout
    assert f"N/A ({why})" in markdown
    [csv_row] = [r for r in csv.DictReader(io.StringIO(runner.invoke(
        app, ["report", "--db", db, "--run-id", str(run), "--format", "csv"]).stdout)) if r["config_key"] == KNORM_07]
    assert f"tpot_s: {why}" in csv_row["na_reasons"]
    summary = build_summary([store.get_run(run)], store.samples(run))
    for fig in (speed.comprehensive(summary), speed.summary_figure(summary), table.table(summary)):
        words = " ".join(" ".join(t.get_text() for t in fig.texts).split())
        assert why in words, fig
