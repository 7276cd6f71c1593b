"""The engine: a library that knows no database and no CLI.

models.py  load a causal LM (Hub id, folder, .gguf, or the offline smollm2-135m alias)
text.py    text sources and deterministic sample selection
presses/   eviction policies (one scoring method each, a registry; kvpress as an optional backend)
compress.py the cut (selection, per-layer budgets); headmask.py per-head budgets; observe.py the
           pre-hooks through which query-aware presses see each attention layer's input
loop.py    the one generation loop (prefill + one token per step), timed
quality.py perplexity (context, and under the compressed cache)
timing.py  latency statistics, memory probes
env.py     the device/software environment as a flat dict
"""
