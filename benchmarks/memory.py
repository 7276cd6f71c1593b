"""Memory of an in-process sweep (issue 6 target 6): one model load, several configurations.

    peak RSS of the sweep / (weights + largest KV cache + prefill activations)   target <= 1.3
and RSS after every configuration, to show that nothing accumulates (no model copy per
configuration, no cache kept alive). Activations are measured, not guessed: the RSS peak
during one full-cache prefill minus the RSS before it, minus the KV cache that prefill made.
CPU only (process RSS, Linux /proc); on CUDA use gpu_check.py's max_memory_allocated.

    python benchmarks/memory.py                 # 2048-token prompt, 32 new tokens, 7 configurations
    python benchmarks/memory.py --quick
"""

from __future__ import annotations

import gc
import resource

import _common as c


def weight_bytes(model) -> int:
    """Parameters and buffers, each storage once (tied embeddings share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=1, device_choices=("cpu",))
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens = 256, 8
    c.setup(args)

    import torch
    from knormctl.config import PressConfig
    from knormctl.engine.compress import kv_size
    from knormctl.engine.kvcache import cache_kwargs, new_cache
    from knormctl.engine.loop import forward_kwargs, run_generation

    if c.proc_status_bytes("VmRSS") is None or not c.reset_rss_peak():
        raise SystemExit("needs Linux /proc/self/status and a writable /proc/self/clear_refs")
    base = c.proc_status_bytes("VmRSS")  # interpreter + torch + transformers, no model yet
    lm = c.load(args)
    gc.collect()
    load_peak = c.proc_status_bytes("VmHWM")
    weights = weight_bytes(lm.model)
    ids = c.prompts(args, lm.tokenizer, 1, args.prompt_tokens)[0].prompt_ids
    # Warm up: the weights may be memory-mapped and only read in by the first forward;
    # without this the activation figure below would count the weights a second time.
    run_generation(lm.model, ids[:16], PressConfig().validate(), 2)
    gc.collect()
    after_load = c.proc_status_bytes("VmRSS")
    c.header("memory of a sweep", args, {"model": lm.resolved, "prompt": f"{len(ids)} tokens",
                                         "new tokens": args.new_tokens})

    # activations of one full-cache prefill (the largest forward of the sweep)
    with torch.inference_mode():
        gc.collect()
        before = c.proc_status_bytes("VmRSS")
        c.reset_rss_peak()
        cache = new_cache(lm.model)
        lm.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids)).unsqueeze(0),
                 **cache_kwargs(lm.model, cache), **forward_kwargs(lm.model))
        prefill_kv = kv_size(cache)[1]
        activations = max(0, c.proc_status_bytes("VmHWM") - before - prefill_kv)
        del cache
    gc.collect()

    kr_low = 0.5
    configs = [PressConfig(), PressConfig(press="knorm", keep_ratio=1.0),
               PressConfig(press="knorm", keep_ratio=0.9, prune_after=512),
               PressConfig(press="knorm", keep_ratio=kr_low, prune_after=0, mode="prefill")]
    if not args.quick:
        configs += [PressConfig(press="random", keep_ratio=0.7, prune_after=512),
                    PressConfig(press="streaming", keep_ratio=kr_low, prune_after=0, mode="prefill"),
                    PressConfig(press="knorm-inverse", keep_ratio=0.7, prune_after=512)]
    rows, peaks, kv_peaks = [], [], []
    for cfg in configs:
        r = run_generation(lm.model, ids, cfg.validate(), args.new_tokens)
        gc.collect()
        rss = c.proc_status_bytes("VmRSS")
        peaks.append(r.memory.bytes)  # VmHWM during this generation (the engine resets it per sample)
        kv_peaks.append(r.kv_bytes_peak)
        rows.append([cfg.key, c.mib(r.kv_bytes_peak), c.mib(r.memory.bytes), c.mib(rss), c.mib(rss - after_load)])
        del r
    c.table("per configuration, in sweep order (MiB)",
            ["configuration", "KV peak", "RSS peak during it", "RSS after it", "RSS after - RSS after warm-up"], rows,
            notes=["'RSS after' flat from row to row = nothing accumulates"])

    sweep_peak = max(peaks)
    ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, never reset
    budget = weights + max(kv_peaks) + activations
    r_net, r_all = (sweep_peak - base) / budget, sweep_peak / (budget + base)
    c.table("peak vs what the model needs (MiB)", ["quantity", "value"], [
        ["runtime before the model (python, torch, transformers)", c.mib(base)],
        ["weights (parameters + buffers, storages once)", c.mib(weights)],
        ["RSS after load and a short warm-up - runtime", c.mib(after_load - base)],
        ["  of which not weights (tokenizer, loader leftovers)", c.mib(after_load - base - weights)],
        ["RSS peak while loading", c.mib(load_peak)],
        ["largest KV cache (peak over the sweep)", c.mib(max(kv_peaks))],
        ["prefill activations (measured)", c.mib(activations)],
        ["budget = weights + KV + activations", c.mib(budget)],
        ["sweep RSS peak", c.mib(sweep_peak)],
        ["ru_maxrss (whole process, loading included)", c.mib(ru_maxrss_kib * 1024)],
    ])
    c.table("ratios", ["ratio", "value", "target"], [
        ["(sweep peak - runtime) / budget", c.num(r_net), c.verdict(r_net, 1.3)],
        ["sweep peak / (budget + runtime)", c.num(r_all), c.verdict(r_all, 1.3)],
    ], notes=["the first charges the model and its caches only; the second also the interpreter and libraries"])


if __name__ == "__main__":
    main()
