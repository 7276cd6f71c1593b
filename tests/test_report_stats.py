"""The report's statistics: intervals (bootstrap, Wilson) and what they promise, the verdict
rule, the samples-needed estimate, repeats, token match (one definition), and groups whose
runs split the prompts between machines."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import defaultdict

import pytest
from report_data import ENV, Cfg, fill_run
from typer.testing import CliRunner

from knormctl import stats
from knormctl.cli import app
from knormctl.render.summary import REFERENCE_KEY, build_summary

runner = CliRunner()
KNORM_07 = Cfg("knorm", 0.7).pc.key
KNORM_09 = Cfg("knorm", 0.9).pc.key
KNORM_1 = Cfg("knorm", 1.0).pc.key


def report_json(db, *args):
    result = runner.invoke(app, ["report", "--db", db, *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows_by_key(data, dataset=None):
    return {r["config_key"]: r for r in data["rows"] if r["dataset"] == dataset}


# ------------------------------------------------------------------ primitives


def test_token_match_is_one_definition_divided_by_the_longer_output():
    from knormctl import runner as run_module

    assert run_module.token_match is stats.token_match  # the runner stores what the report would compute
    assert stats.token_match([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert stats.token_match([1, 2, 9, 4], [1, 2, 3, 4]) == 0.75
    # an output that stops early does not score 100%: missing tokens are mismatches
    assert stats.token_match([1, 2], [1, 2, 3, 4]) == 0.5
    assert stats.token_match([1, 2, 3, 4], [1, 2]) == 0.5
    assert stats.token_match([], []) is None and stats.token_match(None, [1]) is None


def test_bootstrap_interval_is_seeded_and_exact_where_it_can_be_worked_out():
    xs = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]
    a = stats.bootstrap_interval(xs, "mean", seed=7)  # means: seeded resampling
    assert a == stats.bootstrap_interval(xs, "mean", seed=7)  # reproducible
    assert a != stats.bootstrap_interval(xs, "mean", seed=8)  # and really resampled
    assert a[0] <= statistics.fmean(xs) <= a[1] and min(xs) <= a[0] and a[1] <= max(xs)
    m = stats.bootstrap_interval(xs, "median", seed=7)
    assert m[0] <= statistics.median(xs) <= m[1]
    # Two values: the resampled median is a, (a+b)/2 or b with 1/4, 1/2, 1/4; the 2.5% and 97.5% points are a and b.
    assert stats.bootstrap_interval([2.0, 10.0], "median", seed=1) == (2.0, 10.0)
    # No spread, no uncertainty; one value, no interval.
    assert stats.bootstrap_interval([4.0, 4.0, 4.0], "mean", seed=1) == (4.0, 4.0)
    assert stats.bootstrap_interval([4.0], "median", seed=1) is None
    # median_low stays on observed values (counts)
    lo, hi = stats.bootstrap_interval([1, 2, 2, 3, 5, 8], "median_low", seed=3)
    assert lo in (1, 2, 3, 5, 8) and hi in (1, 2, 3, 5, 8)


@pytest.mark.parametrize("n", [4, 5, 6])
@pytest.mark.parametrize("how", ["median", "median_low"])
def test_exact_median_bootstrap_equals_enumerating_every_resample(n, how):
    import itertools

    rng = random.Random(n)
    xs = [round(rng.gauss(0, 1), 2) for _ in range(n)]
    xs[1] = xs[0]  # ties too
    brute: dict[float, float] = defaultdict(float)
    for idx in itertools.product(range(n), repeat=n):  # all n**n equally likely resamples
        v = [xs[i] for i in idx]
        brute[statistics.median(v) if how == "median" else statistics.median_low(v)] += 1 / n ** n
    exact: dict[float, float] = defaultdict(float)
    for value, p in stats.median_bootstrap_distribution(xs, how):
        exact[value] += p
    assert set(exact) <= set(brute)
    assert all(exact[k] == pytest.approx(brute[k], abs=1e-12) for k in brute)


def test_exact_and_resampled_median_intervals_agree_beyond_the_exact_limit():
    import numpy as np

    rng = random.Random(2)
    xs = [rng.gauss(0, 5) for _ in range(30)]
    exact = stats.bootstrap_interval(xs, "median", seed=0)
    x = np.asarray(xs)
    many = np.median(x[np.random.default_rng(0).integers(0, 30, size=(100_000, 30))], axis=1)
    assert exact == pytest.approx(tuple(np.percentile(many, [2.5, 97.5])), abs=0.05)
    big = [rng.gauss(0, 5) for _ in range(stats.EXACT_MEDIAN_MAX_N + 1)]  # resampled, seeded
    assert stats.bootstrap_interval(big, "median", seed=1) == stats.bootstrap_interval(big, "median", seed=1)


def test_bootstrap_covers_the_true_median_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits = 0
    trials = 200
    for t in range(trials):
        xs = [rng.gauss(10.0, 3.0) for _ in range(30)]
        lo, hi = stats.bootstrap_interval(xs, "median", seed=t)
        hits += lo <= 10.0 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits


def test_wilson_interval_matches_the_textbook_values():
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert stats.wilson_interval(0, 0) is None


def test_only_right_or_wrong_scores_get_a_wilson_interval():
    """Accuracy scores of 0 or 1 are answers right or wrong: Wilson. Token match is a share of
    tokens: prompts at exactly 100% (the full cache, by definition) are not 2 coin tosses, so it
    gets the bootstrap ([1, 1] there) and, like every bootstrap, nothing from one prompt."""
    from knormctl.render.metrics import METRIC
    from knormctl.render.paired import value_stat

    two = {("d", 0, "a"): 1.0, ("d", 1, "b"): 1.0}
    assert value_stat(METRIC["token_match"], two, seed=0).interval == (1.0, 1.0)
    assert value_stat(METRIC["token_match"], {("d", 0, "a"): 1.0}, seed=0).interval is None
    mixed = {("d", 0, "a"): 0.0, ("d", 1, "b"): 1.0}
    assert value_stat(METRIC["token_match"], mixed, seed=0).interval == (0.0, 1.0)  # the bootstrap of a mean
    assert value_stat(METRIC["accuracy"], two, seed=0).interval == pytest.approx(stats.wilson_interval(2, 2))
    assert value_stat(METRIC["accuracy"], {("d", 0, "a"): 0.5, ("d", 1, "b"): 1.0}, seed=0).interval == (0.5, 1.0)


def test_samples_needed_gives_the_power_it_promises():
    """n_needed from a null run's interval: a run of that size with a true 5% change then
    detects it (interval excludes 0) about 80% of the time."""
    rng = random.Random(1)
    sd = 6.0  # per-prompt changes (%) scatter this much
    pilot = [rng.gauss(0.0, sd) for _ in range(10)]
    interval = stats.bootstrap_interval(pilot, "median", seed=0)
    assert interval[0] < 0 < interval[1]
    needed = stats.samples_needed(len(pilot), interval, 5.0)
    assert needed is not None and needed > 10
    detected = 0
    for t in range(60):
        xs = [rng.gauss(5.0, sd) for _ in range(needed)]
        lo, _ = stats.bootstrap_interval(xs, "median", seed=100 + t)
        detected += lo > 0
    assert detected / 60 >= 0.6, (needed, detected)
    # scaling: 4x the prompts, half the width, same answer; a narrow interval needs nothing more
    wider = (interval[0] * 2 ** 0.5, interval[1] * 2 ** 0.5)  # half the prompts: sqrt(2) wider
    assert stats.samples_needed(5, wider, 5.0) == pytest.approx(needed, abs=2)
    assert stats.samples_needed(10, (-0.5, 0.5), 5.0) is None


# ------------------------------------------------------------------ verdicts follow the interval


def test_a_small_change_whose_interval_spans_zero_is_no_detectable_difference(store, db):
    # peak memory jitters +-3% per sample while knorm 0.9 saves ~0.6%: the interval spans zero
    run = fill_run(store, n_samples=10, mem_jitter=0.03)
    data = report_json(db, "--run-id", str(run))
    row = rows_by_key(data)[KNORM_09]
    lo, hi = row["change_intervals"]["peak_mem_bytes"]
    assert lo < 0 < hi and abs(row["changes"]["peak_mem_bytes"]) < 3
    assert row["verdicts"]["peak_mem_bytes"] == "noise"
    # deterministic KV bytes: a zero-width interval away from zero is a finding
    lo, hi = row["change_intervals"]["kv_bytes_final"]
    assert lo == pytest.approx(hi) and hi < 0
    assert row["verdicts"]["kv_bytes_final"] == "better"
    # the same verdicts in csv
    result = runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "csv"])
    import csv
    import io

    rec = next(r for r in csv.DictReader(io.StringIO(result.stdout)) if r["config_key"] == KNORM_09)
    assert rec["peak_mem_bytes_verdict"] == "noise" and rec["kv_bytes_final_verdict"] == "better"


def test_intervals_are_reproducible_and_paired_by_prompt(store, db):
    run = fill_run(store, n_samples=8)
    first, second = report_json(db, "--run-id", str(run)), report_json(db, "--run-id", str(run))
    assert first["rows"] == second["rows"]
    # the interval is a bootstrap over per-prompt changes: rebuild it from the stored rows
    samples = store.samples(run)
    ref = {s.sample_index: s.tpot_s for s in samples if s.config_key == REFERENCE_KEY}
    changes = [(s.tpot_s / ref[s.sample_index] - 1) * 100 for s in samples if s.config_key == KNORM_07]
    row = rows_by_key(first)[KNORM_07]
    assert row["changes"]["tpot_s"] == pytest.approx(statistics.median(changes))
    lo, hi = row["change_intervals"]["tpot_s"]
    assert min(changes) <= lo <= statistics.median(changes) <= hi <= max(changes)
    assert row["n_pairs"]["tpot_s"] == 8
    # ...and it is the seeded bootstrap of those changes, not any range around the median
    # (the min..max of the changes passed the lines above)
    from knormctl.render.paired import metric_seed

    assert (lo, hi) == pytest.approx(stats.bootstrap_interval(changes, "median",
                                                              seed=metric_seed(KNORM_07, "tpot_s", "change")))
    assert (lo, hi) != pytest.approx((min(changes), max(changes)))


def test_a_timing_change_within_the_runs_noise_is_noise_even_when_its_interval_excludes_zero(store, db):
    """The verdict rule for timings: beyond the interval AND beyond the run's measured noise
    (keep 1.0 against the full cache). Nothing tested the second half: dropped, a steady 3%
    inside a 6% noise band read as 'worse'."""
    from knormctl.render.metrics import METRIC
    from knormctl.render.paired import Stat, verdict

    tpot = METRIC["tpot_s"]
    steady = Stat(value=1.0, interval=None, change=3.0, change_interval=(2.5, 3.5), n_pairs=20, n_needed=None,
                  verdict=None)
    assert verdict(tpot, steady, noise_pct=6.0) == "noise"
    assert verdict(tpot, steady, noise_pct=1.0) == "worse"
    assert verdict(METRIC["kv_bytes_final"], steady, noise_pct=6.0) == "worse"  # not a timing: no noise band
    # end to end: knorm 1.0 is 12% slower than the full cache (the run's noise), knorm 0.9 ~5% slower
    run = fill_run(store, n_samples=40, tpot_factor={KNORM_1: 1.12, KNORM_09: 1.06})
    data = report_json(db, "--run-id", str(run))
    assert data["noise_pct"] > 5.0
    row = rows_by_key(data)[KNORM_09]
    lo, hi = row["change_intervals"]["tpot_s"]
    assert lo > 0 and hi < data["noise_pct"], (lo, hi, data["noise_pct"])  # clear of zero, inside the noise
    assert row["verdicts"]["tpot_s"] == "noise"


def test_underpowered_changes_say_how_many_prompts_would_tell_5_percent(store, db):
    run = fill_run(store, n_samples=4)
    data = report_json(db, "--run-id", str(run))
    flagged = [f for f in data["flags"] if f["kind"] == "underpowered"]
    needed = {(r["config_key"], m): n for r in data["rows"] for m, n in r["n_needed"].items() if n is not None}
    assert needed and len(flagged) == 1
    for (key, m), n in needed.items():
        row = rows_by_key(data)[key]
        lo, hi = row["change_intervals"][m]
        assert lo <= 0 <= hi and n > row["n_pairs"][m]  # only where this run cannot tell
    assert "prompts needed for 80% power" in flagged[0]["message"]
    assert "few_prompts" in [f["kind"] for f in data["flags"]]  # 4 prompts: intervals are optimistic


@pytest.mark.parametrize("n, flagged", [(2, True), (5, True), (6, False)])
def test_intervals_from_fewer_than_six_prompts_are_called_optimistic(store, db, n, flagged):
    """The few_prompts flag covers every count from 2 to 5 (the docs' threshold is 6), not just some."""
    data = report_json(db, "--run-id", str(fill_run(store, n_samples=n)))
    assert ("few_prompts" in [f["kind"] for f in data["flags"]]) == flagged


def test_a_count_is_the_lower_middle_prompts_count(store, db):
    """Counts (compressions) are reported as an observed prompt's count, with an even number of
    prompts the lower middle one (the rule the docs give), not a half-count between two prompts."""
    run = fill_run(store, n_samples=4)
    data = report_json(db, "--run-id", str(run))
    counts = defaultdict(list)
    for s in store.samples(run):
        counts[s.config_key].append(s.compress_events)
    row = rows_by_key(data)[KNORM_07]
    seen = sorted(counts[KNORM_07])
    assert seen[1] != seen[2]  # the two middle prompts differ: the choice between them shows
    assert row["values"]["compress_events"] == seen[1]


# ------------------------------------------------------------------ repeats


def test_repeats_are_reduced_per_prompt_before_pairing(store, db):
    run = fill_run(store, n_samples=4, repeats=3)
    data = report_json(db, "--run-id", str(run))
    samples = store.samples(run)
    per_prompt = defaultdict(list)
    for s in samples:
        per_prompt[(s.config_key, s.sample_index)].append(s.tpot_s)
    assert all(len(v) == 3 for v in per_prompt.values())
    for key, row in rows_by_key(data).items():
        meds = [statistics.median(per_prompt[(key, i)]) for i in range(4)]
        assert row["values"]["tpot_s"] == pytest.approx(statistics.median(meds))
        assert row["n_prompts"] == 4 and row["n_repeats"] == 3 and row["n_samples"] == 12
        if key != REFERENCE_KEY:
            ref = [statistics.median(per_prompt[(REFERENCE_KEY, i)]) for i in range(4)]
            assert row["changes"]["tpot_s"] == pytest.approx(statistics.median(
                (m / r - 1) * 100 for m, r in zip(meds, ref)))
            assert row["n_pairs"]["tpot_s"] == 4
    assert "repeats_disagree" not in [f["kind"] for f in data["flags"]]


def test_repeated_rounds_that_disagree_beyond_noise_are_flagged(store, db):
    # the third round of every cell ran 30% slower (the machine got busy)
    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.7)), n_samples=6, repeats=3, round_factor={2: 1.3})
    data = report_json(db, "--run-id", str(run))
    flagged = {f["config_key"]: f["message"] for f in data["flags"] if f["kind"] == "repeats_disagree"}
    assert set(flagged) == {REFERENCE_KEY, KNORM_07}
    assert "3 repeated rounds disagree by up to 3" in flagged[KNORM_07]
    ref = rows_by_key(data)[REFERENCE_KEY]
    assert ref["repeat_spread_pct"]["tpot_s"] == pytest.approx(30.0, abs=4)
    # the values are robust to the slow round: per-prompt medians over rounds
    assert ref["values"]["tpot_s"] < 0.032


# ------------------------------------------------------------------ groups


def test_a_group_sharded_by_sample_pairs_within_prompts_and_shows_every_machine(store, db):
    a = fill_run(store, group="g", n_samples=6, samples=[0, 2, 4], hostname="node-a", seed=1)
    b = fill_run(store, group="g", n_samples=6, samples=[1, 3, 5], hostname="node-b", seed=2)
    data = report_json(db, "--group", "g")
    h = data["header"]
    assert h["run_ids"] == [a, b]
    assert [m["hostname"] for m in h["machines"]] == ["node-a", "node-b"]
    assert [m["run_ids"] for m in h["machines"]] == [[a], [b]]
    assert h["differs"] == ["hostname"] and h["dtype"] == "float32"
    [flag] = [f for f in data["flags"] if f["kind"] == "mixed_machines"]
    assert "differ in host" in flag["message"] and "paired changes hold" in flag["message"]
    rows = rows_by_key(data)
    assert rows[KNORM_07]["n_pairs"]["tpot_s"] == 6 and rows[KNORM_07]["paired"] is True
    samples = store.samples([a, b])
    ref = {s.sample_index: s.tpot_s for s in samples if s.config_key == REFERENCE_KEY}
    changes = [(s.tpot_s / ref[s.sample_index] - 1) * 100 for s in samples if s.config_key == KNORM_07]
    assert rows[KNORM_07]["changes"]["tpot_s"] == pytest.approx(statistics.median(changes))
    table = runner.invoke(app, ["report", "--db", db, "--group", "g"]).stdout
    assert "node-a" in table and "node-b" in table


def test_shards_mixing_software_versions_are_flagged(store, db):
    fill_run(store, group="mix", samples=[0, 1], hostname="h")
    fill_run(store, group="mix", samples=[2], hostname="h", env=dict(ENV, transformers="5.2.0", torch_threads=8))
    data = report_json(db, "--group", "mix")
    assert set(data["header"]["differs"]) == {"threads", "transformers_version"}
    [flag] = [f for f in data["flags"] if f["kind"] == "mixed_machines"]
    assert "threads" in flag["message"] and "transformers version" in flag["message"]
    assert "different set-ups" in flag["message"]


def test_a_group_mixing_dtypes_is_read_as_a_study_not_merged(store, db):
    # dtype is a run setting: fp32 and bf16 samples are never merged into one summary row
    a = fill_run(store, group="mix", samples=[0, 1], hostname="h")
    b = fill_run(store, group="mix", samples=[0, 1], hostname="h", dtype="bfloat16")
    data = report_json(db, "--group", "mix")
    assert "header" not in data and data["study"] == "mix"
    assert "dtype" in data["axes"]
    assert set(data["runs"]) == {str(a), str(b)}


def test_report_and_summary_fill_a_missing_token_match_the_same_way(store, db):
    """Cells of one prompt stored by different runs (old cell shards) have no token match:
    `report --group` loads the generated ids and computes it, exactly as plot does."""
    a = fill_run(store, group="cells", configs=(Cfg(),), token_match=False, seed=3)
    b = fill_run(store, group="cells", configs=(Cfg("knorm", 0.7),), token_match=False, seed=3)
    data = report_json(db, "--group", "cells")
    rows = store.samples([a, b], with_blobs=True)
    refs = {s.sample_index: s.generated_ids_json for s in rows if s.config_key == REFERENCE_KEY}
    expected = statistics.fmean(stats.token_match(s.generated_ids_json, refs[s.sample_index])
                                for s in rows if s.config_key == KNORM_07)
    assert rows_by_key(data)[KNORM_07]["values"]["token_match"] == pytest.approx(expected)
    assert rows_by_key(data)[REFERENCE_KEY]["values"]["token_match"] == 1.0
    direct = build_summary([store.get_run(a), store.get_run(b)], rows)
    assert next(r for r in direct.rows if r.config_key == KNORM_07).values["token_match"] == pytest.approx(expected)


# ------------------------------------------------------------------ one definition, whatever the storage


def _row(data, key):
    return next(r for r in data["rows"] if r["config_key"] == key)


def test_two_runs_of_a_group_measuring_the_same_prompts_count_as_two_rounds(store, db):
    """A requeued shard, or the same sweep run twice under one group: the later run's cells
    overwrote the earlier's (n=3, the change run 2's alone), with no word."""
    knorm = Cfg("knorm", 0.7).pc.key
    a = fill_run(store, group="twice", tpot_factor={knorm: 0.8})
    b = fill_run(store, group="twice", seed=1)
    alone = [_row(report_json(db, "--run-id", str(r)), knorm)["changes"]["tpot_s"] for r in (a, b)]
    row = _row(report_json(db, "--group", "twice"), knorm)
    assert (row["n_prompts"], row["n_repeats"]) == (3, 2)
    assert min(alone) + 1 < row["changes"]["tpot_s"] < max(alone) - 1  # both runs in it, not the later alone


def test_a_change_pairs_the_rounds_both_sides_measured(store, db):
    """Round 2 was 30% slower for every configuration; knorm's round-2 cell failed on 5 of 6
    prompts. Each lone slow round was set against the full cache's median of both: +13%, 'worse'."""
    knorm = Cfg("knorm", 0.7).pc.key
    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.7)), n_samples=6, repeats=2, round_factor={0: 1.3},
                   tpot_factor={knorm: 1 / (1 - 0.1 * 0.3)})  # knorm's TPOT = the full cache's, in each round
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("UPDATE samples SET error = 'RuntimeError: x', tpot_s = NULL WHERE config_key = :k "
                          "AND repeat = 1 AND sample_index < 5"), {"k": knorm})
    row = _row(report_json(db, "--run-id", str(run)), knorm)
    assert abs(row["changes"]["tpot_s"]) < 6 and row["verdicts"]["tpot_s"] != "worse", row["changes"]["tpot_s"]


def test_a_metric_measured_on_one_prompt_is_flagged_even_when_others_have_more(store, db):
    """Perplexity scored on one prompt (stream method, or its round failing) showed a change with
    no interval and no verdict, and no one_prompt flag: the flag looked only at the best metric."""
    knorm = Cfg("knorm", 0.7).pc.key
    run = fill_run(store)
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("UPDATE samples SET ppl_compressed = NULL WHERE config_key = :k AND sample_index > 0"),
                     {"k": knorm})
    data = report_json(db, "--run-id", str(run))
    row = _row(data, knorm)
    assert row["n_pairs"]["ppl_compressed"] == 1 and row["n_pairs"]["tpot_s"] == 3
    one = [f["message"] for f in data["flags"] if f["kind"] == "one_prompt"]
    assert one and one[0].startswith("knorm 0.7 (ppl compressed): paired with the full cache on one prompt only")
    assert "same when every prompt's change is exactly 0" in data["statistics"]["verdict"]  # 'same' is defined


def test_intervals_do_not_depend_on_row_order_or_on_by_dataset():
    """Seeded resampling drew indices over the values in storage order: the same data stored in
    another order (or shards created in another order) gave another interval, and a verdict
    could flip; --by-dataset seeded with the dataset's name."""
    from knormctl.render.paired import metric_seed

    rng = random.Random(3)
    xs = [rng.uniform(-60, 20) for _ in range(50)]  # > 40: resampled, not the exact distribution
    for how in ("median", "mean"):
        seed = metric_seed("knorm|kr=0.5", "token_match", "change")
        assert stats.bootstrap_interval(xs, how, seed=seed) == stats.bootstrap_interval(xs[::-1], how, seed=seed)
    groups = [xs[:20], xs[20:]]
    assert stats.stratified_mean_interval(groups, seed=1) == stats.stratified_mean_interval(
        [g[::-1] for g in groups], seed=1)


def test_a_stratified_interval_resamples_each_group_on_its_own():
    """Accuracy over RULER subtasks: groups of equal size drawn with the same indices move together,
    and the interval came out about twice as wide as the data allow (and the samples-needed advice
    with it). Width against the normal approximation of independent groups."""
    groups = [[1.0] * 20 + [0.0] * 20 for _ in range(4)]  # 4 subtasks, 40 questions each, p = 0.5
    lo, hi = stats.stratified_mean_interval(groups, seed=7)
    se = math.sqrt(sum(0.25 / len(g) for g in groups)) / len(groups)  # independent groups
    assert 0.85 < (hi - lo) / (2 * stats.Z * se) < 1.15
    assert lo < 0.5 < hi


def test_a_one_dataset_run_has_the_same_intervals_with_and_without_by_dataset(store, db):
    from sqlalchemy import text

    run = fill_run(store, n_samples=8)
    with store.engine.begin() as conn:  # one dataset; token match (a mean: resampled, seeded) varying by prompt
        conn.execute(text("UPDATE samples SET dataset = 'wiki-lite', "
                          "token_match = CASE WHEN config_key = 'none' THEN 1.0 ELSE (sample_index * 0.37) % 1 END"))
    plain = report_json(db, "--run-id", str(run))
    split = report_json(db, "--run-id", str(run), "--by-dataset")
    for row in plain["rows"]:
        other = next(r for r in split["rows"] if r["config_key"] == row["config_key"])
        assert other["change_intervals"] == row["change_intervals"] and other["intervals"] == row["intervals"]


def test_a_shards_rounds_are_compared_with_its_own_first_round(store, db):
    """With rounds keyed by (run, repeat) every shard's rounds were compared with the first shard's
    first round, which shares no prompt with them: a second shard's 60% slower round went unseen."""
    fill_run(store, group="sh", n_samples=8, samples=[0, 1, 2, 3], repeats=2)
    fill_run(store, group="sh", n_samples=8, samples=[4, 5, 6, 7], repeats=2, seed=1, round_factor={1: 1.6})
    data = report_json(db, "--group", "sh")
    assert [f for f in data["flags"] if f["kind"] == "repeats_disagree"], [f["kind"] for f in data["flags"]]


def test_two_runs_of_a_group_whose_speeds_differ_are_flagged(store, db):
    """Guards against (repeat_spread dropped the comparison of each other run's first round with the first
    run's): the same sweep run twice under one group, the second time 40% slower on every
    prompt, pooled its timings with no repeats_disagree flag."""
    fill_run(store, group="twice", n_samples=6)
    fill_run(store, group="twice", n_samples=6, seed=1, round_factor={0: 1.4})
    data = report_json(db, "--group", "twice")
    flagged = {f["config_key"] for f in data["flags"] if f["kind"] == "repeats_disagree"}
    assert REFERENCE_KEY in flagged and KNORM_07 in flagged, [f["kind"] for f in data["flags"]]
    assert rows_by_key(data)[REFERENCE_KEY]["repeat_spread_pct"]["tpot_s"] == pytest.approx(40.0, abs=6)


def test_medians_of_timings_memory_and_perplexity_carry_no_value_interval(store, db):
    """Guards against (value_stat gave every metric a bootstrap interval of its value): the module's rule is
    that medians over different prompts get none (the paired change carries the uncertainty);
    fractions (token match) do get one."""
    run = fill_run(store, n_samples=6, mem_jitter=0.03)
    data = report_json(db, "--run-id", str(run))
    for row in data["rows"]:
        for name in ("ttft_s", "tpot_s", "throughput_tps", "peak_mem_bytes", "kv_bytes_final", "ppl_compressed",
                     "compress_events"):
            assert row["intervals"][name] is None, (row["label"], name)
    knorm = rows_by_key(data)[KNORM_07]
    assert knorm["intervals"]["token_match"] is not None  # a fraction: its value has an interval


def test_n_repeats_is_the_most_rounds_any_prompt_has(store, db):
    """Guards against (n_repeats = the fewest rounds): one prompt whose second round is missing made a
    3-round run read as a 1-round one, and the rounds' disagreement went unchecked."""
    from sqlalchemy import text

    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.7)), n_samples=6, repeats=3, round_factor={2: 1.3})
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM samples WHERE sample_index = 0 AND repeat > 0"))
    data = report_json(db, "--run-id", str(run))
    for row in data["rows"]:
        assert row["n_repeats"] == 3, (row["label"], row["n_repeats"])
    assert {f["config_key"] for f in data["flags"] if f["kind"] == "repeats_disagree"} == {REFERENCE_KEY, KNORM_07}


def test_higher_throughput_is_better_and_a_slower_itl_beyond_the_interval_but_within_noise_is_noise(store, db):
    """Guards against (throughput's direction flipped: a faster configuration read 'worse') and (ITL p90
    lost timing=True: a change inside the run's timing noise read as a finding)."""
    from knormctl.render.metrics import METRIC
    from knormctl.render.paired import Stat, verdict

    run = fill_run(store, n_samples=8, tpot_factor={KNORM_07: 0.5})
    row = rows_by_key(report_json(db, "--run-id", str(run)))[KNORM_07]
    assert row["changes"]["throughput_tps"] > 50
    assert row["verdicts"]["throughput_tps"] == "better"
    assert row["verdicts"]["tpot_s"] == "better"
    steady = Stat(value=0.03, change=3.0, change_interval=(2.5, 3.5), n_pairs=20)
    assert verdict(METRIC["itl_p90_s"], steady, noise_pct=6.0) == "noise"
    assert verdict(METRIC["itl_p90_s"], steady, noise_pct=1.0) == "worse"
