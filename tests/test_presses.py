"""Each press keeps the right set on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from knormctl.config import PRESS_NAMES, PressConfig
from knormctl.engine.compress import Compressor, keep_indices
from knormctl.engine.presses import PRESSES, make_press
from knormctl.errors import UsageError


def _keys_with_norms(norms):
    """(1, 1, S, 4) keys whose L2 norms are exactly ``norms``."""
    k = torch.zeros(1, 1, len(norms), 4)
    k[0, 0, :, 0] = torch.tensor(norms, dtype=torch.float32)
    return k


def _kept(press_name, norms, n_keep, keep_recent=0, **kw):
    press = make_press(press_name, **kw)
    keys = _keys_with_norms(norms)
    return keep_indices(press.score(keys, keys.clone()), n_keep, keep_recent)[0, 0].tolist()


NORMS = [5.0, 1.0, 4.0, 2.0, 9.0, 3.0, 8.0, 0.5]


def test_knorm_keeps_lowest_norms_in_order():
    assert _kept("knorm", NORMS, 4) == [1, 3, 5, 7]


def test_knorm_inverse_keeps_highest_norms():
    assert _kept("knorm-inverse", NORMS, 3) == [0, 4, 6]


def test_streaming_keeps_sinks_and_recent_window():
    assert _kept("streaming", list(range(20)), 7, n_sink=4) == [0, 1, 2, 3, 17, 18, 19]
    assert _kept("streaming", list(range(20)), 3, n_sink=0) == [17, 18, 19]


def test_random_is_seeded_and_of_the_right_size():
    a = _kept("random", NORMS * 4, 10, seed=1)
    b = _kept("random", NORMS * 4, 10, seed=1)
    c = _kept("random", NORMS * 4, 10, seed=2)
    assert a == b and a != c
    assert len(set(a)) == 10 and a == sorted(a)


def test_keep_recent_protects_the_newest_entries():
    # the newest entry has the highest norm; knorm alone would drop it
    assert 7 not in _kept("knorm", [1, 2, 3, 4, 5, 6, 7, 99.0], 4)
    assert _kept("knorm", [1, 2, 3, 4, 5, 6, 7, 99.0], 4, keep_recent=2) == [0, 1, 6, 7]


def test_random_press_in_the_cache_is_reproducible():
    def run(seed):
        cache = DynamicCache()
        g = torch.Generator().manual_seed(0)
        cache.update(torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), 0)
        Compressor(PressConfig(press="random", keep_ratio=0.5, prune_after=0, skip_layers=(), seed=seed,
                               mode="prefill"), 1).after_forward(cache, prefill=True)
        return cache.layers[0].keys
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_registry_and_unknown_press():
    assert set(PRESSES) == {"none", "knorm", "knorm-inverse", "random", "streaming"}
    assert set(PRESSES) == set(PRESS_NAMES), "config.PRESS_NAMES (torch-free, for the CLI) follows the registry"
    assert make_press("none") is None
    with pytest.raises(UsageError, match="unknown press"):
        make_press("h2o")


def test_ties_at_the_boundary_keep_the_most_recent_entries():
    assert _kept("knorm", [1.0, 2.0, 2.0, 2.0, 3.0, 0.5], 3) == [0, 3, 5]
    assert _kept("knorm", [2.0] * 6, 2) == [4, 5]
