"""The arithmetic of the query-aware presses against hand-written references,
in the main venv (their kept sets are otherwise pinned only by the kvpress parity tests, which
need kvpress). Small tensors, no model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from knormctl.engine.presses import make_press
from knormctl.engine.presses.attention import window_attention


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference_window_attention(q, k):
    """(b, H, w, d), (b, kv, s, d) -> (b, kv, g, w, s): query i of the window sits at index s - w + i
    and sees keys 0 .. s - w + i, nothing later."""
    b, heads, w, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = heads // kv
    out = torch.zeros(b, kv, g, w, s)
    for h in range(heads):
        for i in range(w):
            last = s - w + i
            logits = k[0, h // g, : last + 1] @ q[0, h, i] / math.sqrt(d)
            out[0, h // g, h % g, i, : last + 1] = logits.softmax(-1)
    return out


def test_window_attention_is_causal_for_every_window_query():
    q, k = _rand(1, 4, 3, 8, seed=1), _rand(1, 2, 10, 8, seed=2)
    torch.testing.assert_close(window_attention(q, k), _reference_window_attention(q, k))


def test_snapkv_scores_are_window_mean_pooled_then_head_mean_and_the_window_is_kept():
    press = make_press("snapkv", params={"window_size": 3, "kernel_size": 3})
    q, keys = _rand(1, 4, 3, 8, seed=3), _rand(1, 2, 12, 8, seed=4)
    press._queries[0] = q
    scores = press.score(keys, keys.clone(), 0)
    attn = _reference_window_attention(q, keys)[..., :9].mean(dim=-2)  # (1, kv, g, 9): mean over the window
    padded = torch.nn.functional.pad(attn, (1, 1))  # zero padding: avg_pool1d counts the pad
    pooled = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3
    expected = pooled.mean(dim=2)  # query heads sharing a key head
    assert scores.shape == (1, 2, 12)
    torch.testing.assert_close(scores[..., :9], expected)
    assert (scores[..., 9:] > scores[..., :9].max()).all()  # the window is protected


def test_tova_ranks_by_the_newest_query_averaged_over_all_heads_shared_by_key_heads():
    press = make_press("tova")
    q, keys = _rand(1, 4, 1, 8, seed=5), _rand(1, 2, 10, 8, seed=6)
    press._queries[0] = q
    scores = press.score(keys, keys.clone(), 0)
    expected = _reference_window_attention(q, keys)[0, :, :, 0, :9].mean(dim=(0, 1))  # all 4 heads
    torch.testing.assert_close(scores[0, 0, :9], expected)
    torch.testing.assert_close(scores[0, 1, :9], expected)  # one ranking for both key heads


def test_criticalkv_projected_norm_is_the_l1_of_w_o_v_averaged_over_the_query_heads_of_a_key_head():
    from knormctl.engine.presses.wrappers import CriticalKVPress

    heads, kv, d, hidden, s = 4, 2, 3, 5, 6
    o_proj = torch.nn.Linear(heads * d, hidden, bias=False)
    with torch.no_grad():
        o_proj.weight.copy_(_rand(hidden, heads * d, seed=7))
    module = SimpleNamespace(o_proj=o_proj, head_dim=d, config=SimpleNamespace(num_attention_heads=heads))
    values = _rand(1, kv, s, d, seed=8)
    got = CriticalKVPress._projected_norm(values, module)
    g = heads // kv
    per_head = [(values[0, h // g] @ o_proj.weight[:, h * d:(h + 1) * d].T).abs().sum(-1) for h in range(heads)]
    expected = torch.stack([(per_head[2 * j] + per_head[2 * j + 1]) / 2 for j in range(kv)]).unsqueeze(0)
    torch.testing.assert_close(got, expected)


def test_expected_attention_adds_half_the_quadratic_covariance_term():
    """score = softmax_s(mu.k / sqrt(d) + k^T Sigma k / (2 d)), averaged over the query heads of a key
    head (here: RoPE an identity, no value norms, no sinks)."""
    d, heads, kv, s = 4, 2, 1, 7
    press = make_press("expected-attention", params={"n_sink": 0, "use_vnorm": False, "n_future_positions": 2})
    mu = _rand(1, heads, d, seed=9)
    a = _rand(1, heads, d, d, seed=10)
    m2 = a @ a.transpose(-1, -2) * 5  # a covariance large enough to matter
    count = 10
    press._stats[0] = (count, mu, m2)
    press._next[0] = 100
    press._rotary = lambda like, pos: (torch.ones(1, pos.shape[1], d), torch.zeros(1, pos.shape[1], d))
    keys = _rand(1, kv, s, d, seed=11)
    scores = press.score(keys, keys.clone(), 0)
    cov = m2 / count
    expected = []
    for h in range(heads):
        logits = torch.stack([mu[0, h] @ keys[0, 0, j] / math.sqrt(d) + keys[0, 0, j] @ cov[0, h] @ keys[0, 0, j] / (2 * d)
                              for j in range(s)])
        expected.append(logits.softmax(-1))
    torch.testing.assert_close(scores[0, 0], torch.stack(expected).mean(0))


def test_criticalkv_first_stage_keeps_the_bases_best_whatever_their_value_norms():
    """The base press's top first_stage_ratio x keep_ratio x s entries are scored above every other
    (stage one), whatever |W_o v| says; the rest are ranked by base score x |W_o v|."""
    heads, kv, d, hidden, s = 2, 1, 4, 6, 8
    press = make_press("criticalkv", keep_ratio=0.5, params={"base": "knorm"})  # budget int(0.5 * 8 * 0.5) = 2
    o_proj = torch.nn.Linear(heads * d, hidden, bias=False)
    press._modules[0] = SimpleNamespace(o_proj=o_proj, head_dim=d, config=SimpleNamespace(num_attention_heads=heads))
    keys = torch.zeros(1, kv, s, d)
    keys[0, 0, :, 0] = torch.tensor([5.0, 0.1, 4.0, 3.0, 0.2, 6.0, 7.0, 2.0])  # knorm's best: 1 and 4
    values = torch.ones(1, kv, s, d)
    values[0, 0, 1] = values[0, 0, 4] = 0.0  # nothing written through W_o: stage two alone would drop them
    scores = press.score(keys, values, 0)
    top = torch.finfo(scores.dtype).max
    assert (scores[0, 0] == top).nonzero().flatten().tolist() == [1, 4]


def test_pyramidkv_falls_back_to_the_uniform_budget_where_the_pyramid_would_dip_below_the_window():
    press = make_press("pyramidkv", params={"window_size": 4})
    # length 60, keep 0.25: max_num 29.25, min_num 0.75 < window 4 -> every layer the uniform 15
    assert [press.layer_keep(15, 60, i, 3, 0.25) for i in range(3)] == [15, 15, 15]
    # keep 0.5: the pyramid fits (min_num 4 = the window): budgets fall from layer 0 to the last
    budgets = [press.layer_keep(30, 60, i, 3, 0.5) for i in range(3)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 30 > budgets[-1]
