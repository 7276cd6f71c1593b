"""Where one compression event's time goes on CUDA: kernels launched and the top ops.

    python benchmarks/gpu_profile_event.py      # from the repository root, on a CUDA machine
30 layers x 3 KV heads x 64 dims (SmolLM2-135M's cache shape), random tensors, layer 0
skipped, keep_ratio 0.9; compares with a clone() of the same layers (the floor).
"""
import sys, time, torch
sys.path.insert(0, ".")
from transformers import DynamicCache
from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor

dev = "cuda"
L, H, D = 30, 3, 64
for S in (1024, 4096):
    def fresh():
        c = DynamicCache()
        for i in range(L):
            c.update(torch.randn(1, H, S, D, device=dev), torch.randn(1, H, S, D, device=dev), i)
        return c
    comp = Compressor(PressConfig(press="knorm", keep_ratio=0.9, prune_after=512, skip_layers=(0,)), L)
    for _ in range(5):
        comp.after_forward(fresh(), prefill=True)
    caches = [fresh() for _ in range(20)]
    torch.cuda.synchronize(); t = time.perf_counter()
    for c in caches:
        comp.after_forward(c, prefill=True)
    torch.cuda.synchronize(); per = (time.perf_counter() - t) / 20
    c2 = [fresh() for _ in range(20)]
    torch.cuda.synchronize(); t = time.perf_counter()
    for c in c2:
        for layer in c.layers[1:]:
            layer.keys.clone(); layer.values.clone()
    torch.cuda.synchronize(); floor = (time.perf_counter() - t) / 20
    c = fresh()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        comp.after_forward(c, prefill=True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"S={S}: event {per*1e3:.3f} ms, clone floor {floor*1e3:.3f} ms, ratio {per/floor:.2f}, CUDA kernels in one event: {len(kernels)}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
