"""Question tasks: prompts with a known answer, and how an answer is scored.

A question task's sample is a long context, a question and an answer prefix, kept as
three token pieces so that the *protocol* (``protocol.py``) can decide which of them
is compressed. Building samples needs a tokenizer but no model; scoring is pure
Python. Nothing here imports torch, the store or the CLI.

catalog.py    task and subtask names, answer lengths, metrics, chance levels (pure data)
protocol.py   context | query-aware | paper: what is compressed and what is not
prompt.py     QuestionSample and the prompt format (chat template or plain text)
scoring.py    RULER string matching, the passkey check, prediction clean-up
longbench.py  LongBench's per-dataset prompts and metrics (F1, ROUGE-L, ...)
haystack.py   haystack words and word pools from any knormctl text source
ruler.py      the synthetic RULER tasks (needles, variable tracking, cwe, fwe)
niah.py       the classic needle grid (depth x length)
passkey.py    the passkey prompt (the KnormPress paper's task)
hub.py        the same tasks from the Hub (kvpress's RULER set, LongBench)
build.py      a run's samples from its RunConfig
"""
