"""Talking while working: plain progress lines for logs, and the run-length estimates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace as NS

import pytest

from knormctl.cli._progress import PlainProgress
from knormctl.config import PressConfig
from knormctl.estimate import format_duration, from_warmup, plan_line, seconds_per_cell


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def plain():
    lines: list[str] = []
    clock = Clock()
    progress = PlainProgress(lines.append, 5, every_s=10, quiet_s=3600, clock=clock)
    yield progress, lines, clock
    progress.close()


def test_plain_lines_first_cell_then_at_most_every_n_seconds_and_the_end(plain):
    progress, lines, clock = plain
    clock.t += 30  # the warm-up
    progress.measuring()
    clock.t += 4
    progress.update(1, 5, "sample 1/1 none")
    assert lines == ["1/5 cells, 34 s elapsed, ETA 16 s (sample 1/1 none)"]  # 4 s per cell since the warm-up
    clock.t += 4
    progress.update(2, 5, "b")  # 4 s after the last line: quiet
    clock.t += 4
    progress.update(3, 5, "c")  # 8 s: still quiet
    assert len(lines) == 1
    clock.t += 4
    progress.update(4, 5, "d")  # 12 s since the last line
    assert lines[-1] == "4/5 cells, 46 s elapsed, ETA 4 s (d)"
    clock.t += 1
    progress.update(5, 5, "e")  # the last cell always
    assert lines[-1] == "5/5 cells done in 47 s"


def test_kept_cells_of_a_resumed_run_do_not_shorten_the_eta(plain):
    progress, lines, clock = plain
    progress.measuring()
    for done in (1, 2, 3):
        progress.update(done, 5, f"sample {done} (kept)")
    assert lines == []  # finished earlier: nothing to report yet
    clock.t += 20
    progress.update(4, 5, "sample 4")
    assert lines == ["4/5 cells, 20 s elapsed, ETA 20 s (sample 4)"]  # 20 s per measured cell, 1 left


def test_a_long_cell_gets_still_working_lines():
    lines: list[str] = []
    clock = Clock()
    progress = PlainProgress(lines.append, 3, every_s=10, quiet_s=0.05, clock=clock)
    try:
        clock.t += 1  # a warm-up longer than quiet_s
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lines and lines[0] == "still warming up (1 s elapsed)"
        progress.measuring()
        progress.update(1, 3, "a")
        clock.t += 120
        count = len(lines)
        while len(lines) == count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lines[count] == "still working on cell 2 of 3 (2 min 01 s elapsed, ETA 4 min 00 s)"
    finally:
        progress.close()


def test_format_duration():
    assert [format_duration(s) for s in (0, 12.4, 59.6, 61, 3599, 3600, 7384)] == [
        "0 s", "12 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 03 min"]


def test_plan_line_names_cells_samples_and_configurations():
    configs = [PressConfig()] + [PressConfig(press="knorm", keep_ratio=k) for k in (1.0, 0.7)] + [
        PressConfig(press="random", keep_ratio=0.7)]
    assert plan_line(8, 2, configs, 100, 128) == (
        "plan: 8 cells = 2 samples x 4 configurations (full cache; knorm keep 1, 0.7; random keep 0.7); "
        "100 new tokens + 128 scored tokens per cell")
    assert plan_line(1, 1, configs[:1], 10, 0) == "plan: 1 cell = 1 sample x 1 configuration (full cache); 10 new " \
        "tokens per cell"
    assert plan_line(16, 2, configs, 100, 0, repeats=2).startswith("plan: 16 cells = 2 samples x 4 configurations "
                                                                   "x 2 repeats (")


@dataclass
class Warm:
    ttft_s: float
    tpot_s: float | None


@dataclass
class Sample:
    prompt_ids: list
    eval_ids: list = field(default_factory=list)


@dataclass
class Cell:
    sample_index: int


def test_warmup_estimate_is_plan_size_times_measured_speed():
    # prefill 1 ms/token (100 ms for the 100-token warm-up prompt), decode 20 ms/token (the slower of the two)
    warm = [Warm(0.100, 0.010), Warm(0.120, 0.020)]
    samples = [Sample(list(range(100)), list(range(10))), Sample(list(range(300)), list(range(10)))]
    cells = [Cell(0), Cell(0), Cell(1), Cell(1)]
    est = from_warmup(warm, 100, cells, samples, new_tokens=5)
    # per cell: generation prefill + 5 steps, scoring prefill + 10 steps; per sample: one context prefill
    per_cell = {0: 2 * 0.100 + 15 * 0.020, 1: 2 * 0.300 + 15 * 0.020}
    assert est.seconds == pytest.approx(2 * per_cell[0] + 2 * per_cell[1] + 0.100 + 0.300)
    assert est.basis == "warm-up speed: prefill 1.00 ms/token, decode 20 ms/token"
    stream = from_warmup(warm, 100, cells[:1], samples, new_tokens=5, ppl_method="stream")
    assert stream.seconds == pytest.approx(0.100 + 5 * 0.020 + 110 * 0.020 + 0.100)
    assert from_warmup([], 100, cells, samples, 5) is None
    assert from_warmup([Warm(0.1, None)], 100, cells, samples, 5) is None  # one token: no decode speed


def test_stored_cell_time_leaves_out_a_pause():
    t0 = datetime(2026, 1, 1)
    times = [t0 + timedelta(seconds=s) for s in (0, 10, 20, 30, 3630, 3640)]  # resumed an hour later
    assert seconds_per_cell(times) == pytest.approx(10.0)
    assert seconds_per_cell(times[:1]) is None


def test_a_library_tqdm_bar_is_swallowed(capfd):
    """transformers' GGUF reader calls tqdm directly (no switch turns it off); the loader
    wraps it so the bar never reaches the user's terminal or log."""
    from tqdm.auto import tqdm

    from knormctl.engine.models import _quiet_stdio

    with _quiet_stdio():
        for _ in tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert capfd.readouterr().err == ""
    for _ in tqdm(range(5), desc="control"):  # the same bar unwrapped does print: the check can fail
        pass
    assert "control" in capfd.readouterr().err


def test_stored_estimate_only_from_a_comparable_run_on_this_host():
    import socket
    from types import SimpleNamespace as NS

    from knormctl.config import RunConfig
    from knormctl.estimate import from_stored_run

    cfg = RunConfig(model="m", max_new_tokens=100)
    t0 = datetime(2026, 1, 1)
    here = socket.gethostname()

    def run(id, host=here, model="m", status="complete", **settings):
        return NS(id=id, hostname=host, model_requested=model, status=status,
                  config_json={**cfg.to_dict(), **settings})

    class Store:
        runs = [run(9, max_new_tokens=50), run(8, host="elsewhere"), run(7, model="other"), run(6, status="failed"),
                run(5, status="interrupted"), run(4)]

        def list_runs(self, limit):
            return self.runs[:limit]

        def samples(self, run_id):
            step = {5: 3.0, 4: 7.0}[run_id]
            return [NS(created_utc=t0 + timedelta(seconds=step * i)) for i in range(4)]

    est = from_stored_run(Store(), cfg, n_cells=10)
    assert est.seconds == pytest.approx(30.0)  # run 5: the newest comparable one, 3 s per cell
    assert est.basis == "run 5 of this model on this host took 3.0 s per cell"
    Store.runs = Store.runs[:4]
    assert from_stored_run(Store(), cfg, n_cells=10) is None


def test_a_rough_estimate_scales_another_runs_time_by_tokens_per_cell():
    """A run of the same model with other settings: its seconds per cell x the tokens a cell now
    generates and scores over the tokens its cells did (twice the tokens, twice the time)."""
    import socket
    from types import SimpleNamespace as NS

    from knormctl.config import RunConfig
    from knormctl.estimate import from_model_runs

    t0 = datetime(2026, 1, 1)
    stored = {**RunConfig(model="m", max_new_tokens=50, eval_tokens=50).to_dict()}  # 100 tokens a cell

    class Store:
        def list_runs(self, limit):
            return [NS(id=3, hostname=socket.gethostname(), model_requested="m", status="complete",
                       config_json=stored)]

        def samples(self, run_id):
            return [NS(created_utc=t0 + timedelta(seconds=4 * i)) for i in range(5)]  # 4 s a cell

    est = from_model_runs(Store(), RunConfig(model="m", max_new_tokens=150, eval_tokens=50), n_cells=10)
    assert est.seconds == pytest.approx(10 * 4.0 * 200 / 100)


def test_a_batched_run_estimates_its_cells_by_the_batches():
    """A batch stores its rows milliseconds apart: the time per cell comes from the gaps between
    batches over their rows, never from the gaps between rows of one batch."""
    t0 = datetime(2026, 1, 1)
    times = [t0 + timedelta(seconds=10 * b, milliseconds=3 * r) for b in range(4) for r in range(2)]
    assert seconds_per_cell(times, batch_size=2) == pytest.approx(5.0, rel=1e-3)
    # the warm-up ran a batch of 2 (200 prompt tokens in all): each row pays half of every decode step
    warm = [Warm(0.200, 0.020)]
    samples = [Sample(list(range(100)))]
    alone = from_warmup(warm, 100, [Cell(0)], samples, new_tokens=10)
    batched = from_warmup(warm, 200, [Cell(0)], samples, new_tokens=10, batch_rows=2)
    assert alone.seconds == pytest.approx(0.200 + 10 * 0.020)
    assert batched.seconds == pytest.approx(0.100 + 10 * 0.010)


def test_stored_estimate_matches_the_batch_size():
    import socket
    from types import SimpleNamespace as NS

    from knormctl.config import RunConfig
    from knormctl.estimate import from_stored_run

    t0 = datetime(2026, 1, 1)

    def run(id, config):
        return NS(id=id, hostname=socket.gethostname(), model_requested="m", status="complete", config_json=config)

    old = {k: v for k, v in RunConfig(model="m").to_dict().items() if k != "batch_size"}  # stored before batches

    class Store:
        runs = [run(3, {**old, "batch_size": 4}), run(2, old)]

        def list_runs(self, limit):
            return self.runs[:limit]

        def samples(self, run_id):
            return [NS(created_utc=t0 + timedelta(seconds=6 * i)) for i in range(8)]

    one = from_stored_run(Store(), RunConfig(model="m"), n_cells=10)
    assert one.basis.startswith("run 2 ")  # batch 1 now: the batch-4 run is not comparable; the old one is
    four = from_stored_run(Store(), RunConfig(model="m", batch_size=4), n_cells=10)
    assert four.basis.startswith("run 3 ")


def _store(runs, times):
    class Store:
        def list_runs(self, limit):
            return runs[:limit]

        def samples(self, run_id):
            return [NS(created_utc=t) for t in times[run_id]]

    return Store()


def _batched_times(batches, rows, gap_s):
    from datetime import datetime, timedelta

    t0 = datetime(2026, 1, 1)
    return [t0 + timedelta(seconds=gap_s * b, milliseconds=3 * r) for b in range(batches) for r in range(rows)]


def test_a_stored_batched_run_estimates_by_its_batches():
    import socket

    from knormctl.config import RunConfig
    from knormctl.estimate import from_model_runs, from_stored_run

    cfg = RunConfig(model="m", batch_size=4)
    run = NS(id=1, hostname=socket.gethostname(), model_requested="m", status="complete", config_json=cfg.to_dict())
    store = _store([run], {1: _batched_times(5, 4, 20.0)})  # 4 rows every 20 s: 5 s a cell
    assert from_stored_run(store, cfg, n_cells=10).seconds == pytest.approx(50.0, rel=1e-3)
    assert from_model_runs(store, cfg, n_cells=10).seconds == pytest.approx(50.0, rel=1e-3)


def test_a_rough_estimate_skips_failed_runs_and_other_hosts():
    import socket

    from knormctl.config import RunConfig
    from knormctl.estimate import from_model_runs

    stored = RunConfig(model="m", max_new_tokens=50).to_dict()
    here = socket.gethostname()
    runs = [NS(id=3, hostname=here, model_requested="m", status="failed", config_json=stored),
            NS(id=2, hostname="elsewhere", model_requested="m", status="complete", config_json=stored),
            NS(id=1, hostname=here, model_requested="m", status="complete", config_json=stored)]
    store = _store(runs, {3: _batched_times(5, 1, 100.0), 2: _batched_times(5, 1, 50.0),
                          1: _batched_times(5, 1, 4.0)})
    est = from_model_runs(store, RunConfig(model="m", max_new_tokens=50), n_cells=10)
    assert est.basis.startswith("rough: run 1 ") and est.seconds == pytest.approx(40.0)


def test_one_of_a_thing_is_singular():
    """'1 cells', '1 new tokens' in the plan and estimate lines."""
    from knormctl.estimate import plan_line

    line = plan_line(1, 1, [PressConfig()], 1, 1)
    assert "1 cell = 1 sample x 1 configuration" in line and "1 new token + 1 scored token per cell" in line
