"""Where a decode step's time goes (issue 16 item 5), from one run, configurations interleaved.

Three configurations through the engine's own loop (``run_generation``), the prompt from
the books as in compression_pays.py:
    full cache at a 4096-token prompt, knorm keep 0.5 in prefill mode (the cache then holds
    ~2048 entries per layer), full cache at a 1024-token prompt (the same text's last 1024).

1. Wall step time without the profiler: median ITL over interleaved rounds (the ratios).
2. torch.profiler over N decode steps of one more generation per configuration (after
   the warm-up): self CPU time grouped by op category -- matmul/linear, lm_head (its own
   row), attention (scaled_dot_product_attention and its children), cache append
   (BufferLayer.update), norm/rotary/elementwise, other aten ops -- and what no op
   accounts for (Python, dispatch, the profiler's own cost): profiled wall - summed op time.
3. Micro-benchmarks on the model's own modules and shapes: lm_head alone; attention (SDPA
   as transformers calls it, on buffer views) and the cache append alone at 1024, 2048
   and 4096 entries; knormctl's per-step Python (CacheLedger.grew, kv_size, the cut
   check, RowPicker) alone.
4. The split of the 4096-token step into a part that depends on the cache and one that
   does not, and the best prefill-0.5 / full TPOT ratio this CPU could reach even if
   attention cost exactly what its entries cost.

    python benchmarks/decode_profile.py | tee benchmarks/results/decode_profile_epyc.txt
    python benchmarks/decode_profile.py --dtype bfloat16
    python benchmarks/decode_profile.py --quick
"""

from __future__ import annotations

import os
import statistics
import time

import _common as c

# op names (aten::...) by category; what is not listed (and not under a marker) is "other aten"
MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "t", "_unsafe_view", "mv"}
ELEMENTWISE = {"mul", "add", "sub", "div", "div_", "neg", "pow", "rsqrt", "mean", "sum", "silu", "cat", "sin", "cos",
               "exp", "_to_copy", "to", "copy_", "fill_", "add_", "mul_", "sqrt", "reciprocal", "clone", "contiguous"}
CATEGORIES = ["matmul (q/k/v/o, MLP)", "lm_head (49k vocab)", "attention (SDPA)", "cache append",
              "norm / rotary / elementwise", "other aten ops", "not in any op (Python, dispatch, profiler)"]


def uptime() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------
# profiler instrumentation: markers around lm_head and the cache append, a step per forward


class Markers:
    """record_function ranges around ``lm_head`` and ``BufferLayer.update`` while profiling,
    and a profiler step after every forward of the model (so a profiler step = a decode step:
    pick, account, cut check, forward). Removed by ``close()``."""

    def __init__(self, model):
        import torch

        from knormctl.engine import kvbuffer

        self.torch, self.kvbuffer = torch, kvbuffer
        self.prof = None
        self._open = []
        self.handles = [
            model.lm_head.register_forward_pre_hook(lambda m, a: self._enter("lm_head")),
            model.lm_head.register_forward_hook(lambda m, a, o: self._exit()),
            model.register_forward_hook(lambda m, a, o: self.prof.step() if self.prof is not None else None),
        ]
        self._update = kvbuffer.BufferLayer.update
        orig = self._update
        rf = torch.autograd.profiler.record_function

        def update(layer, *args, **kwargs):
            with rf("knormctl.cache_append"):
                return orig(layer, *args, **kwargs)

        kvbuffer.BufferLayer.update = update

    def _enter(self, name):
        r = self.torch.autograd.profiler.record_function(name)
        r.__enter__()
        self._open.append(r)

    def _exit(self):
        self._open.pop().__exit__(None, None, None)

    def close(self):
        for h in self.handles:
            h.remove()
        self.kvbuffer.BufferLayer.update = self._update


def categorize(events) -> tuple[dict[str, float], float, int, dict[str, float]]:
    """Per profiler step (= decode step): self CPU us per category and what no op accounts
    for (the step's wall minus its ops). Returns the median of each over the steps (robust
    to a burst of outside load in one step), the median step wall, the step count, and the
    mean self us per step of each op name."""
    def root(e):
        while e.cpu_parent is not None:
            e = e.cpu_parent
        return e

    steps = {id(e): e for e in events if e.name.startswith("ProfilerStep")}  # "ProfilerStep*"
    per_step = {sid: dict.fromkeys(CATEGORIES, 0.0) for sid in steps}
    per_op: dict[str, float] = {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue  # markers: their own self time is the profiler's, counted as "not in any op"
        top = root(e)
        if id(top) not in per_step:
            continue  # outside the active steps
        op = e.name[6:]
        up = set()
        p = e.cpu_parent
        while p is not None:
            up.add(p.name)
            p = p.cpu_parent
        if "knormctl.cache_append" in up:
            k = "cache append"
        elif "aten::scaled_dot_product_attention" in up or "scaled_dot_product" in op:
            k = "attention (SDPA)"
        elif "lm_head" in up:
            k = "lm_head (49k vocab)"
        elif op in MATMUL:
            k = "matmul (q/k/v/o, MLP)"
        elif op in ELEMENTWISE:
            k = "norm / rotary / elementwise"
        else:
            k = "other aten ops"
        per_step[id(top)][k] += e.self_cpu_time_total
        per_op[e.name] = per_op.get(e.name, 0.0) + e.self_cpu_time_total
    not_in = CATEGORIES[-1]
    for sid, cats in per_step.items():
        cats[not_in] = steps[sid].cpu_time_total - sum(cats.values())
    n = len(steps)
    med = {k: statistics.median(cats[k] for cats in per_step.values()) for k in CATEGORIES}
    wall = statistics.median(e.cpu_time_total for e in steps.values())
    return med, wall, n, {op: us / n for op, us in per_op.items()}


def profile_run(lm, ids, cfg, n_steps: int):
    """One generation with the profiler active over decode steps 3 .. n_steps + 2 (the
    first decode step carries the prefill-mode cut; step 2 is the profiler's warm-up)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from knormctl.engine.loop import run_generation

    marks = Markers(lm.model)
    got = {}

    def ready(p):
        got["events"] = p.events()

    try:
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=1, active=n_steps, repeat=1),
                     on_trace_ready=ready) as prof:
            marks.prof = prof
            run_generation(lm.model, ids, cfg, n_steps + 4)
            marks.prof = None
    finally:
        marks.close()
    return categorize(got["events"])


# ---------------------------------------------------------------------------------------
# micro-benchmarks


def bench(fn, reps: int, inner: int = 1) -> float:
    """Fastest sample's seconds per call of ``fn`` (``inner`` calls per sample), after 3 warm-up
    samples: the minimum, not the median, because a burst of outside load on these 2 shared
    cores stalls a two-thread op for a whole scheduler slice and only ever adds time."""
    for _ in range(3):
        fn()
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        xs.append((time.perf_counter() - t0) / inner)
    return min(xs)


def micro(lm, lengths, reps: int) -> dict:
    """Per-step costs of one part at a time, summed over the model's layers, shapes as in a
    decode step (batch 1, one query token)."""
    import torch
    import torch.nn.functional as F

    from knormctl.engine.kvbuffer import BufferLayer

    m = lm.model
    cfg = m.config
    L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    dt = next(m.parameters()).dtype
    out = {}
    with torch.inference_mode():
        h = torch.randn(1, 1, cfg.hidden_size, dtype=dt)
        out["lm_head"] = bench(lambda: m.lm_head(h), reps, 5)
        # the other weights, every layer's in turn: one layer's alone would stay in the CPU's
        # caches between calls, where a decode step streams every weight from memory once
        layers = m.model.layers
        lin = [f for lay in layers for f in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                                             lay.self_attn.o_proj)]
        out["q/k/v/o projections"] = bench(lambda: [f(h) for f in lin], reps)
        out["MLP"] = bench(lambda: [lay.mlp(h) for lay in layers], reps)
        q = torch.randn(1, 1, H, D, dtype=dt).transpose(1, 2)  # as q_proj(...).view(...).transpose(1, 2)
        scale = D ** -0.5
        for n in lengths:
            # one BufferLayer per model layer, n entries each: every layer's keys and values are
            # read once per step, from memory (one layer's alone would stay in the CPU's caches)
            cap = n + 96
            bufs = []
            for _ in range(L):
                b = BufferLayer(cap)
                b.update(torch.randn(1, KV, n, D, dtype=dt), torch.randn(1, KV, n, D, dtype=dt))
                bufs.append(b)

            def attn():
                for b in bufs:  # views of a buffer, as BufferLayer hands them to attention
                    F.scaled_dot_product_attention(q, b.keys, b.values, attn_mask=None, dropout_p=0.0, scale=scale,
                                                   is_causal=False, enable_gqa=True)

            out[f"attention {n}"] = bench(attn, reps)
            contig = [(b.keys.contiguous(), b.values.contiguous()) for b in bufs]

            def attn_contig():
                for k, v in contig:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=scale,
                                                   is_causal=False, enable_gqa=True)

            out[f"attention {n} contiguous"] = bench(attn_contig, reps)
            contig.clear()  # the copies go before the next length (the closure keeps the name)
            k1 = torch.randn(1, KV, 1, D, dtype=dt)
            v1 = torch.randn(1, KV, 1, D, dtype=dt)

            def append():
                for b in bufs:
                    b.update(k1, v1)
                for b in bufs:  # back to n entries: the buffer stays the same size
                    b._n -= 1
                    b._fed -= 1
                    b._set_views()

            out[f"append {n}"] = bench(append, reps)
    return out


def knormctl_step_costs(lm, ids, cfgs: dict, reps: int) -> dict:
    """knormctl's per-step Python, each part alone on a real cache after a generation:
    CacheLedger.grew (shapes of every layer), kv_size (the loop's account()), the cut check
    (Compressor.after_forward on a decode step), RowPicker (argmax), the positions slice."""
    import torch

    from knormctl.engine.compress import Compressor, kv_size
    from knormctl.engine.kvcache import CacheLedger, new_cache
    from knormctl.engine.batch import RowPicker
    from knormctl.engine.loop import CachedForward, as_input_ids

    m = lm.model
    out = {}
    with torch.inference_mode():
        x = as_input_ids(ids, torch.device("cpu"))
        cache = new_cache(m, capacity=x.shape[1] + 8)
        fwd = CachedForward(m, cache)
        pos = torch.arange(x.shape[1] + 8).unsqueeze(0)
        logits = fwd(x, pos[:, :x.shape[1]]).logits
        ledger = CacheLedger(m, cache)
        ledger.grew(x.shape[1])
        out["CacheLedger.grew"] = bench(lambda: ledger.grew(0), reps, 50)
        out["kv_size (account)"] = bench(lambda: kv_size(cache), reps, 50)
        for name, cfg in cfgs.items():
            comp = Compressor(cfg, lm.num_layers, model=m, seed=0)
            out[f"cut check ({name})"] = bench(lambda: comp.after_forward(cache, prefill=False), reps, 50)
            comp.close()
        pick = RowPicker(False, 1.0, [0])
        out["RowPicker (argmax)"] = bench(lambda: pick(logits), reps, 50)
        out["positions slice"] = bench(lambda: pos[:, 100:101], reps, 50)
    return out


# ---------------------------------------------------------------------------------------


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--short-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=48, help="decode steps per timed generation")
    p.add_argument("--profile-steps", type=int, default=16, help="decode steps under the profiler")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    args = p.parse_args()
    if args.quick:
        args.long_tokens, args.short_tokens, args.new_tokens, args.profile_steps, args.repeats = 256, 64, 8, 3, 1
    c.setup(args)

    from knormctl.config import PressConfig
    from knormctl.engine.loop import run_generation

    lm = c.load(args)
    sample = c.prompts(args, lm.tokenizer, 1, args.long_tokens)[0]
    long_ids = sample.prompt_ids
    short_ids = long_ids[-args.short_tokens:]
    L, S, kr = args.long_tokens, args.short_tokens, args.keep_ratio
    c.header("where a decode step's time goes", args, {
        "model": lm.resolved, "prompts": f"{len(long_ids)} and {len(short_ids)} tokens ({sample.doc_id})",
        "new tokens": f"{args.new_tokens} per timed generation; {args.profile_steps} steps profiled",
        "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})

    full = PressConfig().validate()
    pref = PressConfig(press="knorm", keep_ratio=kr, prune_after=0, mode="prefill").validate()
    names = {"full": f"{L} full cache", "prefill": f"{L} knorm {kr:g} prefill", "short": f"{S} full cache"}
    runs = {"full": (long_ids, full), "prefill": (long_ids, pref), "short": (short_ids, full)}
    loads = {"start": uptime()}

    # 1. wall step times, no profiler
    res = c.interleaved({names[k]: (lambda i=i, f=f: run_generation(lm.model, i, f, args.new_tokens))
                         for k, (i, f) in runs.items()}, args.repeats)
    loads["after timed rounds"] = uptime()
    itl = {k: c.median([r.itl_p50_s for r in res[names[k]]]) for k in runs}
    tpot = {k: c.median([r.tpot_s for r in res[names[k]]]) for k in runs}
    # entries per layer at the middle of the timed steps
    entries = {k: res[names[k]][-1].kv_entries_final // lm.num_layers - args.new_tokens // 2 for k in runs}

    # 2. the profile, one generation per configuration
    prof = {}
    for k, (i, f) in runs.items():
        c.log(f"profiling {names[k]}")
        prof[k] = profile_run(lm, i, f, args.profile_steps)
    loads["after profiles"] = uptime()

    # 3. micro-benchmarks
    c.log("micro-benchmarks")
    lengths = sorted({S, int(L * kr), L})
    mb = micro(lm, lengths, reps=15 if not args.quick else 3)
    ks = knormctl_step_costs(lm, short_ids, {"no press": full, f"knorm {kr:g} prefill": pref},
                             reps=15 if not args.quick else 3)
    loads["after micro-benchmarks"] = uptime()

    # ---- tables
    order = ["full", "prefill", "short"]
    rows = [[names[k], entries[k], c.ms(itl[k]), c.ms(tpot[k]), c.num(itl[k] / itl["full"])] for k in order]
    c.table("1. wall step time without the profiler (medians over rounds)",
            ["configuration", "entries/layer (mid)", "ITL p50 ms", "TPOT ms", "ITL / 4096 full"], rows,
            notes=["TPOT (mean) includes the prefill-mode cut in the first step; ITL p50 does not"])

    hdr = ["category"]
    for k in order:
        hdr += [f"{names[k]} ms", "share"]
    rows = []
    for cat in CATEGORIES:
        row = [cat]
        for k in order:
            cats, wall, _, _ = prof[k]
            row += [c.ms(cats[cat] / 1e6), f"{100 * cats[cat] / wall:.1f}%"]
        rows.append(row)
    row = ["profiled step (wall)"]
    for k in order:
        _, wall, _, _ = prof[k]
        row += [c.ms(wall / 1e6), "100%"]
    rows.append(row)
    row = ["unprofiled step (ITL p50)"]
    for k in order:
        row += [c.ms(itl[k]), "-"]
    rows.append(row)
    row = ["unprofiled step - the ops' time"]
    for k in order:
        ops = sum(v for cat, v in prof[k][0].items() if not cat.startswith("not in")) / 1e6
        row += [c.ms(itl[k] - ops), f"{100 * (itl[k] - ops) / itl[k]:.1f}%"]
    rows.append(row)
    c.table(f"2. profiled decode step by op category (self CPU ms per step, median of {args.profile_steps} steps)",
            hdr, rows, notes=["share = of the median profiled step; medians per row, so the rows need not add up",
                   "matmul: aten::" + ", ".join(sorted(MATMUL)) + " outside lm_head",
                   "elementwise: aten::" + ", ".join(sorted(ELEMENTWISE)) + " outside the cache append and SDPA",
                   "the profiler adds a few us per op: the profiled step is longer than the unprofiled one,",
                   "and most of that shows up as 'not in any op'"])

    top = {}
    for k in order:
        for op, us in prof[k][3].items():
            top.setdefault(op, {})[k] = us
    top_ops = sorted(top, key=lambda op: -top[op].get("full", 0))[:12]
    c.table("2b. the largest ops (self CPU ms per step, mean over the profiled steps)", ["op"] + [names[k] for k in order],
            [[op] + [c.ms(top[op].get(k, 0) / 1e6) for k in order] for op in top_ops])

    rows = [["lm_head", c.ms(mb["lm_head"])],
            ["q/k/v/o projections (all layers)", c.ms(mb["q/k/v/o projections"])],
            ["MLP (all layers)", c.ms(mb["MLP"])]]
    for n in lengths:
        rows.append([f"attention, {n} entries (all layers; buffer views)", c.ms(mb[f"attention {n}"])])
        rows.append([f"attention, {n} entries (all layers; contiguous)", c.ms(mb[f"attention {n} contiguous"])])
        rows.append([f"cache append at {n} entries (all layers)", c.ms(mb[f"append {n}"])])
    c.table("3. micro-benchmarks (fastest of 15 samples, ms per decode step, summed over the layers)", ["part", "ms"], rows)

    step = itl["full"]
    rows = [[k, f"{v * 1e6:.1f}", f"{100 * v / step:.2f}%"] for k, v in ks.items()]
    total_k = ks["CacheLedger.grew"] + ks["kv_size (account)"] + ks[f"cut check (knorm {kr:g} prefill)"] \
        + ks["RowPicker (argmax)"] + ks["positions slice"]
    rows.append(["sum (prefill-mode step)", f"{total_k * 1e6:.1f}", f"{100 * total_k / step:.2f}%"])
    rows.append([f"cache append at {L} (from 3.)", f"{mb[f'append {L}'] * 1e6:.1f}",
                 f"{100 * mb[f'append {L}'] / step:.2f}%"])
    c.table("3b. knormctl's own per-step work, each part alone", ["part", "us per step", f"of the {L} full step"],
            rows)

    # 4. the split and the bound
    a_long, a_half = mb[f"attention {L}"], mb[f"attention {int(L * kr)}"]
    slope = (a_long - mb[f"attention {S}"]) / (L - S)  # s per entry (all layers)
    x_micro = slope * L  # the part of attention that grows with the entries, at L
    # the same from the whole steps: ITL = a + b * entries, fitted on the three configurations
    xs = [entries[k] for k in order]
    ys = [itl[k] for k in order]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    x_fit = b * entries["full"]
    att = {k: prof[k][0]["attention (SDPA)"] / 1e6 for k in order}
    x_prof = (att["full"] - att["short"]) / (entries["full"] - entries["short"]) * entries["full"]
    rows = []
    for label, x in (("attention micro-benchmark (slope x entries)", x_micro),
                     ("profiled SDPA (slope x entries)", x_prof), ("fit of the three steps", x_fit)):
        y = step - x
        bound = (y + kr * x) / step
        rows.append([label, c.ms(x), c.ms(y), f"{100 * x / step:.1f}%", c.num(bound)])
    # the bandwidth view: a decode step reads every weight once (the tied embedding as lm_head)
    # and every cached key and value once
    m = lm.model
    w_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in m.parameters()}.values())
    cfg = m.config
    kv_per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * next(m.parameters()).element_size()
    kv = {k: entries[k] * kv_per_entry for k in order}
    bw_bound = (w_bytes + kv["prefill"]) / (w_bytes + kv["full"])
    bw_short = (w_bytes + kv["short"]) / (w_bytes + kv["full"])
    meas = itl["prefill"] / itl["full"]
    bound_direct = 1 - (a_long - a_half) / step
    rows.append(["attention(4096) - attention(2048), micro", c.ms(a_long - a_half), "-", "-", c.num(bound_direct)])
    c.table(f"4. the {L}-token step ({c.ms(step)} ms ITL p50): cache-dependent X, independent Y, best ratio",
            ["estimate of X", "X ms", "Y ms", "X share", f"best {kr:g}-prefill / full"], rows,
            notes=[f"best ratio = (Y + {kr:g} X) / (X + Y): the compressed step with attention exactly "
                   f"proportional to its entries", f"measured here (ITL p50): {meas:.3f}; "
                   f"TPOT: {tpot['prefill'] / tpot['full']:.3f}; target <= 0.75",
                   f"bytes one step reads: weights {c.mib(w_bytes)} MiB, KV {c.mib(kv['full'])} / "
                   f"{c.mib(kv['prefill'])} / {c.mib(kv['short'])} MiB ({names['full']} / {names['prefill']} / "
                   f"{names['short']})",
                   f"if a step were bound by those bytes alone: {kr:g}-prefill / full = {bw_bound:.3f}, "
                   f"{S} / {L} full = {bw_short:.3f} (measured {itl['short'] / itl['full']:.3f})",
                   "machine load (1/5/15 min) " + "; ".join(f"{k}: {v}" for k, v in loads.items())])


if __name__ == "__main__":
    main()
