"""The static decode step that a CUDA graph records (engine/graphstep.py, issue 16 item 1).

On a CPU nothing can be recorded; what is checked here is everything the recording relies on:
the static step (the whole buffer, a slot held in a device tensor, a length mask computed on
the device) generates exactly what the reference path (transformers' DynamicCache) generates,
it is taken where it can be and left where it cannot, and it traces as ONE graph -- no host
sync, no branch on a tensor's value, which would make a CUDA graph capture fail or replay a
stale step. The recording itself is checked on a GPU (tests/test_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig
from knormctl.engine import graphstep, loop
from knormctl.engine.kvbuffer import BufferLayer
from knormctl.engine.loop import run_generation
from knormctl.errors import UsageError
from knormctl.press_spec import parse_press_spec
from tiny_models import MODELS, VOCAB

NEW = 16


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _ids(n=60, seed=1, rows=1):
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _cfg(spec, mode="prefill", kr=0.5, prune_after=0, skip=()):
    name, params = parse_press_spec(spec)
    return PressConfig(press=name, params=params, keep_ratio=kr, prune_after=prune_after, skip_layers=skip,
                       mode=mode).validate()


# (spec, mode, keep_ratio, prune_after, skip_layers, decode steps the static step takes)
CASES = [
    ("none", "prefill", 1.0, 0, (), NEW - 1),
    ("knorm", "prefill", 0.5, 0, (), NEW - 1),  # the cut gathers into a right-sized buffer: a new address
    ("knorm", "decode", 0.9, 16, (), NEW - 1),  # cuts every step, in place
    ("streaming", "decode", 0.8, 20, (), NEW - 1),
    ("snapkv(window_size=8)", "prefill", 0.5, 0, (), NEW - 1),  # observers go with the prefill cut
    ("tova", "decode", 0.8, 20, (), 0),  # observes every step: its hooks must run
    ("knorm", "decode", 0.9, 16, (0,), NEW - 1),  # a skipped layer is longer: its own mask
    ("knorm", "prefill", 0.3, 0, (1,), NEW - 1),
    ("pyramidkv(window_size=4)", "prefill", 0.4, 0, (), NEW - 1),  # per-layer budgets
    ("adakv(base=knorm)", "prefill", 0.5, 0, (), 0),  # per-head masks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-skip{len(c[4])}")
def test_static_step_generates_what_the_reference_does(model, caches, case):
    spec, mode, kr, prune_after, skip, static_steps = case
    cfg = _cfg(spec, mode, kr, prune_after, skip)
    ref = run_generation(model, _ids(), cfg, NEW, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, NEW, decode_step="static")
    assert got.token_ids == ref.token_ids
    assert (got.kv_entries_final, got.kv_bytes_final, got.compress_events) == (
        ref.kv_entries_final, ref.kv_bytes_final, ref.compress_events)
    assert (got.static_steps, got.graph_captures) == (static_steps, 0)  # eager: nothing recorded
    assert ref.static_steps == 0
    ref_cache, got_cache = caches
    for lr, lg in zip(ref_cache.layers, got_cache.layers):  # the entries the static steps wrote, in their slots
        assert lg.keys.shape == lr.keys.shape
        torch.testing.assert_close(lg.keys, lr.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lg.values, lr.values, rtol=1e-5, atol=1e-5)


def test_a_model_loaded_with_eager_attention_gets_the_same_tokens():
    model = MODELS["llama"]()
    model.set_attn_implementation("eager")
    cfg = _cfg("knorm")
    ref = run_generation(model, _ids(), cfg, NEW, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, NEW, decode_step="static")
    assert got.token_ids == ref.token_ids and got.static_steps == NEW - 1


def test_a_sampled_batch_draws_what_the_reference_draws(model):
    cfg = _cfg("knorm", kr=0.6)
    kw = dict(sampling=True, temperature=0.8, seed=[3, 4, 5])
    ref = run_generation(model, _ids(rows=3), cfg, NEW, kv_buffer=False, **kw)
    got = run_generation(model, _ids(rows=3), cfg, NEW, decode_step="static", **kw)
    assert got.rows == ref.rows and len(set(map(tuple, got.rows))) > 1
    assert got.static_steps == NEW - 1


def test_the_static_step_reads_the_whole_buffer_and_moves_the_count_only_when_told():
    """What makes it recordable: every shape is the buffer's capacity, the write lands at the slot."""
    layer = BufferLayer(capacity=12)
    with torch.inference_mode():
        layer.update(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
        k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        layer.static_slot = torch.tensor([10])
        keys, values = layer.update(k, v)
        layer.static_slot = None
    assert keys.shape[-2] == 12 and layer.length == 10  # the whole buffer; the host count unmoved
    layer.advance(1)
    assert layer.length == 11 and torch.equal(layer.keys[:, :, -1:], k) and torch.equal(layer.values[:, :, -1:], v)


def test_fit_right_sizes_a_buffer_an_in_place_cut_left_large():
    """A cut to half compacts in place (the kept entries and the tokens to come fill more than
    half the buffer); the static step reads the whole buffer, so fit() copies the live entries
    into one of their size plus the tokens still to come -- and leaves a buffer within 1/8 alone."""
    layer = BufferLayer(capacity=100)
    with torch.inference_mode():
        layer.update(torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8))
        before = layer.keys.clone()
        layer.compact(torch.arange(0, 60, 2).view(1, 1, 30).expand(1, 2, 30))  # keep 30, 40 still to come
        assert layer.capacity == 100  # 30 + 40 > 100 / 2: in place
        assert layer.fit() and layer.capacity == 70 and torch.equal(layer.keys, before[:, :, ::2])
        assert not layer.fit()  # already right-sized
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        assert layer.capacity == 70 and layer.length == 31


def test_a_compressed_static_step_reads_the_compressed_buffer(model, caches):
    """Prefill keep 0.5: the static steps attend over about half the full cache's slots, not
    over the prompt-sized buffer the in-place cut kept (which would cost what the full cache costs)."""
    full = run_generation(model, _ids(), _cfg("none"), NEW, decode_step="static")
    half = run_generation(model, _ids(), _cfg("knorm", kr=0.5), NEW, decode_step="static")
    assert full.static_steps == half.static_steps == NEW - 1
    cap_full, cap_half = caches[0].layers[0].capacity, caches[1].layers[0].capacity
    assert cap_full == 60 + NEW - 1 and cap_half == 30 + NEW - 1


def _trace(model, monkeypatch, cfg=None):
    """Run a generation whose static step is traced by dynamo with fullgraph=True: a host sync
    or a Python branch on a tensor value inside the step raises instead of tracing."""
    real = graphstep.StaticStep._step
    traced = {}

    def step(self):
        if self not in traced:
            traced[self] = torch.compile(lambda: real(self), backend="eager", fullgraph=True)
        return traced[self]()

    monkeypatch.setattr(graphstep.StaticStep, "_step", step)
    torch._dynamo.reset()
    try:
        return run_generation(model, _ids(), cfg or _cfg("knorm"), 6, decode_step="static")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("spec, mode, kr, prune_after, skip", [
    ("knorm", "prefill", 0.5, 0, ()),
    ("knorm", "decode", 0.9, 16, (0,)),  # layers of different lengths: a mask per layer, from its slot
])
def test_the_static_step_traces_as_one_graph(model, monkeypatch, spec, mode, kr, prune_after, skip):
    cfg = _cfg(spec, mode, kr, prune_after, skip)
    res = _trace(model, monkeypatch, cfg)
    assert res.static_steps == 5
    assert res.token_ids == run_generation(model, _ids(), cfg, 6, kv_buffer=False).token_ids


def test_a_host_sync_in_the_step_fails_the_trace(monkeypatch):
    """The control: the same check catches a step that reads a value back to the host."""
    model = MODELS["llama"]()
    real = BufferLayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        if self.static_slot is not None and int(self.static_slot.item()) < 0:
            raise AssertionError("unreachable")
        return real(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(BufferLayer, "update", update)
    with pytest.raises(Exception, match="(?i)graph break|item|unsupported"):
        _trace(model, monkeypatch)


def test_where_a_decode_step_cannot_run_it_is_refused(model):
    with pytest.raises(UsageError, match=r"--decode-step graph: a CUDA graph needs the model on one CUDA device "
                                         r"\(it is on cpu\)"):
        run_generation(model, _ids(), _cfg("knorm"), 4, decode_step="graph")
    with pytest.raises(UsageError, match="no fixed buffer"):
        run_generation(model, _ids(), _cfg("knorm"), 4, decode_step="static", kv_buffer=False)
    with pytest.raises(UsageError, match="decode_step must be one of launched, static, graph"):
        run_generation(model, _ids(), _cfg("knorm"), 4, decode_step="yes")


@pytest.mark.parametrize("args, message", [
    (["--decode-step", "graph", "--device", "cpu"],
     "--decode-step graph records a CUDA graph: it needs a CUDA device (--device is cpu)"),
    (["--decode-step", "graph", "--device-map", "auto"],
     "--decode-step graph needs the model on one device (--device-map spreads it)"),
    (["--decode-step", "static", "--device-map", "auto"],
     "--decode-step static needs the model on one device (--device-map spreads it)"),
    (["--decode-step", "statik"],
     "--decode-step: unknown decode step 'statik' (did you mean 'static'?); choose from: launched, static, graph"),
])
def test_a_decode_step_that_cannot_run_is_one_line_exit_2(args, message, tmp_path):
    for command in ("sweep", "baseline", "capacity"):
        where = ["--db", str(tmp_path / "r.db")] if command != "capacity" else ["--memory-budget", "1GiB"]
        res = CliRunner().invoke(app, [command, *args, *where])
        assert res.exit_code == 2, (command, res.output)
        assert res.stderr.strip() == f"Error: {message}", (command, res.stderr)
    assert not (tmp_path / "r.db").exists()


def test_a_graph_on_a_model_that_landed_on_the_cpu_writes_nothing(tiny_llama_dir, books_dir, tmp_path):
    """--device auto finds no GPU: refused after the model loads, before the run is stored."""
    db = tmp_path / "r.db"
    res = CliRunner().invoke(app, ["sweep", "--decode-step", "graph", "--model", str(tiny_llama_dir),
                                   "--wikitext-source", f"text:{books_dir}", "--num-wikitext-samples", "1",
                                   "--num-pg19-samples", "0", "--wikitext-prompt-tokens", "48",
                                   "--max-new-tokens", "4", "--db", str(db)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: --decode-step graph records a CUDA graph: it needs the model on a CUDA device (it is on cpu)")
    if db.exists():
        import sqlite3

        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_a_static_sweep_stores_the_same_tokens_and_says_so(tiny_llama_dir, books_dir, tmp_path):
    """--decode-step static on the CPU: a whole sweep through the static step, the tokens of the
    launched run, the setting stored with the run and named in the report's header."""
    import json
    import sqlite3

    db = tmp_path / "r.db"
    args = ["--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}", "--num-wikitext-samples", "2",
            "--num-pg19-samples", "0", "--wikitext-prompt-tokens", "48", "--max-new-tokens", "6", "--eval-tokens", "0",
            "--keep-ratios", "0.5", "--prune-after", "8", "--no-warmup", "--db", str(db), "--json"]
    runs = {}
    for step in ("launched", "static"):
        res = CliRunner().invoke(app, ["sweep", "--decode-step", step, *args])
        assert res.exit_code == 0, res.output
        runs[step] = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)

    def tokens(run):
        return dict(con.execute("SELECT sample_index || config_key, generated_ids_json FROM samples WHERE run_id=?",
                                (run,)).fetchall())

    assert tokens(runs["static"]) == tokens(runs["launched"]) and len(tokens(runs["static"])) == 4
    cfg = json.loads(con.execute("SELECT config_json FROM runs WHERE id=?", (runs["static"],)).fetchone()[0])
    assert cfg["decode_step"] == "static"
    report = CliRunner().invoke(app, ["report", "--run-id", str(runs["static"]), "--db", str(db), "--format",
                                      "markdown"])
    assert "decode step static" in report.stdout, report.stdout



def test_a_new_buffers_unwritten_slots_never_reach_attention(model, monkeypatch):
    """New buffers are uninitialised memory: made NaN here (what a reused GPU block may hold),
    the static step still generates the reference's tokens -- the slots it masks hold zeros."""
    from knormctl.engine import kvbuffer

    def poisoned(fn):
        def new_empty_nan(self, *size, **kw):
            return torch.Tensor.new_full(self, size, float("nan"), **kw)
        def wrapped(*a, **kw):
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "new_empty", new_empty_nan)
                return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(BufferLayer, "_grow", poisoned(BufferLayer._grow))
    monkeypatch.setattr(kvbuffer, "_gather_into", poisoned(kvbuffer._gather_into))
    cfg = _cfg("knorm")
    ref = run_generation(model, _ids(), cfg, NEW, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, NEW, decode_step="static")
    assert got.token_ids == ref.token_ids and got.static_steps == NEW - 1


@pytest.mark.parametrize("mode, kr, prune_after, layouts", [
    ("prefill", 0.5, 0, "one"),  # one cut, gathered into a right-sized buffer before the first step
    ("decode", 0.3, 8, "several"),  # the cache shrinks: later cuts gather into smaller buffers
])
def test_recording_follows_the_buffers_and_replays_into_one_logits_tensor(model, monkeypatch, mode, kr,
                                                                          prune_after, layouts):
    """The record/replay bookkeeping without a GPU: a stand-in graph whose replay recomputes the
    static step into the logits tensor of its recording (what a CUDA graph's replay does). The
    loop must read each step's logits before the next replay overwrites them, and record again
    exactly when a buffer moved."""
    recorded = []

    def record(self):
        self.logits = self._forward()
        recorded.append(tuple((layer.buffer_address(), layer.capacity) for layer in self.cache.layers))
        owner = self

        class Replay:
            def replay(self):
                owner.logits.copy_(owner._forward())

        self.graph = Replay()
        self.captures += 1

    def recording(mode_, fwd, batch, devices, kv_buffer):  # loop.static_step_for, recording on the CPU
        return graphstep.StaticStep(fwd, batch, devices[0], capture=True)

    monkeypatch.setattr(graphstep.StaticStep, "_record", record)
    monkeypatch.setattr(loop, "static_step_for", recording)
    cfg = _cfg("knorm", mode, kr, prune_after)
    ref = run_generation(model, _ids(), cfg, 40, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, 40, decode_step="static")
    assert got.token_ids == ref.token_ids and got.static_steps == 39
    assert got.graph_captures == len(recorded) and all(a != b for a, b in zip(recorded, recorded[1:]))
    assert (len(recorded) == 1) if layouts == "one" else (1 < len(recorded) < 39)


@pytest.mark.kvpress
def test_kvpress_cut_entries_are_taken_into_the_buffer_for_the_first_static_step():
    """kvpress's hook assigns the kept entries to the layers during the prefill; the static step
    reads the buffers, so they are copied in before the first step, which is static too. (Llama:
    kvpress cannot read GPT-NeoX's cache.)"""
    model = MODELS["llama"]()
    cfg = PressConfig(press="kvpress:KnormPress", keep_ratio=0.5, prune_after=0, skip_layers=(),
                      mode="prefill").validate()
    ref = run_generation(model, _ids(), cfg, NEW, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, NEW, decode_step="static")
    assert got.token_ids == ref.token_ids and got.static_steps == NEW - 1
    assert got.kv_entries_final == ref.kv_entries_final and got.compress_events == ref.compress_events == 1


@pytest.mark.parametrize("step", ["static", "graph"])
@pytest.mark.parametrize("args, message", [
    (["--presses", "tova", "--compress-mode", "decode"],
     "cannot be used with press 'tova': tova observes the attention at every decode step"),
    (["--presses", "adakv(base=knorm)", "--compress-mode", "prefill"],
     "cannot be used with press 'adakv(base=knorm)': adakv sets per-head budgets"),
])
def test_presses_whose_steps_cannot_be_static_are_refused(step, args, message, tmp_path):
    """Every configuration of a static or graph run takes the static step, or the run does not
    start: one press timed launched next to static ones would compare two engines, not two presses."""
    res = CliRunner().invoke(app, ["sweep", "--device", "cuda", "--decode-step", step, *args,
                                   "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2, res.output
    assert f"--decode-step {step} {message}" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "r.db").exists()


def test_static_attention_equals_sdpa_over_the_live_entries():
    """Grouped query heads against a masked whole buffer: the attention SDPA gives over the live
    entries alone (keys repeated per query head there), for each row its own length."""
    torch.manual_seed(0)
    b, kv, g, cap, d = 2, 2, 3, 11, 8
    q = torch.randn(b, kv * g, 1, d)
    k, v = torch.randn(b, kv, cap, d), torch.randn(b, kv, cap, d)
    k[:, :, 9:] = v[:, :, 9:] = 0  # the zeroed tail
    live = torch.zeros(b, 1, 1, cap, dtype=torch.bool)
    live[..., :9] = True
    out, weights = graphstep.static_attention(None, q, k, v, live, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :9].repeat_interleave(g, dim=1), v[:, :, :9].repeat_interleave(g, dim=1), scale=0.3)
    assert weights is None and out.shape == (b, 1, kv * g, d)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_static_steps_do_not_go_through_sdpa(model, monkeypatch):
    """transformers' SDPA path, given a mask on CUDA, repeats every key/value head per query head
    (4 copies of the cache per step at the 8B shape): the static step uses its own attention."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    layers = model.config.num_hidden_layers
    run_generation(model, _ids(), _cfg("knorm"), NEW)
    assert len(calls) == layers * NEW  # the prefill and every launched step
    calls.clear()
    res = run_generation(model, _ids(), _cfg("knorm"), NEW, decode_step="static")
    assert res.static_steps == NEW - 1 and len(calls) == layers  # the prefill only
    assert model.config._attn_implementation == "sdpa"  # switched back after every step


@pytest.mark.parametrize("spec", ["knorm", "snapkv(window_size=8)"])
def test_a_question_after_the_cut_then_static_steps(model, spec):
    """Question tasks: the question is fed through the compressed cache (launched), then the
    answer's steps are static -- the reference's tokens, stopping at a stop id as it does."""
    cfg = _cfg(spec)
    q = _ids(7, seed=9)[0].tolist()
    ref = run_generation(model, _ids(), cfg, NEW, question_ids=q, kv_buffer=False)
    got = run_generation(model, _ids(), cfg, NEW, question_ids=q, decode_step="static")
    assert got.token_ids == ref.token_ids and got.static_steps == NEW - 1
    stop = [ref.token_ids[5]]
    ref_s = run_generation(model, _ids(), cfg, NEW, question_ids=q, kv_buffer=False, stop_ids=stop)
    got_s = run_generation(model, _ids(), cfg, NEW, question_ids=q, decode_step="static", stop_ids=stop)
    assert got_s.token_ids == ref_s.token_ids and len(got_s.token_ids) < NEW


def test_the_python_api_takes_the_decode_step(model):
    from knormctl.engine.api import generate_with_compression

    kw = dict(max_new_tokens=NEW, keep_ratio=0.5, prune_after=0, skip_layers=(), compress_mode="prefill")
    launched = generate_with_compression(model, None, _ids(), **kw)
    static = generate_with_compression(model, None, _ids(), decode_step="static", **kw)
    assert static.token_ids == launched.token_ids
    assert (launched.static_steps, static.static_steps) == (0, NEW - 1)
