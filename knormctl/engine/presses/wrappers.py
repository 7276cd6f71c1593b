"""Presses on top of another press (``base``, any registered press given as a spec):
AdaKV moves the budget between the heads of a layer, CriticalKV refines the base's scores
with the size of what each entry writes through the output projection."""

from __future__ import annotations

import torch

from knormctl.engine.presses.base import BasePress, register


class _Wrapper(BasePress):
    press_params = ("base",)
    stackable = False

    def __init__(self, base: BasePress):
        if not isinstance(base, BasePress):
            raise ValueError(f"base must be a press (e.g. snapkv), got {base!r}")
        if base.head_keep.__func__ is not BasePress.head_keep:
            raise ValueError(f"base {base.name!r} already sets per-head budgets")
        self.base = base
        self.observes = base.observes
        self.modes = tuple(m for m in type(self).modes if m in base.modes)

    def observe(self, layer) -> None:
        self.base.observe(layer)

    def reset(self) -> None:
        self.base.reset()

    def layer_keep(self, n_keep, length, layer_idx, num_layers, keep_ratio):
        return self.base.layer_keep(n_keep, length, layer_idx, num_layers, keep_ratio)


@register
class AdaKVPress(_Wrapper):
    """AdaKV (Feng et al., 2024): one budget per LAYER, shared out between its heads by the base
    press's scores (the layer's best ``heads x n_keep`` entries, whichever head holds them);
    each head keeps at least ``alpha_safeguard`` of the uniform budget.

    Heads then keep different counts: the cut holds every head at the largest count and masks
    the surplus out of attention (``engine/headmask.py``), so less memory is freed than the
    nominal ratio says -- the stored bytes are the bytes held.
    """

    name = "adakv"
    description = "AdaKV (Feng et al., 2024): a base press's scores, budget shared out between the heads"
    modes = ("prefill",)

    def __init__(self, base: str = "snapkv", alpha_safeguard: float = 0.2):
        super().__init__(base)
        if not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {alpha_safeguard}")
        self.alpha_safeguard = alpha_safeguard

    def score(self, keys, values, layer_idx=None):
        return self.base.score(keys, values, layer_idx)

    def head_keep(self, scores, n_keep):
        from knormctl.engine.compress import keep_indices

        b, h, s = scores.shape
        n_safe = int(n_keep * self.alpha_safeguard)
        if self.alpha_safeguard > 0:
            n_safe = max(1, n_safe)
        scores = scores.float().clone()
        scores.scatter_(-1, scores.topk(n_safe, dim=-1).indices, float("inf"))  # the safeguard
        kept = keep_indices(scores.reshape(b, h * s), h * n_keep)  # the layer's best, any head
        mask = torch.zeros(b, h * s, dtype=torch.bool, device=scores.device)
        return mask.scatter_(-1, kept, True).view(b, h, s)


@register
class CriticalKVPress(_Wrapper):
    """CriticalKV (Feng et al., 2025): keep the base press's top ``first_stage_ratio`` of the
    budget, rank the rest by base score x the L1 norm of each entry's value through the output
    projection (what it would add to the layer's output)."""

    name = "criticalkv"
    description = "CriticalKV (Feng et al., 2025): a base press's scores x |W_o v|_1, in two stages"
    observes = True  # for the output projection of each layer

    def __init__(self, base: str = "snapkv", epsilon: float = 1e-4, first_stage_ratio: float = 0.5,
                 keep_ratio: float = 1.0):
        super().__init__(base)
        if self.base.layer_keep.__func__ is not BasePress.layer_keep:
            # its first stage takes a share of the uniform budget (kvpress's CriticalKV sets one
            # budget for every layer): over PyramidKV's budgets it kept [48, 32, 16] entries
            # where kvpress keeps [32, 32, 32], the last layer all first stage
            raise ValueError(f"cannot refine {self.base.name!r}: its per-layer budgets and "
                             f"CriticalKV's uniform first stage do not mix (kvpress drops the per-layer "
                             f"budgets); use {self.base.name!r} alone, or criticalkv over snapkv")
        self.observes = True
        if not 0.0 <= first_stage_ratio <= 1.0:
            raise ValueError(f"first_stage_ratio must be in [0, 1], got {first_stage_ratio}")
        self.epsilon, self.first_stage_ratio, self.keep_ratio = epsilon, first_stage_ratio, keep_ratio
        self._modules: dict[int, torch.nn.Module] = {}

    def observe(self, layer) -> None:
        self._modules[layer.layer_idx] = layer.module
        if self.base.observes:
            self.base.observe(layer)

    def score(self, keys, values, layer_idx=None):
        scores = self.base.score(keys, values, layer_idx).float()
        s = keys.shape[-2]
        budget = int(self.keep_ratio * s * self.first_stage_ratio)
        if self.first_stage_ratio > 0:
            budget = max(1, budget)
        first = scores.topk(budget, dim=-1).indices
        scores = (scores + self.epsilon) * self._projected_norm(values, self._modules[layer_idx])
        return scores.scatter_(-1, first, torch.finfo(scores.dtype).max)

    @staticmethod
    @torch.no_grad()  # the weights require grad; the cut may run outside inference mode
    def _projected_norm(values: torch.Tensor, module) -> torch.Tensor:
        """|W_o^h v|_1 per entry, averaged over the query heads sharing a key head: (b, kv, s).
        Head by head, as kvpress does: never the (b, heads, s, hidden) product at once."""
        from knormctl.engine.observe import head_dim

        o_proj = getattr(module, "o_proj", None) or getattr(module, "dense", None)  # GPT-NeoX: dense
        if o_proj is None:
            raise ValueError(f"criticalkv: no output projection found on {type(module).__name__}")
        b, kv, s, _ = values.shape
        d, heads = head_dim(module), module.config.num_attention_heads
        with _weights_present(o_proj):
            wo = o_proj.weight.to(values.device).t().view(heads, d, -1)  # (heads, d, hidden)
            g = heads // kv
            norms = torch.stack([(values[:, h // g] @ wo[h]).float().abs().sum(-1) for h in range(heads)], dim=1)
        return norms.view(b, kv, g, s).mean(dim=2)


def _weights_present(module):
    """A context in which ``module``'s weights are real tensors: a layer accelerate offloads (to
    the CPU or disk, ``--device-map``) holds them on the meta device outside its forward."""
    import contextlib

    if all(p.device.type != "meta" for p in module.parameters()):
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)
