"""`knormctl capacity` (issue 16 item 3): the largest batch that fits a memory budget. Each answer
is checked against real generations: the reported batch fits and one more does not."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig
from knormctl.engine.capacity import find_capacity, measure, parse_memory
from knormctl.engine.loop import run_generation
from knormctl.errors import UsageError
from tiny_models import VOCAB, llama

runner = CliRunner()
PROMPT, NEW, CHUNK = 200, 8, 32


@pytest.fixture(scope="module")
def model():
    return llama()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()


FULL = PressConfig().validate()
KNORM = PressConfig(press="knorm", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()).validate()


def _budget(model, prompt, rows):
    """A budget between what `rows` and `rows + 1` full-cache rows need (measured, not modelled)."""
    a = measure(model, prompt, rows, FULL, NEW, 1 << 62).peak_bytes
    b = measure(model, prompt, rows + 1, FULL, NEW, 1 << 62).peak_bytes
    return (a + b) // 2


def test_largest_batch_fits_and_one_more_does_not(model, prompt):
    budget = _budget(model, prompt, 13)
    for cfg, chunk in ((FULL, 0), (KNORM, CHUNK)):
        cap = find_capacity(model, prompt, cfg, cfg.key, new_tokens=NEW, budget=budget, max_batch=500,
                            prefill_chunk=chunk)
        b = cap.largest_batch
        assert b >= 1 and not cap.capped
        assert cap.peak_bytes <= budget and cap.tokens_per_s == pytest.approx(b / cap.step_s)
        # checked by generations outside the search
        assert measure(model, prompt, b, cfg, NEW, budget, prefill_chunk=chunk).fits
        over = measure(model, prompt, b + 1, cfg, NEW, budget, prefill_chunk=chunk)
        assert not over.fits and over.peak_bytes > budget
        assert len(cap.probes) <= 8  # a handful of generations
        if cfg is FULL:
            assert b == 13  # the budget was put between 13 and 14 full-cache rows
            full = b
    # chunked prefill at keep 0.5 bounds the cache by the budget: more rows fit
    assert b > full


def test_a_cut_after_a_whole_prefill_does_not_raise_the_capacity(model, prompt):
    budget = _budget(model, prompt, 5)
    full = find_capacity(model, prompt, FULL, "f", new_tokens=NEW, budget=budget, max_batch=100)
    knorm = find_capacity(model, prompt, KNORM, "k", new_tokens=NEW, budget=budget, max_batch=100)
    assert knorm.largest_batch == full.largest_batch == 5  # the peak is the prefill's full cache


def test_cpu_memory_is_weights_plus_the_cache_held(model, prompt):
    p = measure(model, prompt, 2, FULL, NEW, 1 << 62)
    res = run_generation(model, [prompt] * 2, FULL, NEW)
    # the full cache's buffers hold every position fed (prompt + new - 1), keys and values, fp32
    layers, kv_heads, head_dim = 3, 2, 8
    kv = 2 * layers * 2 * kv_heads * (PROMPT + NEW - 1) * head_dim * 4
    assert res.kv_bytes_held_peak == kv
    # parameters and buffers (the rotary tables), counted here rather than by the code under test
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert p.peak_bytes == weights + kv
    # compressed, the buffers hold room beyond their valid entries: memory counts what is held
    cut = measure(model, prompt, 2, KNORM, NEW, 1 << 62, prefill_chunk=CHUNK)
    res = run_generation(model, [prompt] * 2, KNORM, NEW, prefill_chunk=CHUNK)
    assert res.kv_bytes_held_peak > res.kv_bytes_peak
    assert cut.peak_bytes == weights + res.kv_bytes_held_peak


@pytest.mark.parametrize("grows", ["linear", "curved"])
def test_the_search_lands_on_the_largest_batch_whatever_it_is(model, monkeypatch, grows):
    """Every answer from 1 to the cap, with memory growing linearly (the guess from two probes is
    exact) or not (the search must bisect to the end): never one batch short of what fits."""
    from knormctl.engine import capacity
    from knormctl.engine.capacity import Probe

    def peak(b):
        return 1000 + 100 * b if grows == "linear" else 1000 + 7 * b * b

    for largest in range(1, 41):
        budget = peak(largest)  # the largest fits exactly; one more does not
        monkeypatch.setattr(capacity, "measure", lambda model, prompt, b, cfg, new, budget, **kw:
                            Probe(b, peak(b) <= budget, peak(b), 0.01))
        cap = find_capacity(model, [1] * 4, FULL, "f", new_tokens=NEW, budget=budget, max_batch=40)
        assert cap.largest_batch == largest and cap.capped == (largest == 40)
        assert len(cap.probes) <= 2 + 3 + 6  # batches 1 and 2, three guided guesses, bisection of 40 sizes


def test_nothing_fits_and_the_cap(model, prompt):
    tiny = find_capacity(model, prompt, FULL, "f", new_tokens=NEW, budget=1000, max_batch=10)
    assert tiny.largest_batch == 0 and tiny.peak_bytes is None and len(tiny.probes) == 1
    huge = find_capacity(model, prompt, FULL, "f", new_tokens=NEW, budget=1 << 40, max_batch=6)
    assert huge.largest_batch == 6 and huge.capped


def test_chunked_prefill_holds_less_memory_than_a_whole_prefill(model, prompt):
    whole = run_generation(model, [prompt], KNORM, NEW)
    chunked = run_generation(model, [prompt], KNORM, NEW, prefill_chunk=CHUNK)
    assert chunked.kv_bytes_held_peak < 0.75 * whole.kv_bytes_held_peak
    assert chunked.kv_entries_final == whole.kv_entries_final


@pytest.mark.parametrize("text,value", [("70GiB", 70 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20),
                                        ("1e6", 10**6), ("1.5KiB", 1536), ("100B", 100)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("bad", ["", "GiB", "70 parsecs", "-1GB", "0", "abc", "1e400"])  # 1e400: was an OverflowError
def test_bad_budgets_are_refused(bad):
    with pytest.raises(UsageError, match="--memory-budget"):
        parse_memory(bad)


@pytest.mark.parametrize("args", [["--memory-budget", "lots"], ["--memory-budget", "0B"],
                                  ["--memory-budget", "1GiB", "--max-batch", "0"],
                                  ["--memory-budget", "1GiB", "--context", "0"],
                                  ["--memory-budget", "1GiB", "--max-new-tokens", "1"],
                                  ["--memory-budget", "1GiB", "--max-new-tokens", "2"],  # only the cut's step
                                  ["--memory-budget", "1e400"],
                                  ["--memory-budget", "1GiB", "--keep-ratios", "50"],
                                  ["--memory-budget", "1GiB", "--format", "yaml"]])
def test_bad_input_exits_2_with_one_line(args, tiny_llama_dir):
    res = runner.invoke(app, ["capacity", "--model", str(tiny_llama_dir), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.stderr


def test_cli_json_and_table(tiny_llama_dir):
    args = ["capacity", "--model", str(tiny_llama_dir), "--context", "128", "--max-new-tokens", "4",
            "--memory-budget", "1MiB", "--prefill-chunk", "32", "--threads", "1", "--max-batch", "200"]
    res = runner.invoke(app, [*args, "--format", "json", "--random-ids"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = out["results"]
    assert [r["config"] for r in rows] == ["full cache", "knorm 0.5 prefill"]
    assert out["memory_kind"].startswith("weights + KV") and "not counted" in out["memory_kind"]
    full, knorm = rows
    assert 1 <= full["largest_batch"] < knorm["largest_batch"]
    assert knorm["batch_vs_full"] == pytest.approx(knorm["largest_batch"] / full["largest_batch"])
    for r in rows:
        assert not r["capped"] and r["peak_bytes"] <= out["memory_budget_bytes"]
        assert not any(p["fits"] for p in r["probes"] if p["batch"] > r["largest_batch"])
        assert any(not p["fits"] for p in r["probes"] if p["batch"] == r["largest_batch"] + 1)
    table = runner.invoke(app, [*args, "--random-ids"])
    assert table.exit_code == 0, table.output
    assert "full cache" in table.stdout and "knorm 0.5 prefill" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    assert "not counted" in table.stdout
    assert "--max-batch reached" not in table.stdout  # no row is capped: the legend says nothing of it
    # progress on stderr as sweep's: every line stamped (capacity's were bare)
    progress = [line for line in table.stderr.splitlines() if line.strip()]
    assert progress and all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in progress), table.stderr


def test_a_budget_nothing_fits_in_says_why(tiny_llama_dir):
    args = ["capacity", "--model", str(tiny_llama_dir), "--context", "128", "--max-new-tokens", "4",
            "--threads", "1", "--random-ids"]
    weights = json.loads(runner.invoke(app, [*args, "--memory-budget", "1GiB", "--max-batch", "1",
                                             "--format", "json"]).stdout)["weight_bytes"]
    res = runner.invoke(app, [*args, "--memory-budget", f"{weights - 1}B"])
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()  # the model's loading progress, then the one error line
    assert [ln for ln in lines if "Error" in ln or "Traceback" in ln] == lines[-1:]
    assert lines[-1].startswith("Error: --memory-budget ") and "below the model's weights alone" in lines[-1]
    res = runner.invoke(app, [*args, "--memory-budget", f"{weights + 1}B"])  # the weights fit, a cache does not
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "full cache: not even batch 1 fits in" in res.stdout and "(it needed " in res.stdout
    assert not any("--max-batch reached" in line for line in lines)


def test_the_timed_step_leaves_out_the_first_which_carries_the_cut():
    """With 2 new tokens the only step timed was the one carrying the prefill cut: compressed
    tokens/s read about half of the 32-token figure."""
    from knormctl.engine.capacity import decode_step_s

    assert decode_step_s([0.9, 0.1]) == 0.1
    assert decode_step_s([0.9, 0.1, 0.2, 0.3]) == 0.2
    assert decode_step_s([0.9]) is None


def test_a_context_longer_than_the_texts_names_capacitys_way_out(tiny_llama_dir, monkeypatch):
    """The text source's own advice ('ask for fewer or shorter samples') named options capacity
    does not have."""
    from knormctl.engine import text

    def short(source, n, *a, **k):
        raise UsageError(f"text source {source!r} cannot fill the request: 1 samples of 900 tokens (900 prompt + 0 "
                         "eval) were asked, only 0 could be made (0 of 103 documents are long enough); ask for fewer "
                         "or shorter samples")

    monkeypatch.setattr(text, "make_samples", short)
    res = runner.invoke(app, ["capacity", "--model", str(tiny_llama_dir), "--context", "900", "--max-new-tokens", "4",
                              "--memory-budget", "1GiB", "--threads", "1"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: --context 900: no document of 'wiki-lite-long' is that long; use --random-ids (memory and time do "
        "not depend on the tokens) or a shorter --context")


def test_decode_mode_says_why_it_cannot_raise_the_batch(tiny_llama_dir):
    """Decode mode keeps a buffer of the full prompt's size: x1.00 read as 'decode-mode compression
    gives no capacity', a property of the buffer, not the press. Said in the table and the json."""
    args = ["capacity", "--model", str(tiny_llama_dir), "--context", "128", "--max-new-tokens", "4",
            "--memory-budget", "1MiB", "--threads", "1", "--max-batch", "8", "--random-ids", "--prune-after", "32"]
    prefill = json.loads(runner.invoke(app, [*args, "--prefill-chunk", "32", "--format", "json"]).stdout)
    assert prefill["notes"] == []
    res = runner.invoke(app, [*args, "--prefill-chunk", "32", "--compress-mode", "decode", "--format", "json"])
    assert res.exit_code == 0, res.output
    notes = json.loads(res.stdout)["notes"]
    assert notes == ["decode mode (knorm) keeps a cache buffer of the full prompt's size (only prefill mode sizes it "
                     "to the budget and a chunk), so it cannot raise the batch here; --compress-mode prefill can"]
    table = runner.invoke(app, [*args, "--prefill-chunk", "32", "--compress-mode", "decode"])
    assert "note: decode mode (knorm) keeps a cache buffer" in " ".join(table.stdout.split())


def _cap_row(config, batch, *, capped=False, peak=2 * 2**20, step=0.0125, tps=80.0, bvf=None, tvf=None):
    return {"config": config, "largest_batch": batch, "capped": capped, "peak_bytes": peak, "step_s": step,
            "tokens_per_s": tps, "batch_vs_full": bvf, "tokens_per_s_vs_full": tvf, "memory_kind": "weights + KV",
            "probes": [{"batch": 1, "fits": batch >= 1, "peak_bytes": peak, "error": None}]}


def _fake_result(rows):
    return {"model": "m", "device": "cpu", "dtype": "float32", "context": 128, "max_new_tokens": 4,
            "memory_budget_bytes": 2**20, "weight_bytes": 1, "memory_kind": "weights + KV cache held",
            "prefill_chunk": 32, "decode_step": "launched", "prompt": "random ids", "results": rows, "notes": []}


def _capacity_table_text(rows) -> list[list[str]]:
    from rich.console import Console

    from knormctl.render.capacity import capacity_table

    console = Console(width=200, record=True, color_system=None)
    console.print(capacity_table(rows, title="t"))
    lines = console.export_text().splitlines()
    return [line.split() for line in lines if line.strip().startswith(("full", "knorm"))]


def test_capacity_table_cells_are_the_rows_numbers():
    """Batch (+ when capped), step in ms, tokens/s, and the two ratios each in its own column."""
    rows = [_cap_row("full", 4, step=0.0125, tps=320.0),
            _cap_row("knorm", 10, capped=True, step=0.02, tps=500.0, bvf=2.5, tvf=1.5625)]
    full, knorm = _capacity_table_text(rows)
    assert full == ["full", "4", "2.0", "MiB", "12.5", "ms", "320.0", "n/a", "n/a"]
    assert knorm == ["knorm", "10+", "2.0", "MiB", "20.0", "ms", "500.0", "2.50x", "1.56x"]


def test_capacity_says_when_a_row_reached_max_batch(monkeypatch):
    """The '+' legend line: printed once some row hit --max-batch."""
    from knormctl.cli import capacity as cap_mod

    rows = [_cap_row("full cache", 3), _cap_row("knorm 0.5 prefill", 8, capped=True, bvf=8 / 3, tvf=2.0)]
    monkeypatch.setattr(cap_mod, "_run", lambda *a, **k: _fake_result(rows))
    res = runner.invoke(app, ["capacity", "--memory-budget", "1MiB", "--max-batch", "8", "--prefill-chunk", "32"])
    assert res.exit_code == 0, res.output
    assert "--max-batch reached, more may fit" in " ".join(res.stdout.split())


def test_capacity_notes_a_whole_prefill_cut_cannot_lower_the_peak():
    from knormctl.cli.capacity import capacity_notes
    from knormctl.config import PressConfig

    full = PressConfig().validate()
    knorm = PressConfig(press="knorm", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()).validate()
    [note] = capacity_notes([full, knorm], prefill_chunk=0)
    assert note.startswith("a press that cuts after a whole prefill cannot lower the peak")
    assert capacity_notes([full, knorm], prefill_chunk=32) == []
    assert capacity_notes([full], prefill_chunk=0) == []
