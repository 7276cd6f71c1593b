"""Query-aware presses: they score the cached keys against (recomputed) queries.

SnapKV, TOVA and PyramidKV keep the post-RoPE queries of the last ``window_size`` tokens of
every layer they may cut (a window, not the prompt); ExpectedAttention keeps running
statistics of the pre-RoPE queries (mean and covariance per head). All follow kvpress 0.5.5's
arithmetic (``presses/snapkv_press.py`` etc.); the parity tests pin the kept sets to it.
In decode mode the window slides over the newest tokens and the statistics keep running.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from knormctl.engine.presses.base import BasePress, register


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """Softmax attention of the window's queries over every cached key.

    queries (b, H, w, d), post-RoPE, the queries of the last w cache entries; keys (b, kv, s, d);
    ``scaling`` the layer's softmax scale (default 1/sqrt(d), kvpress's always).
    Returns float32 weights (b, kv, H // kv, w, s): query heads grouped by the key head they
    read (GQA) rather than keys repeated per query head -- the same numbers, no copy.
    """
    b, heads, w, d = queries.shape
    kv, s = keys.shape[1], keys.shape[2]
    g = heads // kv
    q = queries.reshape(b, kv, g * w, d)
    logits = _scaled(torch.matmul(q, keys.transpose(-1, -2)).view(b, kv, g, w, s), d, scaling)
    # window query i sits at cache index s - w + i: it attends to keys up to there (causal)
    future = torch.ones(w, s, dtype=torch.bool, device=keys.device).triu(diagonal=s - w + 1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1, dtype=torch.float32)


def rope_at(rotary, like: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) of the model's rotary embedding at ``position_ids``, leaving the module as it
    was. ``dynamic_rope_update`` keeps state: a dynamic-NTK embedding replaces its frequencies
    when asked for a position beyond those seen, and a LongRoPE one copies its long factors into
    the same buffer (in place, so CUDA graphs see it). Positions a press only imagines would leave
    the model's RoPE changed for every later generation in the process (kvpress does): the
    buffers' objects and contents and the plain attributes are put back."""
    if not isinstance(rotary, torch.nn.Module):  # a plain function of positions holds no state
        return rotary(like, position_ids)
    buffers = {k: (v, None if v is None else v.clone()) for k, v in rotary._buffers.items()}
    attrs = {k: v for k, v in vars(rotary).items() if not k.startswith("_")}
    try:
        return rotary(like, position_ids)
    finally:
        for k in [k for k in rotary._buffers if k not in buffers]:
            del rotary._buffers[k]
        for k, (tensor, contents) in buffers.items():
            if tensor is not None and not torch.equal(tensor, contents):
                with torch.inference_mode():  # it may be an inference tensor (made in an earlier forward)
                    tensor.copy_(contents)  # the object the model (or a captured graph) holds
            rotary._buffers[k] = tensor
        for k in [k for k in vars(rotary) if not k.startswith("_") and k not in attrs]:
            delattr(rotary, k)
        for k, v in attrs.items():
            setattr(rotary, k, v)


def _scaled(logits: torch.Tensor, d: int, scaling: float | None, power: int = 1) -> torch.Tensor:
    """``logits`` times the softmax scale (to ``power``): divided by sqrt(d) as kvpress does where
    the layer's scale is 1/sqrt(d) (the same kept sets to the last bit), else times its own."""
    if scaling is None or math.isclose(scaling, d ** -0.5, rel_tol=1e-9):
        return logits / math.sqrt(d) if power == 1 else logits / d
    return logits * scaling ** power


def protect(scores: torch.Tensor, n: int, front: bool = False) -> torch.Tensor:
    """Add ``n`` entries at the end (or the front) scored above every other (kvpress: max + 1),
    so they are never evicted. No ``.item()``: no device-to-host sync on GPUs."""
    top = (scores.amax() + 1).expand(*scores.shape[:-1], n)
    return torch.cat([top, scores] if front else [scores, top], dim=-1)


class _WindowPress(BasePress):
    """Keeps, per observed layer, the post-RoPE queries of the newest ``window`` tokens."""

    observes = True
    stackable = False  # scores need the layer's own queries
    window = 1

    def __init__(self):
        self._queries: dict[int, torch.Tensor] = {}
        self._scaling: dict[int, float] = {}  # each layer's softmax scale

    def observe(self, layer) -> None:
        self._scaling[layer.layer_idx] = layer.scaling
        q = layer.queries(last=self.window)
        prev = self._queries.get(layer.layer_idx)
        if prev is not None and q.shape[-2] < self.window:  # decode: slide the window
            q = torch.cat([prev, q], dim=-2)[..., -self.window:, :]
        self._queries[layer.layer_idx] = q

    def reset(self) -> None:
        self._queries.clear()

    def _window(self, keys: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, int]:
        """The window's attention over the keys before it, and its width (never the whole cache:
        at least one entry is scored)."""
        q = self._queries[layer_idx]
        s = keys.shape[-2]
        w = max(1, min(q.shape[-2], s - 1))
        return window_attention(q[..., -w:, :], keys, self._scaling.get(layer_idx))[..., : s - w], w


@register
class SnapKVPress(_WindowPress):
    """SnapKV (Li et al., 2024): the attention the last ``window_size`` queries pay each key,
    averaged over the window, smoothed by a 1-D pooling of ``kernel_size``, averaged over the
    query heads that share a key head; the window itself is always kept."""

    name = "snapkv"
    description = "SnapKV (Li et al., 2024): attention from the last window of queries, pooled; the window is kept"

    def __init__(self, window_size: int = 64, kernel_size: int = 5):
        super().__init__()
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (same-length pooling), got {kernel_size}")
        self.window = self.window_size = window_size
        self.kernel_size = kernel_size

    def score(self, keys, values, layer_idx=None):
        attn, w = self._window(keys, layer_idx)  # (b, kv, g, w, s - w)
        b, kv, g, _, n = attn.shape
        scores = attn.mean(dim=-2).view(b, kv * g, n)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        scores = scores.view(b, kv, g, n).mean(dim=2)
        return protect(scores, w)


@register
class TOVAPress(_WindowPress):
    """TOVA (Oren et al., 2024): the attention the newest token pays each key, averaged over ALL
    heads (one ranking shared by the key heads); the newest entry is always kept."""

    name = "tova"
    description = "TOVA (Oren et al., 2024): attention from the newest query, averaged over all heads"

    def score(self, keys, values, layer_idx=None):
        attn, w = self._window(keys, layer_idx)  # (b, kv, g, 1, s - 1)
        kv = keys.shape[1]
        scores = attn.mean(dim=(1, 2, 3)).unsqueeze(1).expand(-1, kv, -1)
        return protect(scores, w)


@register
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al., 2024): SnapKV scores with per-layer budgets falling linearly from the
    first layer to the last (``beta`` sets the steepness); the total matches the uniform budget.
    Budget formula as kvpress's (from KVCache-Factory); where the pyramid does not fit (short
    prompts) every layer gets the uniform budget."""

    name = "pyramidkv"
    description = "PyramidKV (Cai et al., 2024): SnapKV scores, more entries kept in lower layers than in higher"
    modes = ("prefill",)  # the budgets are laid out for one prompt

    def __init__(self, window_size: int = 64, kernel_size: int = 5, beta: int = 20):
        super().__init__(window_size, kernel_size)
        if beta < 1:
            raise ValueError(f"beta must be >= 1, got {beta}")
        self.beta = beta

    def layer_keep(self, n_keep, length, layer_idx, num_layers, keep_ratio):
        w = self.window_size
        max_capacity = w + length * keep_ratio
        min_num = (max_capacity - w) / self.beta
        max_num = (max_capacity - w) * 2 - min_num
        if max_num >= length - w:
            max_num = length - w
            min_num = (max_capacity - w) * 2 - max_num
        if not (length >= max_num >= min_num >= w):
            return n_keep  # kvpress falls back to round(length * keep_ratio) here: see docs/presses.md
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(max_num - layer_idx * steps)


@register
class ExpectedAttentionPress(BasePress):
    """Expected Attention (Devoto et al., 2025): the attention the NEXT ``n_future_positions``
    queries are expected to pay each key, from the mean and covariance of the queries seen so
    far (before RoPE; the first ``n_sink`` left out) rotated by the average RoPE of those future
    positions; scores rescaled by the value norms; the first ``n_sink`` entries always kept."""

    name = "expected-attention"
    description = "Expected Attention (Devoto et al., 2025): expected attention of future queries, x value norm"
    observes = True
    stackable = False
    chunk = 4096  # queries recomputed this many tokens at a time: bounds the transient memory

    def __init__(self, n_future_positions: int = 512, n_sink: int = 4, use_covariance: bool = True,
                 use_vnorm: bool = True, epsilon: float = 0.0):
        if n_future_positions < 1:
            raise ValueError(f"n_future_positions must be >= 1, got {n_future_positions}")
        self.n_future_positions, self.n_sink = n_future_positions, n_sink
        self.use_covariance, self.use_vnorm, self.epsilon = use_covariance, use_vnorm, epsilon
        self._stats: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}  # count, mean, M2
        self._next: dict[int, int] = {}  # position of the next token
        self._layer: dict[int, tuple[float, bool]] = {}  # each layer's softmax scale, and whether it rotates
        self._rotary = None
        self._rope: tuple[int, torch.Tensor] | None = None  # (position, matrix): the same for every layer

    def reset(self) -> None:
        self._stats.clear()

    def observe(self, layer) -> None:
        from knormctl.engine.observe import prerope_queries

        if layer.rotary_emb is None:
            raise ValueError(f"{self.name}: the model has no rotary embedding to rotate future queries with")
        self._rotary = layer.rotary_emb
        self._layer[layer.layer_idx] = (layer.scaling, layer.rotates)
        h = layer.hidden_states
        n = h.shape[1]
        self._next[layer.layer_idx] = layer.start + n
        for a in range(max(0, self.n_sink - layer.start), n, self.chunk):
            q = prerope_queries(layer.module, h[:, a:a + self.chunk]).float()
            self._stats[layer.layer_idx] = self._merge(self._stats.get(layer.layer_idx), q)

    def _merge(self, stats, q: torch.Tensor):
        """Running mean and sum of squared deviations (Chan et al.), so chunks and decode steps
        add up to the statistics of all queries seen; one chunk gives kvpress's numbers."""
        m = q.shape[-2]
        mu = q.mean(dim=-2)
        m2 = None
        if self.use_covariance:
            c = q - mu.unsqueeze(-2)
            m2 = torch.einsum("bhsi,bhsj->bhij", c, c)
        if stats is None:
            return m, mu, m2
        n, mu0, m20 = stats
        delta = mu - mu0
        total = n + m
        mu_all = mu0 + delta * (m / total)
        if m2 is not None:
            m2 = m20 + m2 + torch.einsum("bhi,bhj->bhij", delta, delta) * (n * m / total)
        return total, mu_all, m2

    def _average_rope(self, pos: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """The mean rotation matrix of RoPE over positions pos .. pos + n_future_positions - 1:
        diag(mean cos) + diag(mean sin) @ rotate_half (kvpress averages the n matrices; the same)."""
        if self._rope is not None and self._rope[0] == pos:
            return self._rope[1]
        position_ids = torch.arange(pos, pos + self.n_future_positions, device=like.device).unsqueeze(0)
        cos, sin = rope_at(self._rotary, like, position_ids)
        cos, sin = cos[0].mean(dim=0), sin[0].mean(dim=0)  # (r,); r < d: partial rotary, the rest stays
        r = cos.shape[-1]
        perm = torch.zeros(r, r, device=cos.device, dtype=cos.dtype)  # rotate_half as a matrix
        perm[r // 2:, : r // 2], perm[: r // 2, r // 2:] = torch.eye(r // 2), -torch.eye(r // 2)
        rot = torch.eye(d, device=cos.device, dtype=cos.dtype)
        rot[:r, :r] = torch.diag(cos) + sin.unsqueeze(0) * perm
        self._rope = (pos, rot)
        return rot

    def score(self, keys, values, layer_idx=None):
        s = keys.shape[-2]
        if s <= self.n_sink:  # nothing but sinks: keep the newest (all tie)
            return torch.zeros(keys.shape[:-1], device=keys.device)
        if layer_idx not in self._stats:  # only sink tokens seen so far (a stream's first steps)
            return torch.zeros(keys.shape[:-1], device=keys.device)
        count, mu, m2 = self._stats[layer_idx]
        b, kv, _, d = keys.shape
        scale, rotates = self._layer.get(layer_idx, (None, True))
        # a layer without RoPE (NoPE): its future queries are its past ones, unrotated
        rot = self._average_rope(self._next[layer_idx], d, mu) if rotates else torch.eye(d, device=mu.device)
        mu = mu @ rot.T  # (b, H, d)
        g = mu.shape[1] // kv
        k = keys[:, :, self.n_sink:].float()
        # E[exp(s q.k)] for q ~ N(mu, cov): exp(s mu.k + s^2 k'cov k / 2); s = 1/sqrt(d): kvpress's
        logits = _scaled(torch.einsum("bkgd,bksd->bkgs", mu.view(b, kv, g, d), k), d, scale)
        if self.use_covariance:
            cov = rot @ (m2 / count) @ rot.T
            kc = torch.einsum("bksi,bkgij->bkgsj", k, cov.view(b, kv, g, d, d))
            logits = logits + _scaled((kc * k.unsqueeze(2)).sum(-1), d, scale, power=2) / 2
        scores = logits.softmax(dim=-1).mean(dim=2)  # (b, kv, s - n_sink)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, self.n_sink:].float().norm(dim=-1)
        return protect(scores, self.n_sink, front=True)
