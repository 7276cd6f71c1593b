"""Options of the question tasks (--task passkey | ruler | niah | longbench), as ``Annotated``
aliases in the "What to measure" and "Data" help panels (conventions: ``cli/_common.py``)."""

from __future__ import annotations

from typing import Annotated

from knormctl.cli._common import DATA, LIST, MEASURE, _opt

TaskOpt = Annotated[str, _opt(
    "--task", panel=MEASURE, metavar="TASK",
    help="lm: generation + perplexity; passkey, ruler, niah, longbench: question tasks with scored answers.")]
ProtocolOpt = Annotated[str, _opt(
    "--protocol", panel=MEASURE, metavar="P",
    help="Question tasks, what is compressed: context (the context only; the question is fed after the cut, "
         "as kvpress), query-aware (context + question), paper (the whole prompt; first answer token before "
         "the cut, as the KnormPress paper's code).")]
ChatTemplateOpt = Annotated[str, _opt(
    "--chat-template", panel=MEASURE, metavar="WHEN",
    help="Question tasks: auto (the tokenizer's chat template when it has one, as kvpress), on or off.")]
ContextLengthsOpt = Annotated[str | None, _opt(
    "--context-lengths", panel=MEASURE, metavar=LIST,
    help="ruler/niah: prompt + answer tokens per sample, e.g. 4096,8192 (default: ruler 4096, niah "
         "1024,2048,4096); longbench: the room a prompt may take (default: the model's context).")]
NeedleDepthsOpt = Annotated[str, _opt(
    "--needle-depths", panel=MEASURE, metavar=LIST,
    help="niah: where the needle sits (0 = start of the haystack, 1 = end).")]
SubtasksOpt = Annotated[str | None, _opt(
    "--subtasks", panel=MEASURE, metavar=LIST,
    help="ruler: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe (+ qa_1, "
         "qa_2 from the Hub); longbench: dataset names (default: all).")]
SamplesPerTaskOpt = Annotated[int | None, _opt(
    "--samples-per-task", panel=MEASURE, metavar="N",
    help="Samples per subtask x length (niah: per depth x length cell). Default: ruler 5, niah 1, longbench 10.")]
AnswerTokensOpt = Annotated[int | None, _opt(
    "--answer-tokens", panel=MEASURE, metavar="N",
    help="New tokens per answer (default: RULER's / LongBench's per subtask; niah 32).")]
PasskeyLengthsOpt = Annotated[str, _opt("--passkey-lengths", panel=MEASURE, metavar=LIST,
                                        help="passkey: prompt lengths in tokens.")]
PasskeyDepthsOpt = Annotated[str, _opt("--passkey-depths", panel=MEASURE, metavar=LIST,
                                       help="passkey: where the key sits (0 = start, 1 = end).")]
PasskeySeedsOpt = Annotated[int, _opt("--passkey-seeds", panel=MEASURE, metavar="N",
                                      help="passkey: filler windows (and keys) per length x depth.")]
HaystackOpt = Annotated[str | None, _opt(
    "--haystack", panel=DATA, metavar="SOURCE",
    help="Haystack and passkey filler text: wiki-lite-long, text:PATH, pg19 ... (default: --pg19-source).")]
RulerSourceOpt = Annotated[str, _opt(
    "--ruler-source", panel=DATA, metavar="FROM",
    help="ruler: generated (offline, here) or hub (kvpress's simonjegou/ruler, config = length).")]
HubDatasetOpt = Annotated[str | None, _opt(
    "--hub-dataset", panel=DATA, metavar="ID",
    help="Hub id or local folder for --ruler-source hub / --task longbench (default: simonjegou/ruler, "
         "Xnhyacinth/LongBench).")]
