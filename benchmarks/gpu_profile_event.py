"""Where one compression event's time goes on CUDA: kernels launched and the top ops.

    python benchmarks/gpu_profile_event.py      # on a CUDA machine (exit 1 elsewhere)

30 layers x 3 KV heads x 64 dims (SmolLM2-135M's cache shape), random float32 tensors in
the engine's own cache (BufferLayers, compacted in place), layer 0 skipped, keep_ratio 0.9;
the strictly layer-by-layer cut (budget 0: no stacked scoring, one selection per layer) and
the CUDA default (stacked scoring groups and selection chunks sized from the memory
headroom) against a clone() of the same layers (the floor), 20 events each after 5
warm-ups. No options besides --help; output: one line per size and way (results/
gpu_profile_event_h200.txt was taken before the cut ran on BufferLayers).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # knormctl from this checkout

LAYERS, HEADS, DIM = 30, 3, 64


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile_event.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    from transformers import DynamicCache

    from knormctl.config import PressConfig
    from knormctl.engine.compress import Compressor
    from knormctl.engine.kvbuffer import BufferLayer

    def fresh(seq: int) -> DynamicCache:
        cache = DynamicCache()
        cache.layers = [BufferLayer(seq) for _ in range(LAYERS)]  # as the engine's loop holds it
        for i in range(LAYERS):
            cache.update(torch.randn(1, HEADS, seq, DIM, device="cuda"),
                         torch.randn(1, HEADS, seq, DIM, device="cuda"), i)
        return cache

    def timed(fn, caches) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for c in caches:
            fn(c)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(caches)

    def floor(cache) -> None:
        for layer in cache.layers[1:]:
            layer.keys.clone()
            layer.values.clone()

    for seq in (1024, 4096):
        base = timed(floor, [fresh(seq) for _ in range(20)])
        for stacked in (False, True):
            comp = Compressor(PressConfig(press="knorm", keep_ratio=0.9, prune_after=512, skip_layers=(0,)), LAYERS,
                              budget_bytes=None if stacked else 0)
            cut = lambda c: comp.after_forward(c, prefill=True)  # noqa: E731
            timed(cut, [fresh(seq) for _ in range(5)])
            per = timed(cut, [fresh(seq) for _ in range(20)])
            cache = fresh(seq)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                cut(cache)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_us = sum(e.device_time for e in kernels)
            print(f"{seq} entries/layer, {'stacked  ' if stacked else 'per-layer'}: event {per * 1e3:.3f} ms, "
                  f"clone floor {base * 1e3:.3f} ms, ratio {per / base:.2f}, {len(kernels)} CUDA kernels, "
                  f"GPU busy {gpu_us / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
