"""Issue 16's GPU targets at the Llama-3.1-8B shape (random bf16 weights, 32k-token prompt),
run as parts (f) and (g) of gpu_check.py on the model part (e) builds:

  (f1) full-cache decode step / memory floor                            target <= 1.5
       (--decode-step launched, static, and graph: replayed from a CUDA graph)
  (f2) knorm keep 0.5 (prefill) step / full step, vs the floor's ratio  target within 0.05
  (f3) the same configuration measured twice in one run                 target within 3 %
  (f4) peak with --prefill-chunk 4096 at keep 0.5                       target <= weights + 0.6 x full KV + activations
  (g) largest batch within 70 GiB, keep 0.5 vs full cache              target >= 1.8x, higher tokens/s

The memory floor of a decode step: every byte the step must read once -- the weights a
token uses (all but the input embeddings, of which it reads one row) and the KV cache --
over the GPU's memory bandwidth. The bandwidth is the datasheet's where the GPU is known
(as issue 16 computed it: 3.35 TB/s for an H100 SXM) and a measured device copy otherwise;
both are printed.
"""

from __future__ import annotations

import time

import _common as c

# Datasheet HBM bandwidths (bytes/s), matched against torch.cuda.get_device_name() in order.
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
                  ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12)]


def spec_bandwidth(name: str | None) -> float | None:
    for key, bw in SPEC_BANDWIDTH:
        if name and key in name:
            return bw
    return None


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes moved per second by a device-to-device copy (read + write), best of 5."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = c.sync_for(device)
    best = float("inf")
    for _ in range(6):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def read_bytes_per_token(model) -> int:
    """Weight bytes a decode step reads: every parameter but the input embeddings (one row of
    them is read), unless they are tied to the output head (then the head reads them all)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if emb.data_ptr() == out.data_ptr() else total - emb.numel() * emb.element_size()


def prefill_press(press: str = "none", keep: float = 1.0):
    """The full cache, or ``press`` keeping ``keep`` of every layer once after the prefill."""
    from knormctl.config import PressConfig

    if press == "none":
        return PressConfig().validate()
    return PressConfig(press=press, keep_ratio=keep, prune_after=0, skip_layers=(), mode="prefill").validate()


def attention_kernels(device: str, length: int, extra: int, spec_bw: float | None, *, kv: int = 8, g: int = 4,
                      d: int = 128, dtype: str | None = None, label: str = "(f0)") -> list[list[str]]:
    """(f0) One layer's decode attention at the 8B shape (``kv`` 8 key heads, ``g`` 4 query heads
    each, head_dim ``d`` 128; bf16 on CUDA, else float32 unless ``dtype``) over ``length`` live
    entries, three ways: SDPA over the valid prefix (the launched
    path: no mask, grouped heads read by SDPA itself); knormctl's ``static_attention`` over the
    whole buffer (``length + extra`` slots) under a length mask (the static step, what a CUDA graph records);
    SDPA with that mask after repeating every key/value head per query head (what transformers'
    SDPA path does with a mask on CUDA). Each against reading the live keys and values once."""
    import torch
    import torch.nn.functional as F

    from knormctl.engine.graphstep import static_attention

    dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if device == "cuda" else torch.float32
    cap = length + extra
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, kv * g, 1, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, kv, cap, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, kv, cap, d, device=device, dtype=dtype, generator=gen)
    live = torch.zeros(1, 1, 1, cap, dtype=torch.bool, device=device)
    live[..., :length] = True
    scale = d ** -0.5
    ways = {
        "SDPA, valid prefix (launched)": lambda: F.scaled_dot_product_attention(
            q, k[:, :, :length], v[:, :, :length], scale=scale, enable_gqa=True),
        "static_attention, masked buffer": lambda: static_attention(None, q, k, v, live, scaling=scale),
        "SDPA + repeat_kv + mask": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=live, scale=scale),
    }
    sync = c.sync_for(device)
    times = {}
    with torch.inference_mode():
        for name, fn in ways.items():
            for _ in range(3):
                fn()
            runs = []
            for _ in range(7):
                sync()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                sync()
                runs.append((time.perf_counter() - t0) / 20)
            times[name] = c.median(runs)
    bw = spec_bw or copy_bandwidth(device, 1 << 28)
    floor = 2 * kv * length * d * k.element_size() / bw
    rows = [[name, f"{t * 1e6:.1f}", f"{t / floor:.2f}"] for name, t in times.items()]
    c.table(f"{label} one layer's decode attention, {length} live entries + {extra} hidden slots "
            f"({kv} key heads x {g} query heads, head_dim {d}, {str(dtype).removeprefix('torch.')})",
            ["way", "us", "x reading the live K/V once"], rows,
            notes=[f"floor {floor * 1e6:.1f} us at {bw / 1e12:.2f} TB/s; median of 7 x 20 calls after 3 warm-ups"])
    ratio = times["static_attention, masked buffer"] / times["SDPA, valid prefix (launched)"]
    return [[str(dtype).removeprefix("torch."), f"{label} static_attention / SDPA prefix at {length}",
             c.num(ratio, 2), "(info)"]]


_TRIED: dict[int, tuple[list[str], str | None]] = {}  # id(model) -> decode_steps' answer: (f) and (g) try once


def decode_steps(model, ids, device: str) -> tuple[list[str], str | None]:
    """The ways to run a decode step here (``--decode-step``): launched and static everywhere, and
    graph on CUDA after one short trial: where the recording fails, the error, and the other ways
    and every other part still run (the recording has not been run on a GPU before). Tried once
    per model: in one process (``--parts efg``) (g) reuses (f)'s answer; gpu_session.sh runs g in
    a process of its own, which makes its own trial (one more 32k prefill)."""
    from knormctl.engine.loop import run_generation

    if device != "cuda":
        return ["launched", "static"], None
    if id(model) in _TRIED:
        return _TRIED[id(model)]
    try:
        res = run_generation(model, ids, prefill_press("knorm", 0.5), 4, decode_step="graph")
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        import torch

        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what the failed recording held, before the next part measures memory
        except Exception:  # noqa: BLE001 -- the recording's error is the one reported
            pass
    else:
        error = None if res.static_steps == 3 else f"only {res.static_steps} of 3 steps ran as the static step"
    if error:
        c.log(f"(f) --decode-step graph failed, launched and static only: {error}")
    _TRIED[id(model)] = (["launched", "static"] + ([] if error else ["graph"]), error)
    return _TRIED[id(model)]


def decode_kv_bytes(r, layers: int) -> float:
    """The KV bytes a decode step reads, averaged over the decode: the mean of the cache right
    after the prefill (and its cut) and at the end, which is ``new_tokens - 1`` entries per layer
    longer. Not ``kv_bytes_peak``: a prefill-mode press's peak is the whole prompt's cache before
    the cut, which no decode step reads (it put knorm 0.5's floor ratio at 0.944, not 0.889)."""
    per_position = r.kv_bytes_final / r.kv_entries_final  # entries: positions summed over layers, every row's
    after_cut = r.kv_bytes_final - (r.new_tokens - 1) * layers * per_position
    return (after_cut + r.kv_bytes_final) / 2


def decode_floor(model, ids, n: int, repeats: int, device: str, gpu_name: str | None) -> list[list[str]]:
    """(f1)-(f3): the median decode step of the full cache and of knorm 0.5 against the floor, each
    way a decode step can run (--decode-step launched, static, graph); the same configuration's
    rounds against each other. Returns summary rows, per way."""
    from knormctl.engine.loop import run_generation

    modes, graph_error = decode_steps(model, ids, device)
    cfgs = {(label, how): cfg for how in modes
            for label, cfg in (("full cache", prefill_press()), ("knorm 0.5", prefill_press("knorm", 0.5)))}
    res = c.interleaved({f"{label}, {how}": (lambda cfg=cfg, how=how: run_generation(model, ids, cfg, n,
                                                                                      decode_step=how))
                         for (label, how), cfg in cfgs.items()}, max(2, repeats))
    w = read_bytes_per_token(model)
    layers = model.config.num_hidden_layers
    measured = copy_bandwidth(device)
    spec = spec_bandwidth(gpu_name) if device == "cuda" else None
    bw = spec or measured
    rows, tpot, floor, spread = [], {}, {}, {}
    for (label, how) in cfgs:
        runs = res[f"{label}, {how}"]
        key = (label, how)
        tpot[key] = c.median([r.itl_p50_s for r in runs])  # the median step: the first carries the prefill cut
        kv = c.median([decode_kv_bytes(r, layers) for r in runs])
        floor[key] = (w + kv) / bw
        rounds = [r.itl_p50_s for r in runs]
        spread[key] = (max(rounds) - min(rounds)) / min(rounds)
        static = f"{runs[-1].static_steps}/{n - 1}, {runs[-1].graph_captures}" if how != "launched" else "-"
        rows.append([f"{label}, {how}", c.ms(tpot[key], 2), c.ms(floor[key], 2), c.num(tpot[key] / floor[key], 2),
                     c.mib(kv), " ".join(c.ms(t, 2) for t in rounds), f"{100 * spread[key]:.1f}%", static])
    c.table(f"(f1-f3) decode step vs the memory floor ({ids.shape[1]}-token prompt, {n} new tokens)",
            ["configuration", "step ms", "floor ms", "x floor", "KV MiB", "rounds ms", "spread",
             "static steps, graphs"], rows,
            notes=[f"bandwidth for the floor: {bw / 1e12:.2f} TB/s ({'datasheet' if spec else 'measured copy'}); "
                   f"measured copy {measured / 1e12:.2f} TB/s; weights read per token {c.mib(w)} MiB",
                   "step: median inter-token latency (the first step carries the prefill cut); CUDA events, no "
                   "host sync between steps (engine/timing.StepClock)" if device == "cuda" else
                   "step: median inter-token latency; host clock (CPU)",
                   "static: fixed shapes over the right-sized buffer, knormctl's grouped attention; graph: the "
                   "same step replayed from a CUDA graph (engine/graphstep.py)"]
                  + ([f"--decode-step graph FAILED: {graph_error}"] if graph_error else []))
    out = []
    for how in modes:
        full, keep = ("full cache", how), ("knorm 0.5", how)
        r_full = tpot[full] / floor[full]
        r_keep, r_floor = tpot[keep] / tpot[full], floor[keep] / floor[full]
        out += [["bf16", f"(f1) {how}: full-cache step / floor", c.num(r_full, 2), c.verdict(r_full, 1.5)],
                ["bf16", f"(f2) {how}: keep 0.5 step / full (floor ratio {r_floor:.3f})", c.num(r_keep),
                 "meets: within 0.05" if abs(r_keep - r_floor) <= 0.05 else "MISSES: not within 0.05"]]
        out += [["bf16", f"(f3) {label}, {how}: spread of {len(res[f'{label}, {how}'])} rounds",
                 f"{100 * spread[(label, how)]:.1f}%", c.verdict(spread[(label, how)], 0.03)]
                for label in ("full cache", "knorm 0.5")]
    if graph_error:
        out.append(["bf16", "(f) --decode-step graph", "FAILED", graph_error[:60]])
    return out


def chunked_peak(model, ids, n: int, chunk: int) -> list[list[str]]:
    """(f4): the prompt prefilled ``chunk`` tokens at a time, with and without knorm 0.5. The
    activations are what the full cache's chunked run holds above its weights and KV."""
    from knormctl.engine.capacity import weight_bytes
    from knormctl.engine.loop import run_generation

    weights = weight_bytes(model)
    runs = {}
    for name, cfg, size in [("full, one forward", prefill_press(), 0), ("full, chunked", prefill_press(), chunk),
                            ("knorm 0.5, one forward", prefill_press("knorm", 0.5), 0),
                            ("knorm 0.5, chunked", prefill_press("knorm", 0.5), chunk)]:
        c.log(f"(f4) {name}")
        runs[name] = run_generation(model, ids, cfg, n, prefill_chunk=size)
    full = runs["full, chunked"]
    kv_full = full.kv_bytes_peak
    act = (full.memory.bytes or 0) - weights - kv_full
    bound = weights + 0.6 * kv_full + act
    peak = runs["knorm 0.5, chunked"].memory.bytes
    c.table(f"(f4) peak memory, --prefill-chunk {chunk} vs one forward ({ids.shape[1]}-token prompt)",
            ["configuration", "peak MiB", "KV peak MiB", "KV final MiB"],
            [[k, c.mib(r.memory.bytes), c.mib(r.kv_bytes_peak), c.mib(r.kv_bytes_final)] for k, r in runs.items()],
            notes=[f"weights {c.mib(weights)} MiB; activations (full, chunked: peak - weights - KV) {c.mib(act)} MiB",
                   f"bound: weights + 0.6 x full KV + activations = {c.mib(bound)} MiB",
                   f"a chunked prefill holds at most the budget plus one chunk: KV peak / full = 0.5 + {chunk} / "
                   f"{ids.shape[1]} = {0.5 + chunk / ids.shape[1]:.3f} (the bound's 0.6 needs a chunk <= "
                   f"{int(0.1 * ids.shape[1])} tokens)"])
    ok = peak is not None and peak <= bound
    return [["bf16", f"(f4) keep 0.5 chunked peak MiB (bound {c.mib(bound)})", c.mib(peak),
             "meets" if ok else "MISSES"]]


def capacity(model, ids, budget: int, chunk: int, max_batch: int, device: str) -> list[list[str]]:
    """(g): the largest batch within ``budget`` bytes, full cache against knorm 0.5, every
    configuration prefilled ``chunk`` tokens at a time (bounded activations for both; the
    press cuts after every chunk), and the decode tokens/s at that batch (knormctl capacity),
    decode steps replayed from a CUDA graph where that works (the static step otherwise)."""
    from knormctl.engine.capacity import capacity_table

    modes, _ = decode_steps(model, ids, device)
    mode = modes[-1]  # graph where it works, else the static step a graph would record
    rows = capacity_table(model, ids[0].tolist(), [prefill_press(), prefill_press("knorm", 0.5)], new_tokens=8,
                          budget=budget, max_batch=max_batch, prefill_chunk=chunk, decode_step=mode,
                          progress=c.log)
    size = f"{budget / 2**30:.1f} GiB" if budget >= 2**30 else f"{budget / 2**20:.0f} MiB"
    how = f"--decode-step {mode}"
    c.table(f"(g) largest batch within {size} ({ids.shape[1]}-token prompt, --prefill-chunk "
            f"{chunk}, 8 new tokens, {how})",
            ["configuration", "largest batch", "peak MiB", "step ms", "tokens/s", "x batch", "x tokens/s"],
            [[r["config"], f"{r['largest_batch']}{'+' if r['capped'] else ''}", c.mib(r["peak_bytes"]),
              c.ms(r["step_s"], 2), c.num(r["tokens_per_s"], 1), c.num(r["batch_vs_full"], 2),
              c.num(r["tokens_per_s_vs_full"], 2)] for r in rows],
            notes=[f"memory: {rows[0]['memory_kind']}; probes: "
                   + "; ".join(f"{r['config']}: " + ", ".join(f"{p['batch']}{'' if p['fits'] else ' (no)'}"
                                                               for p in r["probes"]) for r in rows)])
    keep = rows[1]
    ok_b = keep["batch_vs_full"] is not None and keep["batch_vs_full"] >= 1.8
    ok_t = keep["tokens_per_s_vs_full"] is not None and keep["tokens_per_s_vs_full"] > 1.0
    return [["bf16", "(g) largest batch, keep 0.5 / full", c.num(keep["batch_vs_full"], 2),
             "meets >= 1.8" if ok_b else "MISSES >= 1.8"],
            ["bf16", "(g) tokens/s at that batch, keep 0.5 / full", c.num(keep["tokens_per_s_vs_full"], 2),
             "meets > 1" if ok_t else "MISSES > 1"]]
