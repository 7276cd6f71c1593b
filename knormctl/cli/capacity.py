"""`knormctl capacity`: the largest batch that fits a memory budget, with and without compression."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from knormctl.cli import _common as o


def capacity(
    memory_budget: Annotated[str, typer.Option("--memory-budget", metavar="SIZE",
                                               help="Memory the generation may use, e.g. 70GiB, 80GB, 512MiB.")],
    context: Annotated[int, typer.Option("--context", metavar="N", help="Prompt tokens per sequence.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N",
                                                help="Tokens generated per sequence (>= 3).")] = 32,
    presses: o.PressesOpt = "knorm",
    keep_ratios: o.KeepRatiosOpt = "0.5",
    compress_mode: Annotated[str, typer.Option("--compress-mode", metavar="MODE",
                                               help="prefill (default) or decode.")] = "prefill",
    prefill_chunk: o.PrefillChunkOpt = 0,
    decode_step: o.DecodeStepOpt = "launched",
    prune_after: o.PruneAfterOpt = 0,
    skip_layers: o.SkipLayersOpt = "",
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="B", help="Largest batch tried.")] = 256,
    random_ids: Annotated[bool, typer.Option("--random-ids", help="Random token ids instead of the embedded "
                                                                  "text (shapes only).")] = False,
    seed: o.SeedOpt = 0,
    model: o.ModelOpt = "smollm2-135m",
    device: o.DeviceOpt = "auto",
    device_map: o.DeviceMapOpt = None,
    dtype: o.DtypeOpt = "float32",
    threads: o.ThreadsOpt = None,
    trust_remote_code: o.TrustOpt = False,
    fmt: Annotated[str, typer.Option("--format", metavar="FMT", help="table or json.")] = "table",
) -> None:
    """Find the largest batch that fits a memory budget, with and without compression, and its tokens/s.

    At --context prompt tokens, within --memory-budget; tokens/s = batch / the median decode step after the first (which carries the cut). Every probe is a real generation of that batch; every configuration is prefilled alike (--prefill-chunk N: N tokens at a time, the press cutting after each chunk; without it a press cannot lower the prefill's peak). Memory: on CUDA the peak allocated, an out-of-memory error meaning "does not fit"; on CPU the weights plus the KV cache held (activations not counted). Prints only: nothing is stored in the results database.
    """
    from knormctl.config import RunConfig
    from knormctl.engine.capacity import MIN_NEW_TOKENS, check_batchable, parse_memory
    from knormctl.errors import UsageError
    from knormctl.options import parse_float_list, parse_int_list
    from knormctl.press_spec import parse_press_list

    with o.error_boundary():
        if fmt not in ("table", "json"):
            raise UsageError(f"--format must be table or json, got {fmt!r}")
        budget = parse_memory(memory_budget)
        for flag, value, least in (("--context", context, 1), ("--max-new-tokens", max_new_tokens, MIN_NEW_TOKENS),
                                   ("--max-batch", max_batch, 1)):
            if value < least:
                raise UsageError(f"{flag} must be >= {least}, got {value}")
        cfg = RunConfig(command="sweep", model=model, dtype=dtype, device=device, device_map=device_map,
                        threads=threads, seed=seed,
                        trust_remote_code=trust_remote_code, presses=parse_press_list(presses),
                        keep_ratios=parse_float_list(keep_ratios, "--keep-ratios"), compress_mode=compress_mode,
                        prefill_chunk=prefill_chunk, decode_step=decode_step, prune_after=prune_after,
                        max_new_tokens=max_new_tokens,
                        skip_layers=parse_int_list(skip_layers, "--skip-layers", allow_empty=True)).validate()
        configs = cfg.press_configs()
        check_batchable(configs)
        result = _run(cfg, configs, context, budget, max_batch, random_ids)
    if fmt == "json":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from knormctl.render.capacity import capacity_table
    from knormctl.render.format import fmt_bytes
    from knormctl.render.tables import make_console

    console = make_console()
    console.width = min(console.width, 80)  # the table is laid out for 80 columns
    title = (f"{result['model']} on {result['device']}, context {context} + {max_new_tokens} new tokens, "
             f"budget {fmt_bytes(budget)}")
    console.print(capacity_table(result["results"], title=title))
    capped = any(r["capped"] for r in result["results"])
    console.print(f"memory: {result['memory_kind']}"
                  + ("; + after a batch: --max-batch reached, more may fit" if capped else ""))
    for r in result["results"]:
        if r["largest_batch"] == 0:  # say why, not just 0 and n/a
            one = next((p for p in r["probes"] if p["batch"] == 1), None)
            need = f" (it needed {fmt_bytes(one['peak_bytes'])})" if one and one["peak_bytes"] else ""
            why = f": {one['error']}" if one and one.get("error") and not need else ""
            console.print(f"{r['config']}: not even batch 1 fits in {fmt_bytes(budget)}{need}{why}")
    for note in result["notes"]:
        console.print(f"note: {note}")


def capacity_notes(configs, prefill_chunk: int) -> list[str]:
    """Why compression may not raise the batch here: said, so that x1.00 is not read as the press's."""
    compressed = [c for c in configs if not c.is_baseline and c.keep_ratio < 1.0]
    notes = []
    if compressed and not prefill_chunk:
        notes.append("a press that cuts after a whole prefill cannot lower the peak (the prefill holds the full "
                     "cache); --prefill-chunk N bounds it")
    decode = sorted({c.spec for c in compressed if c.mode == "decode"})
    if decode:
        notes.append(f"decode mode ({', '.join(decode)}) keeps a cache buffer of the full prompt's size (only "
                     "prefill mode sizes it to the budget and a chunk), so it cannot raise the batch here; "
                     "--compress-mode prefill can")
    return notes


def _run(cfg, configs, context: int, budget: int, max_batch: int, random_ids: bool) -> dict:
    import torch

    from knormctl.engine.capacity import capacity_table, weight_bytes
    from knormctl.engine.models import load_model
    from knormctl.engine.text import make_samples
    from knormctl.errors import UsageError
    from knormctl.engine.support import check_model
    from knormctl.cli._execute import Log

    log = Log()  # stamped lines on stderr, as a sweep's
    import transformers

    transformers.logging.disable_progress_bar()  # progress lines go to stderr, one per step
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                    progress=log, device_map=cfg.device_map)
    check_model(lm.model, configs, skip_layers=cfg.skip_layers, decode_step=cfg.decode_step, device=lm.device)
    weights = weight_bytes(lm.model)
    if weights >= budget:  # nothing can fit: say so before a single probe
        from knormctl.render.format import fmt_bytes

        raise UsageError(f"--memory-budget {fmt_bytes(budget)} is below the model's weights alone "
                         f"({fmt_bytes(weights)} in {lm.dtype}): no batch can fit")
    if lm.max_positions is not None and context + cfg.max_new_tokens > lm.max_positions:
        raise UsageError(f"--context {context} + --max-new-tokens {cfg.max_new_tokens} exceed the model's "
                         f"context ({lm.max_positions} tokens)")
    if random_ids:
        vocab = len(lm.tokenizer) if lm.tokenizer is not None else lm.model.config.vocab_size
        prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    else:
        try:
            prompt = make_samples(cfg.pg19_source, 1, lm.tokenizer, context, 0, cfg.seed, progress=log)[0].prompt_ids
        except UsageError as exc:  # its way out ("fewer or shorter samples") is not capacity's
            if "cannot fill the request" not in str(exc):
                raise
            raise UsageError(f"--context {context}: no document of {cfg.pg19_source!r} is that long; use "
                             "--random-ids (memory and time do not depend on the tokens) or a shorter "
                             "--context") from None
    rows = capacity_table(lm.model, prompt, configs, new_tokens=cfg.max_new_tokens, budget=budget,
                          max_batch=max_batch, prefill_chunk=cfg.prefill_chunk,
                          decode_step=cfg.decode_step, progress=log)
    return {"model": cfg.model, "device": lm.device, "dtype": lm.dtype, "context": context,
            "max_new_tokens": cfg.max_new_tokens, "memory_budget_bytes": budget, "weight_bytes": weights,
            "memory_kind": rows[0]["memory_kind"], "prefill_chunk": cfg.prefill_chunk,
            "decode_step": cfg.decode_step, "prompt": "random ids" if random_ids
            else cfg.pg19_source, "results": rows, "notes": capacity_notes(configs, cfg.prefill_chunk)}
