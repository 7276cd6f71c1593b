"""Options of the question tasks (--task passkey | ruler | niah | longbench), shared as
``Annotated`` aliases so commands stay thin and the options can move between help panels."""

from __future__ import annotations

from typing import Annotated

import typer

TaskOpt = Annotated[str, typer.Option(
    "--task", help="lm: generation + perplexity; passkey | ruler | niah | longbench: question tasks, scored answers.")]
ProtocolOpt = Annotated[str, typer.Option(
    "--protocol", help="Question tasks: what is compressed. context: the context only, the question is fed after "
    "the cut (kvpress); query-aware: context + question; paper: the whole prompt, first answer token before the "
    "cut (the KnormPress paper's code).")]
ChatTemplateOpt = Annotated[str, typer.Option(
    "--chat-template", help="Question tasks: auto (the tokenizer's chat template when it has one, as kvpress) | on | off.")]
ContextLengthsOpt = Annotated[str | None, typer.Option(
    "--context-lengths", help="ruler/niah: prompt + answer tokens per sample, e.g. 4096,8192 (default: ruler 4096, "
    "niah 1024,2048,4096); longbench: the room a prompt may take (default: the model's context).")]
NeedleDepthsOpt = Annotated[str, typer.Option(
    "--needle-depths", help="niah: where the needle sits (0 = start of the haystack, 1 = end).")]
SubtasksOpt = Annotated[str | None, typer.Option(
    "--subtasks", help="ruler: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe "
    "(+ qa_1, qa_2 from the Hub); longbench: dataset names (default: all).")]
SamplesPerTaskOpt = Annotated[int | None, typer.Option(
    "--samples-per-task", help="Samples per subtask x length (niah: per depth x length cell). Default: ruler 5, "
    "niah 1, longbench 10.")]
HaystackOpt = Annotated[str | None, typer.Option(
    "--haystack", help="Text source of haystacks and passkey filler: wiki-lite-long, text:PATH, pg19 ... "
    "(default: --pg19-source).")]
RulerSourceOpt = Annotated[str, typer.Option(
    "--ruler-source", help="ruler: generated (offline, here) or hub (kvpress's simonjegou/ruler, config = length).")]
HubDatasetOpt = Annotated[str | None, typer.Option(
    "--hub-dataset", help="Hub id or local folder for --ruler-source hub / --task longbench (default: "
    "simonjegou/ruler, Xnhyacinth/LongBench).")]
AnswerTokensOpt = Annotated[int | None, typer.Option(
    "--answer-tokens", help="New tokens per answer (default: RULER's / LongBench's per subtask; niah 32).")]
PasskeyLengthsOpt = Annotated[str, typer.Option("--passkey-lengths", help="Passkey prompt lengths in tokens.")]
PasskeyDepthsOpt = Annotated[str, typer.Option("--passkey-depths", help="Where the passkey sits (0 = start, 1 = end).")]
PasskeySeedsOpt = Annotated[int, typer.Option("--passkey-seeds", help="Filler windows (and passkeys) per length x depth.")]
