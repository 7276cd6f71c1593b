"""What a batch of B equal-length prompts needs beyond batch 1 (issue 16 item 3).

The loop runs B rows through one cache: every tensor is (B, ...), and the presses already
score (b, h, s) and the cut selects per (b, h) row, so rows with the same length keep the same
count and the cache stays one length. What is per ROW here:

- the ids: a (B, S) tensor or B equal-length lists (``as_batch_ids``); no padding, ever --
  a padded row would attend to (or be scored against) entries another row does not have;
- the seeds: row j draws what it would draw alone with ``seeds[j]`` -- sampling
  (``RowPicker``: one generator per row) and the seeded presses (``row_press``: one press
  per row for a press built from a seed, e.g. random);
- what cannot batch is refused with one line (``batch_refusal``).

So row j of a batch is the generation of prompt j alone, up to the float rounding of a
batched matmul (tests/test_batch.py compares tokens and kept entries row by row).
"""

from __future__ import annotations

import inspect

import torch

from knormctl.engine.presses.base import BasePress
from knormctl.errors import UsageError


def as_batch_ids(input_ids, device: torch.device, what: str = "input_ids") -> torch.Tensor:
    """(B, S) long ids on ``device`` from a (S,) / (B, S) tensor, a flat list of ints (one
    sequence) or a list of B equal-length lists. Rows of different lengths are refused:
    a batch has no padding."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        lengths = sorted({len(r) for r in input_ids})
        if len(lengths) > 1:
            raise UsageError(f"the rows of {what} differ in length ({', '.join(map(str, lengths))} tokens): "
                             "a batch runs equal-length prompts only (no padding)")
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise UsageError(f"{what} must be one sequence or a (batch, length) block, got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise UsageError(f"{what} is empty")
    return ids


def question_block(question_ids, batch: int, device: torch.device) -> torch.Tensor | None:
    """The question ids as (B, Q): one sequence is every row's question; B rows must be equal
    in length (one forward feeds them all)."""
    if question_ids is None or len(question_ids) == 0:
        return None
    q = as_batch_ids(question_ids, device, what="question_ids")
    if q.shape[0] == 1 and batch > 1:
        return q.expand(batch, -1)
    if q.shape[0] != batch:
        raise UsageError(f"question_ids has {q.shape[0]} rows for a batch of {batch}")
    return q


def row_seeds(seed, batch: int) -> list[int]:
    """One seed per row: an int is every row's seed; a sequence must have one per row."""
    if isinstance(seed, int):
        return [seed] * batch
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise UsageError(f"{len(seeds)} seed(s) for a batch of {batch}: give one per row (or one int)")
    return seeds


class RowPicker:
    """Greedy by default (argmax per row: no draws); seeded multinomial sampling when asked,
    one generator per row so row j draws what it draws alone with its seed."""

    def __init__(self, sampling: bool, temperature: float, seeds: list[int]):
        self.sampling, self.temperature, self.seeds = sampling, temperature, seeds
        self.gens: list[torch.Generator] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, n, V) logits -> (B, 1) next ids."""
        last = logits[:, -1, :]
        if not self.sampling:
            return last.argmax(dim=-1, keepdim=True)
        if not self.gens:  # on the logits' device (a mapped model's last device may not be the first)
            self.gens = [torch.Generator(device=last.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(last.float() / self.temperature, dim=-1)
        return torch.cat([torch.multinomial(probs[j:j + 1], 1, generator=g) for j, g in enumerate(self.gens)])


def takes_seed(press) -> bool:
    """The press (or a press it wraps) draws from a seed: its draws must be made per row."""
    if not isinstance(press, BasePress):
        return False
    if "seed" in inspect.signature(type(press)).parameters:
        return True
    return any(takes_seed(getattr(press, p, None)) for p in ("base", *type(press).press_params))


class RowPress(BasePress):
    """One press per row, each built with its row's seed: row j's scores are those press j
    gives row j alone. Used only for seeded presses (``takes_seed``); the others score the
    whole (b, h, s) block at once."""

    def __init__(self, presses: list[BasePress]):
        first = presses[0]
        self.presses = presses
        self.name, self.description, self.modes = first.name, first.description, first.modes
        self.observes, self.stackable = first.observes, first.stackable

    def observe(self, layer) -> None:
        from dataclasses import replace

        cos_sin = layer.position_embeddings
        for j, p in enumerate(self.presses):
            pe = None if cos_sin is None else tuple(t[j:j + 1] if t.shape[0] > 1 else t for t in cos_sin)
            p.observe(replace(layer, hidden_states=layer.hidden_states[j:j + 1], position_embeddings=pe))

    def score(self, keys, values, layer_idx=None):
        # keys (..., b, h, s, d): row j is keys[..., j:j+1, :, :, :]
        return torch.cat([p.score(keys[..., j:j + 1, :, :, :], values[..., j:j + 1, :, :, :], layer_idx)
                          for j, p in enumerate(self.presses)], dim=-3)

    def layer_keep(self, n_keep, length, layer_idx, num_layers, keep_ratio):
        return self.presses[0].layer_keep(n_keep, length, layer_idx, num_layers, keep_ratio)

    def reset(self) -> None:
        for p in self.presses:
            p.reset()


class RowHeadPress(RowPress):
    """``RowPress`` over a per-head press (AdaKV over a seeded base): per-row head budgets."""

    def head_keep(self, scores, n_keep):
        return torch.cat([p.head_keep(scores[j:j + 1], n_keep) for j, p in enumerate(self.presses)], dim=0)


def row_press(presses: list[BasePress]) -> BasePress:
    return (RowHeadPress if presses[0].per_head else RowPress)(presses)


def batch_refusal(press) -> str | None:
    """Why ``press`` (built; None = the full cache) cannot run B > 1 prompts together; None when it can."""
    if press is not None and press.cuts_in_forward:
        return ("kvpress presses cut inside kvpress's own hooks, whose per-row behaviour knormctl does not "
                "check: run them with batch size 1")
    return None
