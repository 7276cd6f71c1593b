"""A question sample as three token pieces, and the prompt format that makes them.

Every question task's prompt is ``context | question | suffix``, where the suffix is
what separates the question from the answer (a newline, or the chat template's end of
the user turn and start of the assistant turn) followed by the task's answer prefix.
The pieces are tokenized separately and concatenated, so the token sequence is the
same under every protocol: only *what is compressed* differs (``protocol.py``).

The format follows kvpress's pipeline (``kvpress/pipeline.py``, ``preprocess``): with a
chat template the context and the question form the user turn and the answer prefix
starts the assistant turn; without one the question is followed by ``"\\n"`` and the
answer prefix. One difference: kvpress always prepends the BOS token's text to a plain
prompt; here the context is encoded the way the tokenizer encodes any text (a Llama
tokenizer adds its BOS, a GPT-2-style one adds nothing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from knormctl.errors import UsageError

_MARK = "\u2063knormctl-user-turn\u2063"  # stands for the user turn's content when splitting a template


@dataclass
class QuestionSample:
    """One prompt with a known answer (stored alike for every question task)."""

    task: str  # passkey | ruler | niah | longbench
    subtask: str  # e.g. niah_single_1, vt, qasper, passkey
    dataset: str  # where the text came from, e.g. "ruler:wiki-lite-long"
    doc_id: str
    doc_title: str | None
    char_offset: int | None
    context_ids: list[int]
    question_ids: list[int]
    suffix_ids: list[int]  # separator (+ chat template's assistant header) + answer prefix
    answers: list[str]
    metric: str  # catalog score_metric
    max_new_tokens: int
    context_length: int | None = None  # the asked length (a grid axis)
    needle_depth: float | None = None
    extra: dict = field(default_factory=dict)  # task details: all_classes, chance, needle index ...
    eval_ids: list[int] = field(default_factory=list)  # no perplexity for question tasks

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids + self.suffix_ids

    @property
    def question_tokens(self) -> int:
        """Tokens after the context: the question, the separator and the answer prefix."""
        return len(self.question_ids) + len(self.suffix_ids)

    @property
    def text_hash(self) -> str:
        """Identity of the prompt and its answers (resume checks it): sha256, 16 hex chars."""
        ident = repr((self.context_ids, self.question_ids, self.suffix_ids, self.answers))
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


class PromptFormat:
    """Turns (context, question, answer prefix) texts into the three token pieces.

    ``chat_template``: ``auto`` uses the tokenizer's template when it has one (kvpress's
    choice), ``on`` requires one, ``off`` never uses it.
    """

    def __init__(self, tokenizer, chat_template: str = "auto"):
        self.tokenizer = tokenizer
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has:
            raise UsageError("--chat-template on: this tokenizer has no chat template (use auto or off)")
        self.uses_template = has and chat_template != "off"
        self.head, self.separator = "", "\n"  # kvpress's question_suffix without a template
        if self.uses_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                                     tokenize=False)
            if rendered.count(_MARK) != 1:
                raise UsageError("the tokenizer's chat template does not keep the user's message verbatim; "
                                 "use --chat-template off")
            self.head, self.separator = rendered.split(_MARK)

    def encode(self, text: str, *, first: bool = False) -> list[int]:
        # The template's own text holds its special tokens; a plain prompt's first piece gets
        # whatever the tokenizer adds to any text (its BOS, if it has that habit).
        special = first and not self.uses_template
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def pieces(self, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int], list[int]]:
        """(context_ids, question_ids, suffix_ids) of one prompt."""
        return (self.encode(self.head + context, first=True), self.encode(question),
                self.encode(self.separator + answer_prefix))

    def n_tokens(self, context: str, question: str, answer_prefix: str) -> int:
        return sum(len(p) for p in self.pieces(context, question, answer_prefix))


def fit(build, fmt: PromptFormat, budget: int, guess: int, what: str, limit: int | None = None):
    """The largest haystack size n (words, sentences, list entries...) whose prompt
    ``build(n)`` -> (context, question, answer_prefix, ...) takes at most ``budget`` tokens,
    as ``(n, build(n))``. RULER sizes its haystacks the same way (a bisection on the size).

    ``guess`` is any size to measure the tokens per unit from. Assumes more haystack means
    more tokens (true up to a token or two at piece boundaries; the result always fits).
    ``limit``: the largest size there is material for; reaching it means the prompt
    cannot be made as long as asked (UsageError).
    """
    seen: dict[int, int] = {}

    def fits(n: int) -> bool:
        if limit is not None and n > limit:
            return False
        if n not in seen:
            seen[n] = fmt.n_tokens(*build(n)[:3])
        return seen[n] <= budget

    if not fits(1):
        raise UsageError(f"{what}: the prompt without its haystack already takes {seen[1]} tokens, more than the "
                         f"{budget} available; ask for a longer context length")
    guess = max(2, guess) if limit is None else max(1, min(guess, limit))
    fits(guess)
    est = max(1, guess * budget // seen[guess])  # an underestimate: the fixed part counts per unit
    if fits(est):
        lo, hi = est, est + est // 8 + 1
        while fits(hi):
            lo, hi = hi, hi + hi // 8 + 1
        hi -= 1
    else:
        lo, hi = max(1, est - est // 8 - 1), est - 1
        while not fits(lo):
            lo, hi = max(1, lo - lo // 8 - 1), lo - 1
    while lo < hi:  # fits(lo), and nothing above hi fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if limit is not None and lo == limit:
        raise UsageError(f"{what}: the haystack material runs out at {seen[lo]} of the {budget} prompt tokens "
                         "asked; use a larger haystack source or a shorter context length")
    return lo, build(lo)
