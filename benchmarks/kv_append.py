"""In-place KV buffer vs transformers' DynamicCache (issue 16 item 1, the CPU target), one run.

1. Appending one decode step's entries to every layer at a given cache length, nothing else:
   DynamicCache's torch.cat copies the whole cache (time grows with the length); the
   buffer writes one slot per layer (time flat in the length). The model's own layer shapes.
2. Whole generations with the engine both ways (kv_buffer=True / False), interleaved:
   TPOT, the step-time growth over the decode (last quarter of the steps / first quarter),
   and the greedy tokens of both paths compared.

    python benchmarks/kv_append.py
    python benchmarks/kv_append.py --quick
"""

from __future__ import annotations

import _common as c


def append_cost(layers: int, kv_heads: int, head_dim: int, length: int, dtype, steps: int, buffered: bool):
    """A callable timing ``steps`` one-token appends to ``layers`` layers already ``length`` long;
    returns seconds per step (all layers)."""
    import time

    import torch
    from transformers.cache_utils import DynamicLayer

    from knormctl.engine.kvbuffer import BufferLayer

    prefix = torch.randn(1, kv_heads, length, head_dim, dtype=dtype)
    one = torch.randn(1, kv_heads, 1, head_dim, dtype=dtype)

    def run() -> float:
        cache = [BufferLayer(capacity=length + steps) if buffered else DynamicLayer() for _ in range(layers)]
        for layer in cache:
            layer.update(prefix, prefix)
        t0 = time.perf_counter()
        for _ in range(steps):
            for layer in cache:
                layer.update(one, one)
        return (time.perf_counter() - t0) / steps

    return run


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--lengths", default="512,2048,8192,32768", help="cache lengths for part 1")
    p.add_argument("--append-steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.lengths, args.append_steps, args.prompt_tokens, args.new_tokens, args.repeats = "256,1024", 4, 64, 16, 1
    c.setup(args)

    import torch

    from knormctl.config import PressConfig
    from knormctl.engine.loop import run_generation

    lm = c.load(args)
    tcfg = lm.model.config.get_text_config(decoder=True)
    layers, kv_heads = tcfg.num_hidden_layers, tcfg.num_key_value_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    dtype = getattr(torch, args.dtype)
    sample = c.prompts(args, lm.tokenizer, 1, args.prompt_tokens)[0]
    ids, n = sample.prompt_ids, args.new_tokens
    lengths = [int(x) for x in args.lengths.split(",")]
    c.header("KV append: in-place buffer vs DynamicCache", args, {
        "model": f"{lm.resolved} ({layers} layers, {kv_heads} KV heads, head_dim {head_dim})",
        "part 1": f"{args.append_steps} one-token appends to every layer at lengths {lengths}",
        "part 2": f"{len(ids)}-token prompt ({sample.doc_id}), {n} new tokens",
        "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})

    # --- part 1: the append alone
    configs = {}
    for length in lengths:
        for buffered in (False, True):
            name = f"{length} {'buffer' if buffered else 'DynamicCache'}"
            configs[name] = append_cost(layers, kv_heads, head_dim, length, dtype, args.append_steps, buffered)
    res = c.interleaved(configs, args.repeats)
    rows = []
    for length in lengths:
        cat, buf = c.median(res[f"{length} DynamicCache"]), c.median(res[f"{length} buffer"])
        per_layer = 2 * kv_heads * length * head_dim * dtype.itemsize * layers
        rows.append([length, c.mib(per_layer), f"{cat * 1e6:.0f}", f"{buf * 1e6:.0f}", c.num(cat / buf, 1)])
    c.table("one decode step's cache appends, all layers (median us per step)",
            ["cache length", "KV MiB", "DynamicCache (cat)", "buffer (in place)", "cat / buffer"], rows,
            notes=["the buffer's time is flat in the length: no per-step copy of the cache"])

    # --- part 2: whole generations
    def engine(cfg, buffered):
        def run():
            r = run_generation(lm.model, ids, cfg, n, kv_buffer=buffered)
            steps = r.step_latencies_s
            q = max(1, len(steps) // 4)
            return {"tpot": r.tpot_s, "growth": c.median(steps[-q:]) / c.median(steps[:q]), "tokens": r.token_ids}
        return run

    full = PressConfig().validate()
    knorm = PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill").validate()
    gens = {"full, DynamicCache": engine(full, False), "full, buffer": engine(full, True),
            "knorm 0.5 prefill, DynamicCache": engine(knorm, False), "knorm 0.5 prefill, buffer": engine(knorm, True)}
    res = c.interleaved(gens, args.repeats)
    rows = [[k, c.ms(c.median([r["tpot"] for r in v])), c.num(c.median([r["growth"] for r in v]))]
            for k, v in res.items()]
    c.table("generations (medians over rounds)", ["configuration", "TPOT ms", "last/first quarter step"], rows,
            notes=["last/first quarter: median step time of the last quarter of the decode over the first's"])
    checks = []
    for what in ("full", "knorm 0.5 prefill"):
        a = [r["tpot"] for r in res[f"{what}, buffer"]]
        b = [r["tpot"] for r in res[f"{what}, DynamicCache"]]
        pr = c.paired_ratios(a, b)
        mm = c.first_mismatch(res[f"{what}, buffer"][-1]["tokens"], res[f"{what}, DynamicCache"][-1]["tokens"])
        checks.append([f"{what}: buffer / DynamicCache TPOT", c.num(c.ratio(c.median(a), c.median(b))),
                       c.spread(pr), "yes" if mm is None else f"NO (first at {mm})"])
    c.table("buffer vs DynamicCache (same run)", ["check", "ratio of medians", "paired min-max", "tokens identical"],
            checks)


if __name__ == "__main__":
    main()
