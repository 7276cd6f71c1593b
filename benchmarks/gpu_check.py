"""One short GPU check of issue 6's and issue 10's targets, for a borrowed CUDA machine.

The machine has no internet and no smollm2 weights: the models are built from configs
with RANDOM weights (timing and memory do not depend on weight values; tokens and
quality mean nothing). Parts (a)-(d), per dtype (float32, bfloat16), on --model-dir's
config (< 4 minutes on an H200):
  (a) engine no-press TPOT / model.generate() TPOT          target <= 1.05
  (b) knorm keep_ratio 1.0 (prune_after 0) / no press      target <= 1.02
  (c) one compression event vs the clone() floor at 1024 and 4096 entries per layer
  (d) prefill mode keep_ratio 0.5 at a 4096-token prompt: TPOT and KV bytes vs the full
      cache (targets <= 0.75 and 0.50), torch.cuda.max_memory_allocated of both.
Part (e), needing no files (~1-2 minutes on an H100): the Llama-3.1-8B shape (32 layers,
8 KV heads, head_dim 128; random bf16 weights from a LlamaConfig) at a 32k-token prompt,
prefill keep 0.5: max_memory_allocated of the full cache vs knorm vs streaming, target
"compression never raises the peak" (issue 10).
Part (f), on the same model (benchmarks/gpu_targets.py): issue 16's targets -- the decode
step against the memory floor (kernels launched one by one, and replayed from a CUDA graph), the keep-0.5 step against the floor's ratio, the spread of
one configuration's rounds, and the peak with --prefill-chunk 4096. Part (g): the largest
batch within 70 GiB with and without compression, and its tokens/s (knormctl capacity).
Estimated on an H100 (not yet run on one): (e)+(f) about 3 minutes, (g) 3-5 (some 70 row
prefills of 32k tokens). A SIGTERM (gpu_session.sh's `timeout`) stops the part running and
still prints the summary of the parts that finished (exit 124); split them if time is short.

    python benchmarks/gpu_check.py --parts efg                          # the 8B-shape checks, no files needed
    python benchmarks/gpu_check.py --parts ef; python benchmarks/gpu_check.py --parts g   # the same, in two
    python benchmarks/gpu_check.py --parts efg --device cpu --quick     # dry run anywhere (a tiny shape)
    python benchmarks/gpu_check.py --model-dir DIR --text FILE          # all parts; DIR: config.json (+ tokenizer)
    python benchmarks/gpu_check.py --model-dir DIR --device cpu --quick # dry run anywhere (e: a tiny shape)
Prepare DIR from a machine that has the model: copy config.json, tokenizer.json and
tokenizer_config.json of knormctl's smollm2-135m folder (a few MB; not the weights).
"""

from __future__ import annotations

import gc
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import _common as c
from gpu_targets import prefill_press


def build_model(model_dir: Path, dtype: str, device: str):
    """The architecture from config.json, random weights, on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):  # initialise directly on the GPU: seconds, not a CPU init + copy
        model = AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype)).eval()
    return SimpleNamespace(model=model, num_layers=config.num_hidden_layers, resolved=f"{model_dir} (random weights)")


def prompt_ids(args, n: int) -> tuple[list[int], str]:
    """The first ``n`` tokens of --text, else seeded random ids (fine for timing)."""
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError) as e:
        c.log(f"no tokenizer in {args.model_dir} ({type(e).__name__}): random token ids")
    if tok is not None and args.text and Path(args.text).is_file():
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")[: n * 12]  # ~4 chars a token: ample
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n], f"{Path(args.text).name}"
        c.log(f"--text gives only {len(ids)} tokens, {n} needed: random token ids")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    rng = random.Random(args.seed)
    return [rng.randrange(vocab) for _ in range(n)], "random token ids"


def overhead(lm, ids, n, repeats, device):
    """(a) and (b), interleaved."""
    from knormctl.config import PressConfig
    from knormctl.engine.api import reference_generate
    from knormctl.engine.loop import run_generation

    def engine(cfg):
        def run():
            r = run_generation(lm.model, ids, cfg, n)
            return r.tpot_s, r.memory.bytes, r.token_ids
        return run

    def generate():
        c.cuda_peak_reset(device)
        r = reference_generate(lm.model, ids, n)
        return r["tpot_s"], c.cuda_peak(device), r["token_ids"]

    res = c.interleaved({"generate()": generate, "engine": engine(PressConfig().validate()),
                         "knorm 1.0": engine(PressConfig(press="knorm", keep_ratio=1.0, prune_after=0).validate())},
                        repeats)
    med = {k: c.median([t for t, _, _ in v]) for k, v in res.items()}
    peak = {k: max((p or 0) for _, p, _ in v) for k, v in res.items()}
    same = res["engine"][-1][2] == res["generate()"][-1][2]
    return med, peak, same


def pays(lm, ids, n, repeats):
    """(d): prefill-mode keep_ratio 0.5 against the full cache, every layer cut."""
    from knormctl.engine.loop import run_generation

    cfgs = {"full": prefill_press(), "knorm 0.5": prefill_press("knorm", 0.5)}
    res = c.interleaved({k: (lambda cfg=cfg: run_generation(lm.model, ids, cfg, n)) for k, cfg in cfgs.items()},
                        repeats)
    tpot = {k: c.median([r.tpot_s for r in v]) for k, v in res.items()}
    peak = {k: max((r.memory.bytes or 0) for r in v) for k, v in res.items()}

    def after_cut(r):  # entries right after the cut: the end state minus what decoding added
        return r.kv_entries_final - (r.new_tokens - 1) * lm.num_layers

    kv = after_cut(res["knorm 0.5"][-1]) / after_cut(res["full"][-1])
    return tpot, peak, kv


LLAMA_8B_SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0)  # Llama-3.1-8B's config.json (rope scaling left out: timing only)
TINY_SHAPE = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)


def build_8b(args):
    """(model, prompt ids, new tokens): the Llama-3.1-8B shape with random bf16 weights, built on
    the device (seconds, not a CPU init and a copy), and a random 32k-token prompt; --quick: a
    tiny shape and a 1024-token prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from knormctl.engine.capacity import weight_bytes

    shape, prompt, n = (TINY_SHAPE, 1024, 4) if args.quick else (LLAMA_8B_SHAPE, 32768, 8)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, shape["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(args.seed))
    c.log(f"{shape['num_hidden_layers']} layers, {prompt}-token prompt, weights {weight_bytes(model) / 2**30:.2f} GiB")
    return model, ids, n


ALLOCATOR_SLACK = 2 << 20  # bytes (e) allows above the full cache's peak


def peak_memory_8b(args, model, ids, n: int, repeats: int) -> list[list[str]]:
    """(e): max_memory_allocated per configuration (the worst of its rounds), full cache first."""
    import torch

    from knormctl.engine.capacity import weight_bytes
    from knormctl.engine.loop import run_generation

    prompt = ids.shape[1]
    weights = weight_bytes(model)
    cfgs = {"full cache": prefill_press(), "knorm 0.5": prefill_press("knorm", 0.5),
            "streaming 0.5": prefill_press("streaming", 0.5)}
    def measured(cfg):
        if args.device == "cuda":
            torch.cuda.empty_cache()  # every configuration from the same allocator state
        return run_generation(model, ids, cfg, n)

    res = c.interleaved({k: (lambda cfg=cfg: measured(cfg)) for k, cfg in cfgs.items()}, repeats)
    peak = {k: max(r.memory.bytes or 0 for r in v) for k, v in res.items()}
    kind = res["full cache"][0].memory.kind
    rows = []
    for k, v in res.items():
        over = peak[k] - peak["full cache"]
        rows.append([k, c.mib(peak[k]), c.mib(over) if k != "full cache" else "-",
                     c.mib(v[-1].kv_bytes_final), c.ms(c.median([r.tpot_s for r in v]), 2),
                     "-" if k == "full cache" else ("meets" if over <= ALLOCATOR_SLACK else "MISSES")])
    c.table(f"(e) peak memory, Llama-3.1-8B shape{' (--quick: a tiny shape)' if args.quick else ''}, "
            f"random bf16, {prompt}-token prompt, prefill keep 0.5, {n} new tokens",
            ["configuration", f"peak MiB ({kind})", "above full MiB", "KV final MiB", "TPOT ms",
             "never raises the peak"], rows,
            notes=[f"weights {c.mib(weights)} MiB; peak = the highest of {repeats} interleaved round(s)",
                   f"meets: at most {c.mib(ALLOCATOR_SLACK)} MiB above the full cache (the caching allocator "
                   "charges an unsplit block whole, up to 1 MiB past the request)",
                   "CPU peaks are the whole process's RSS high-water mark: indicative only"
                   if args.device == "cpu" else "torch.cuda.max_memory_allocated, reset per sample by the engine"])
    return [["bf16", f"(e) {k} peak - full cache peak (MiB)", r[2], r[5]] for k, r in zip(res, rows)
            if k != "full cache"]


def issue16_targets(args, model, ids) -> list[list[str]]:
    """(f): issue 16's decode-floor, repeatability and chunked-prefill targets (gpu_targets.py)."""
    import gpu_targets as g

    env = c.environment(args.device)
    n = 8 if args.quick else 64
    spec = g.spec_bandwidth(env.get("gpu_name")) if args.device == "cuda" else None
    rows = g.attention_kernels(args.device, 512 if args.quick else 16384, n, spec)
    rows += g.decode_floor(model, ids, n, args.repeats, args.device, env.get("gpu_name"))
    rows += g.chunked_peak(model, ids, 4 if args.quick else 8, 256 if args.quick else 4096)
    return rows


def capacity_targets(args, model, ids) -> list[list[str]]:
    """(g): issue 16's batch-capacity target at 70 GiB (--quick: 40 MiB of weights + KV on a tiny shape)."""
    import gpu_targets as g

    budget = (40 << 20) if args.quick else (70 << 30)
    return g.capacity(model, ids, budget, 128 if args.quick else 1024, 64 if args.quick else 256, args.device)


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=3)
    p.set_defaults(device="cuda")
    p.add_argument("--model-dir", type=Path, help="folder with config.json (+ tokenizer files); parts a-d")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--parts", default=None, help="which parts: abcd, e, f, g (default: all with --model-dir, else efg)")
    args = p.parse_args()
    parts = args.parts or ("abcdefg" if args.model_dir else "efg")
    if not parts or set(parts) - set("abcdefg"):  # a typo ran nothing and exited 0: a borrowed GPU's call wasted
        p.error(f"--parts {parts!r}: give letters among abcdefg (e.g. efg)")
    if set(parts) & set("abcd") and args.model_dir is None:
        raise SystemExit("parts a-d need --model-dir (a folder with the model's config.json)")
    args.text = None if args.text == c.DEFAULT_TEXT else args.text.removeprefix("text:")  # a plain file here
    short, long_, n, sizes, events = 512, 4096, 128, [1024, 4096], 50
    if args.quick:
        short, long_, n, sizes, events, args.repeats = 64, 256, 8, [128, 256], 5, 1

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        c.log("CUDA is not available here: falling back to --device cpu")
        args.device = "cpu"
    c.setup(args)
    t_start = time.perf_counter()
    summary: list[list[str]] = []  # rows appended as each part ends: printed even when stopped
    signal.signal(signal.SIGTERM, _stop)  # `timeout` in gpu_session.sh: keep what finished
    stopped = None
    try:
        run_parts(args, parts, summary, short, long_, n, sizes, events)
    except Stopped as exc:
        stopped = str(exc)
    c.table("summary (ratios from one run; random weights, timing only)", ["dtype", "check", "value", "target"],
            summary, notes=[f"total wall time {time.perf_counter() - t_start:.0f} s"]
            + ([f"STOPPED by {stopped}: the part running then, and any after it, are missing"] if stopped else []))
    if stopped:
        raise SystemExit(124)


class Stopped(BaseException):
    """SIGTERM (the session's `timeout`) while a part ran. A BaseException: the parts' own
    `except Exception` (a failed graph trial) must not swallow it."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run_parts(args, parts, summary, short, long_, n, sizes, events) -> None:
    """The asked parts, in order; each appends its verdict rows to ``summary`` when it ends."""
    import torch

    import compression_cost  # part (c) is compression_cost's part A, on random tensors
    if set(parts) & set("efg"):
        c.header("GPU check (e-g): the Llama-3.1-8B shape (random weights)", args, {
            "dtype": "bfloat16 (the 8B shape is always built in bfloat16; --dtypes is for parts a-d)",
            "weights": "RANDOM (built from a LlamaConfig): timing and memory only, tokens mean nothing",
            "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})
        model, ids, n_e = build_8b(args)
        if "e" in parts:
            summary += peak_memory_8b(args, model, ids, n_e, args.repeats)
        if "f" in parts:
            summary += issue16_targets(args, model, ids)
        if "g" in parts:
            summary += capacity_targets(args, model, ids)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if not set(parts) & set("abcd"):
        return
    ids_short, src = prompt_ids(args, long_)
    ids_long, ids_short = ids_short, ids_short[:short]
    dtypes = args.dtypes.split(",")
    c.header("GPU check (random weights, timing only)", args, {
        "weights": "RANDOM (built from config.json): timing and memory only, tokens mean nothing",
        "model config": str(args.model_dir), "prompt text": src, "dtype": ", ".join(dtypes),
        "sizes": f"(a,b) {short}-token prompt, (d) {long_}-token prompt, {n} new tokens; (c) {sizes} entries",
        "repeats": f"{args.repeats} interleaved rounds + 1 warm-up"})
    sync = c.sync_for(args.device)

    for dtype in dtypes:
        lm = build_model(args.model_dir, dtype, args.device)
        c.log(f"[{dtype}] (a)+(b)")
        med, peak, same = overhead(lm, ids_short, n, args.repeats, args.device)
        c.table(f"[{dtype}] (a) engine vs generate(), (b) knorm 1.0 vs no press ({short}-token prompt)",
                ["configuration", "TPOT ms", "max_memory_allocated MiB"],
                [[k, c.ms(v, 3), c.mib(peak[k]) if args.device == "cuda" else "-"] for k, v in med.items()],
                notes=[f"engine tokens == generate() tokens: {'yes' if same else 'NO (random weights: near-ties)'}"])
        r_a, r_b = c.ratio(med["engine"], med["generate()"]), c.ratio(med["knorm 1.0"], med["engine"])

        c.log(f"[{dtype}] (c)")
        with torch.inference_mode():
            rows = compression_cost.part_a(lm, sizes, lambda k: compression_cost.random_cache(lm, k), 0.9, events,
                                           sync)
        c.table(f"[{dtype}] (c) one compression event vs the clone() floor (random tensors, keep_ratio 0.9)",
                ["entries/layer", "layers", "K+V MiB", "floor ms", "knormctl ms", "original ms", "knormctl/floor",
                 "original/knormctl", "target"], rows)

        c.log(f"[{dtype}] (d)")
        tpot, peak_d, kv = pays(lm, ids_long, n, args.repeats)
        r_d = c.ratio(tpot["knorm 0.5"], tpot["full"])
        c.table(f"[{dtype}] (d) prefill mode keep_ratio 0.5, {long_}-token prompt",
                ["configuration", "TPOT ms", "max_memory_allocated MiB"],
                [[k, c.ms(v, 3), c.mib(peak_d[k]) if args.device == "cuda" else "-"] for k, v in tpot.items()])
        summary += [[dtype, "(a) engine / generate() TPOT", c.num(r_a), c.verdict(r_a, 1.05)],
                    [dtype, "(b) knorm 1.0 / no press TPOT", c.num(r_b), c.verdict(r_b, 1.02)]]
        summary += [[dtype, f"(c) event / floor at {r[0]}", r[6], r[8]] for r in rows]
        summary += [[dtype, "(d) knorm 0.5 / full TPOT", c.num(r_d), c.verdict(r_d, 0.75)],
                    [dtype, "(d) KV bytes after the cut / full", c.num(kv, 4),
                     "meets 0.50 +-1%" if abs(kv - 0.5) <= 0.005 else "MISSES 0.50 +-1%"]]
        lm = None  # free this dtype's model before building the next
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()



if __name__ == "__main__":
    main()
