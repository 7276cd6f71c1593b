"""Whether the loaded model can run a run's configurations, each refusal one line (UsageError)
before a run row exists: the runner and ``capacity`` ask the same questions."""

from __future__ import annotations

from knormctl.errors import UsageError


def check_model(model, configs, *, skip_layers, decode_step: str, device: str) -> None:
    """The presses' needs (recomputable queries, kvpress's hook), the cut (sliding windows, ALiBi,
    shared KV; layers of different lengths under ``skip_layers``), that the model uses the cache
    it is given, and the decode step (a CUDA graph on CUDA; a static step needs the attention
    modules where knormctl finds them)."""
    from knormctl.engine.kvcache import check_cut_supported, probe_cache, probe_uneven_layers
    from knormctl.engine.observe import attention_modules
    from knormctl.engine.presses import check_model_support
    from knormctl.options import check_loaded_decode_step

    check_model_support(model, configs)
    if any(not pc.is_baseline and pc.keep_ratio < 1.0 for pc in configs):
        check_cut_supported(model)  # sliding-window / shared-KV / ALiBi families: one clear line
        probe_uneven_layers(model, skip_layers)
    probe_cache(model)  # a transformers version that ignores our cache fails here, not mid-run
    check_loaded_decode_step(decode_step, device)
    if decode_step != "launched":
        try:
            attention_modules(model)
        except ValueError as exc:
            raise UsageError(f"--decode-step {decode_step}: {exc} (use --decode-step launched)") from None
        check_static_layers(model, decode_step)


def check_static_layers(model, decode_step: str) -> None:
    """The static step reads knormctl's own buffers; transformers' other cache layers (sliding
    windows) stay its own, and every step would quietly run launched under a 'static' label."""
    from knormctl.engine.kvbuffer import BufferLayer
    from knormctl.engine.kvcache import new_cache

    layers = new_cache(model).layers
    other = [i for i, layer in enumerate(layers) if not isinstance(layer, BufferLayer)]
    if other:
        kind = type(layers[other[0]]).__name__
        shown = ",".join(map(str, other[:8])) + ("..." if len(other) > 8 else "")
        raise UsageError(f"--decode-step {decode_step}: layers {shown} of {len(layers)} keep "
                         f"transformers' own {kind} (sliding-window attention), which the static step cannot read; "
                         "use --decode-step launched")
