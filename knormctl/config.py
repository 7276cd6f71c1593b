"""Run configuration: dataclasses that validate themselves (no torch here).

Defaults -> CLI flags -> ``validate()``; the resolved config is stored with the run
as JSON, so ``--resume`` and ``report`` see exactly what was measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace

from knormctl.errors import ModeError
from knormctl.errors import UsageError as ConfigError  # bad input: one line on stderr, exit 2
from knormctl.launch import resolve_shard
from knormctl.options import check_decode_step, check_device_map, check_skip_layers, keep_ratio_error, unknown_choice
from knormctl.press_spec import format_press_spec, format_spec_value, parse_press_spec, resolve_press_list
from knormctl.tasks import catalog as tasks

# The largest integer every results database column holds: PostgreSQL's INTEGER (SQLite's
# are 64-bit). Settings above it (no model has such a context) and ids above it cannot be stored.
MAX_STORED_INT = 2**31 - 1

_QUESTION = ("passkey", "ruler", "niah", "longbench")
# Options only some tasks read: given on the command line for another task they would be dropped
# while the stored config records them (a passkey run said needle_depths [0.1]).
TASK_OPTIONS = {
    "needle_depths": ("niah",), "passkey_lengths": ("passkey",), "passkey_depths": ("passkey",),
    "passkey_seeds": ("passkey",), "samples_per_task": ("ruler", "niah", "longbench"),
    "answer_tokens": _QUESTION, "chat_template": _QUESTION, "haystack": ("passkey", "ruler", "niah"),
    "ruler_source": ("ruler",), "hub_dataset": ("ruler", "longbench"),
    "num_wikitext_samples": ("lm",), "num_pg19_samples": ("lm",), "wikitext_prompt_tokens": ("lm",),
    "max_prompt_tokens": ("lm",), "wikitext_source": ("lm",), "eval_tokens": ("lm",), "ppl_method": ("lm",),
    "ppl_skip": ("lm",), "passkey_new_tokens": ("passkey",),
    "max_new_tokens": ("lm",),  # a question task generates its answer length (--answer-tokens)
    # refused by validate() with a hint of the task's own option; here for studies, whose runs differ in task
    "context_lengths": ("ruler", "niah", "longbench"), "subtasks": ("ruler", "longbench"),
}


def task_reads(task: str | None, option: str) -> bool:
    """Whether a run of ``task`` (None: lm) reads ``option`` (a RunConfig field name)."""
    readers = TASK_OPTIONS.get(option)
    return readers is None or (task or "lm") in readers


def other_tasks_message(option: str, tasks: list[str]) -> str:
    """'--needle-depths applies to --task niah, not passkey': ``option`` given for ``tasks``."""
    hint = " (a question task generates up to --answer-tokens, or --passkey-new-tokens)" \
        if option == "max_new_tokens" else ""
    return (f"--{option.replace('_', '-')} applies to --task {', '.join(TASK_OPTIONS[option])}, "
            f"not {', '.join(tasks)}{hint}")


def refuse_options_of_other_tasks(task: str, given: list[str]) -> None:
    """One line for the first option given (field names) that ``task`` does not read."""
    for name in given:
        if not task_reads(task, name):
            raise ConfigError(other_tasks_message(name, [task]))

COMPRESS_MODES = ("decode", "prefill")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
TASKS = ("lm", *tasks.QUESTION_TASKS)
PPL_METHODS = ("teacher-forced", "stream")


@dataclass(frozen=True)
class PressConfig:
    """One compression configuration, exactly as the engine applies it.

    decode mode: after EVERY forward (prefill included), each layer not in
    ``skip_layers`` holding more than ``prune_after`` entries is cut to
    ``ceil(keep_ratio * length)``. prefill mode: the same cut, once, after prefill.
    """

    press: str = "none"
    keep_ratio: float = 1.0
    prune_after: int = 512
    skip_layers: tuple[int, ...] = (0,)
    mode: str = "decode"
    keep_recent: int = 0  # newest entries never evicted (0 = the paper's rule)
    n_sink: int = 4  # streaming: first entries always kept
    seed: int = 0  # random press
    params: tuple[tuple[str, object], ...] = ()  # the press's own parameters, e.g. (("window_size", 64),)

    def validate(self) -> PressConfig:
        """Raise ConfigError on bad input; return the configuration with its press parameters in
        canonical form (typed, declaration order, defaults dropped)."""
        if not (isinstance(self.keep_ratio, (int, float)) and math.isfinite(self.keep_ratio)
                and 0.0 < self.keep_ratio <= 1.0):
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.prune_after < 0:
            raise ConfigError(f"prune_after must be >= 0, got {self.prune_after}")
        if self.mode not in COMPRESS_MODES:
            raise ConfigError(f"compress mode must be one of {', '.join(COMPRESS_MODES)}, got {self.mode!r}")
        if any(i < 0 for i in self.skip_layers):
            raise ConfigError(f"skip_layers must be layer indices >= 0, got {list(self.skip_layers)}")
        if self.keep_recent < 0:
            raise ConfigError(f"keep_recent must be >= 0, got {self.keep_recent}")
        if self.n_sink < 0:
            raise ConfigError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.is_baseline:
            return self
        # the press registry checks name, parameters and mode (imports the engine: torch)
        from knormctl.engine.presses import resolve_press

        params = resolve_press(self.press, self.params, self.mode)
        return self if params == tuple(self.params) else replace(self, params=params)

    @property
    def is_baseline(self) -> bool:
        return self.press == "none"

    @property
    def spec(self) -> str:
        """The press as the user writes it: 'snapkv(window_size=32)' (the store's press column)."""
        return format_press_spec(self.press, self.params)

    @property
    def key(self) -> str:
        """Stable identity of the configuration (resume and report group by it)."""
        if self.is_baseline:
            return "none"
        skip = ",".join(map(str, self.skip_layers)) or "-"
        k = f"{self.press}|kr={self.keep_ratio:g}|pa={self.prune_after}|skip={skip}|{self.mode}"
        if self.keep_recent:
            k += f"|recent={self.keep_recent}"
        if self.press == "streaming":
            k += f"|sink={self.n_sink}"
        if self.params:
            k += "|" + ",".join(f"{name}={format_spec_value(value)}" for name, value in self.params)
        return k

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip_layers"] = list(self.skip_layers)
        d["params"] = [list(p) for p in self.params]
        return d


@dataclass
class RunConfig:
    """Everything a baseline or sweep needs; stored with the run (``config_json``)."""

    command: str = "sweep"
    task: str = "lm"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | None = None  # accelerate places the layers over several devices (--device-map)
    threads: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    wikitext_source: str = "wiki-lite"
    pg19_source: str = "wiki-lite-long"
    num_wikitext_samples: int = 3
    num_pg19_samples: int = 2
    wikitext_prompt_tokens: int = 1024  # short samples
    max_prompt_tokens: int = 2048  # long (pg19-like) samples, capped by the model's context
    max_new_tokens: int = 100
    eval_tokens: int = 128  # tokens after the prompt scored teacher-forced for ppl_compressed
    ppl_method: str = "teacher-forced"  # or "stream": the original l2compress evaluation
    ppl_skip: int | None = None  # stream: tokens not scored at the start (None: prune_after)
    sampling: bool = False  # greedy by default
    temperature: float = 1.0
    presses: list[str] = field(default_factory=lambda: ["knorm"])
    keep_ratios: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7])
    prune_after: int = 512
    skip_layers: list[int] = field(default_factory=lambda: [0])
    compress_mode: str | None = None  # None: decode for lm, prefill for question tasks (validate)
    keep_recent: int = 0
    n_sink: int = 4
    prefill_chunk: int = 0  # > 0: the prompt is prefilled this many tokens at a time, cut after each chunk
    decode_step: str = "launched"  # launched | static | graph (engine/graphstep.py)
    warmup: bool = True
    # stop each answer at its first EOS (question tasks; benchmarks/tasks.py): the score reads
    # the answer up to that token anyway, so only time changes -- and timings stop comparing
    stop_at_eos: bool = False
    repeats: int = 1  # measurement rounds of every (sample x configuration) cell (samples.repeat)
    batch_size: int = 1  # samples of equal length generated together (plan.plan_batches; samples.batch_size)
    # passkey task
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_seeds: int = 2
    # the answer is five digits; a model that restates "\nThe pass key is 12345" needs 11
    # tokens in smollm2's tokenizer (a digit each), so 10 cut it; generation stops at EOS
    passkey_new_tokens: int = 16
    # question tasks (passkey, ruler, niah, longbench); None = the task's default, resolved by validate()
    protocol: str = "context"  # what is compressed: context | query-aware | paper (tasks/protocol.py)
    chat_template: str = "auto"  # auto: the tokenizer's template when it has one (kvpress); on | off
    context_lengths: list[int] | None = None  # ruler/niah: prompt + answer tokens; longbench: room (None: model's)
    needle_depths: list[float] = field(default_factory=lambda: list(tasks.DEFAULT_NEEDLE_DEPTHS))  # niah
    subtasks: list[str] | None = None  # ruler: niah_single_1 ... fwe; longbench: dataset names
    samples_per_task: int | None = None  # per subtask x length (niah: per depth x length cell)
    haystack: str | None = None  # text source of haystacks and passkey filler (None: --pg19-source)
    ruler_source: str = "generated"  # or "hub": kvpress's simonjegou/ruler
    hub_dataset: str | None = None  # Hub id or local folder (None: simonjegou/ruler, Xnhyacinth/LongBench)
    answer_tokens: int | None = None  # new tokens per answer (None: RULER's / LongBench's per subtask)
    # splitting and grouping
    shard: str | None = None  # "I/N" (whole samples: shard I runs samples I-1, I-1+N, ...); "auto": from the launcher
    group: str | None = None
    study: dict | None = None  # the study (knormctl/study.py) this run belongs to, as resolved

    def validate(self, local: bool = True) -> RunConfig:
        """Refuse bad settings in one line (ConfigError); ``local``: also the model and text
        sources this machine must have (``check_local_inputs``)."""
        self._refuse_unstorable_integers()
        for name in ("num_wikitext_samples", "num_pg19_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.task == "lm" and self.num_wikitext_samples + self.num_pg19_samples == 0:
            raise ConfigError("no samples requested (--num-wikitext-samples and --num-pg19-samples are both 0)")
        for name in ("max_new_tokens", "wikitext_prompt_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be >= 0, got {self.eval_tokens}")
        if self.ppl_method not in PPL_METHODS:
            raise unknown_choice("--ppl-method", "method", self.ppl_method, PPL_METHODS)
        if self.ppl_skip is not None and self.ppl_skip < 0:
            raise ConfigError(f"--ppl-skip must be >= 0, got {self.ppl_skip}")
        if self.dtype not in DTYPES:
            raise unknown_choice("--dtype", "dtype", self.dtype, DTYPES)
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise unknown_choice("--device", "device", self.device, (*DEVICES, "cuda:N"))
        if self.device_map is not None:
            check_device_map(self.device_map, self.device)
        check_decode_step(self.decode_step, self.device, self.device_map)
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.task not in TASKS:
            raise unknown_choice("--task", "task", self.task, TASKS)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        self._refuse_what_does_not_apply()
        if not self.keep_ratios:
            raise ConfigError("--keep-ratios: empty list")
        if not self.presses:
            raise ConfigError("--presses: empty list")
        for kr in self.keep_ratios:
            if (error := keep_ratio_error(kr)) is not None:
                raise error
        if self.compress_mode is None:  # the task's own default, wherever the config comes from
            self.compress_mode = "decode" if self.task == "lm" else "prefill"
        if self.compress_mode not in COMPRESS_MODES:
            raise unknown_choice("--compress-mode", "mode", self.compress_mode, COMPRESS_MODES)
        for name in ("prune_after", "keep_recent", "n_sink", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if any(i < 0 for i in self.skip_layers):
            raise ConfigError(f"--skip-layers: layer indices are >= 0, got {list(self.skip_layers)}")
        for L in self.passkey_lengths:
            if L < 64:
                raise ConfigError(f"--passkey-lengths: {L} is too short (>= 64 tokens)")
        for d in self.passkey_depths:
            if not (0.0 <= d <= 1.0):
                raise ConfigError(f"--passkey-depths: {d} is outside [0, 1]")
        if self.passkey_seeds < 1:
            raise ConfigError(f"--passkey-seeds must be >= 1, got {self.passkey_seeds}")
        self._validate_question_task()
        if self.shard is not None:
            self.shard = resolve_shard(self.shard)  # stored resolved: resume and report see "I/N"
        if self.command != "baseline":  # resolved specs are stored with the run (resume sees the same)
            self.presses = resolve_press_list(self.presses, self.compress_mode)
            if self.ppl_method == "stream" and self.eval_tokens:  # stream ppl cuts as in decode mode
                try:
                    resolve_press_list(self.presses, "decode")
                except ModeError as exc:
                    raise ConfigError(f"--ppl-method stream cuts in decode mode, which press {exc.press!r} does not "
                                      "support: use --ppl-method teacher-forced or --eval-tokens 0") from None
        configs = self.press_configs()  # validates prune_after, skip_layers, mode
        if self.keep_recent:  # refused here, before a study's first run, not when its second one starts
            from knormctl.plan import planned_lengths, refuse_keep_recent_over_budget

            if lengths := planned_lengths(self):
                refuse_keep_recent_over_budget(self.keep_recent, configs, *lengths)
        if self.command != "baseline":
            from knormctl.engine.presses.base import chunked_prefill_refusal, static_step_refusal

            if self.prefill_chunk:
                if self.protocol == "paper":  # its first token is read from a prefill no cut has touched
                    raise ConfigError("--prefill-chunk cannot be used with --protocol paper: that protocol takes "
                                      "the first answer token from an uncompressed prefill, and a chunked prefill "
                                      "cuts between its chunks")
                self._refuse_presses("--prefill-chunk", chunked_prefill_refusal)
            if self.decode_step != "launched":
                # every configuration takes the static step: a press that could not would be
                # timed launched next to static ones, a comparison of two engines
                self._refuse_presses(f"--decode-step {self.decode_step}",
                                     lambda press: static_step_refusal(press, self.compress_mode))
        if local:
            self.check_local_inputs()
        return self

    def check_local_inputs(self) -> None:
        """The model and text sources named by path or name, checked without loading anything:
        an unknown source, a missing text:PATH, a model path that is not a model. Here, so that
        ``sweep --dry-run`` and a study's plan find them before any run starts (a Hub id or
        dataset is only known to exist once fetched, when the run loads it)."""
        from knormctl.engine.models import model_source, planned_num_layers
        from knormctl.engine.text import validate_source

        def check(option: str, source: str) -> None:
            try:
                validate_source(source)
            except ConfigError as exc:  # the option named: a study file's message points at its key
                raise ConfigError(f"--{option}: {exc}") from None

        if self.task == "lm":
            if self.num_wikitext_samples:
                check("wikitext-source", self.wikitext_source)
            if self.num_pg19_samples:
                check("pg19-source", self.pg19_source)
        if self.task in ("passkey", "ruler", "niah"):
            check("haystack" if self.haystack else "pg19-source", self.haystack_source)
        layers = planned_num_layers(*model_source(self.model))
        if layers is not None:
            try:
                check_skip_layers(self.skip_layers, layers)
            except ConfigError as exc:  # the option named: a study file's message points at its key
                raise ConfigError(f"--skip-layers: {exc}") from None

    def _refuse_unstorable_integers(self) -> None:
        """An integer no database column holds (--prune-after 99999999999999999999) planned fine,
        loaded the model and failed storing the first cell, leaving a failed run behind."""
        for f in fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_STORED_INT:
                    raise ConfigError(f"--{f.name.replace('_', '-')}: {v} is too large (at most {MAX_STORED_INT})")

    def _refuse_presses(self, flag: str, refusal) -> None:
        """One line naming ``flag`` and the first press ``refusal`` (a built press -> why, or None)
        says cannot run with it."""
        from knormctl.engine.presses import make_press

        for spec in self.presses:
            name, params = parse_press_spec(spec)
            if (why := refusal(make_press(name, params=dict(params)))) is not None:
                raise ConfigError(f"{flag} cannot be used with press {spec!r}: {why}")

    @property
    def haystack_source(self) -> str:
        return self.haystack or self.pg19_source

    def _refuse_what_does_not_apply(self) -> None:
        """An option this run would ignore is refused, not dropped: a user who asked for 8k-token
        contexts on the lm task would read numbers measured at 1k as if they were 8k."""
        instead = {("context_lengths", "lm"): " (its prompts: --wikitext-prompt-tokens, --max-prompt-tokens)",
                   ("context_lengths", "passkey"): " (its lengths: --passkey-lengths)",
                   ("subtasks", "niah"): " (its cells: --context-lengths x --needle-depths)"}
        for name, flag, tasks_using in (("context_lengths", "--context-lengths", ("ruler", "niah", "longbench")),
                                        ("subtasks", "--subtasks", ("ruler", "longbench"))):
            if getattr(self, name) is not None and self.task not in tasks_using:
                raise ConfigError(f"{flag} applies to --task {', '.join(tasks_using)}, not {self.task}"
                                  + instead.get((name, self.task), ""))
        if self.task == "lm" and self.protocol != "context":
            raise ConfigError(f"--protocol {self.protocol} applies to the question tasks (passkey, ruler, niah, "
                              "longbench), not --task lm")
        if self.temperature != 1.0 and not self.sampling:
            raise ConfigError(f"--temperature {self.temperature:g} applies with --sample (greedy decoding has none)")
        if self.ppl_skip is not None and self.ppl_method != "stream":
            raise ConfigError("--ppl-skip applies to --ppl-method stream (teacher-forced scores every --eval-tokens)")

    def _validate_question_task(self) -> None:
        """Protocol and task options; fills the task's defaults in (the stored config is resolved)."""
        for name, value, allowed in (("--protocol", self.protocol, tasks.PROTOCOLS),
                                     ("--chat-template", self.chat_template, tasks.CHAT_TEMPLATE_MODES),
                                     ("--ruler-source", self.ruler_source, tasks.RULER_SOURCES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.answer_tokens is not None and self.answer_tokens < 1:
            raise ConfigError(f"--answer-tokens must be >= 1, got {self.answer_tokens}")
        if self.samples_per_task is not None and self.samples_per_task < 1:
            raise ConfigError(f"--samples-per-task must be >= 1, got {self.samples_per_task}")
        for n in self.context_lengths or []:
            if n < 64:
                raise ConfigError(f"--context-lengths: {n} is too short (>= 64 tokens)")
        for d in self.needle_depths:
            if not (0.0 <= d <= 1.0):
                raise ConfigError(f"--needle-depths: {d} is outside [0, 1]")
        if not self.needle_depths:
            raise ConfigError("--needle-depths: empty list")
        if self.task not in ("ruler", "niah", "longbench"):
            return
        if self.samples_per_task is None:
            self.samples_per_task = tasks.DEFAULT_SAMPLES_PER_TASK[self.task]
        if self.context_lengths is None and self.task in tasks.DEFAULT_CONTEXT_LENGTHS:
            self.context_lengths = list(tasks.DEFAULT_CONTEXT_LENGTHS[self.task])
        if self.task == "niah":
            return
        if self.subtasks is None:  # "all": from the Hub, RULER's qa_1/qa_2 too
            self.subtasks = list(tasks.DEFAULT_SUBTASKS[self.task]) + (
                list(tasks.RULER_QA) if self.task == "ruler" and self.ruler_source == "hub" else [])
        if self.task == "ruler":
            allowed = tasks.RULER_SYNTHETIC + (tasks.RULER_QA if self.ruler_source == "hub" else ())
            for s in self.subtasks:
                if s in tasks.RULER_QA and self.ruler_source != "hub":
                    raise ConfigError(f"--subtasks: {s} needs documents from the Hub (--ruler-source hub)")
        else:
            allowed = tasks.LONGBENCH
            for s in self.subtasks:
                if s in tasks.LONGBENCH_UNSUPPORTED:
                    raise ConfigError(f"--subtasks: LongBench {s} is not supported (needs "
                                      f"{tasks.LONGBENCH_UNSUPPORTED[s]})")
        for s in self.subtasks:
            if s not in allowed:
                raise ConfigError(f"--subtasks: unknown {self.task} subtask {s!r} (choose from {', '.join(allowed)})")
        if not self.subtasks or len(set(self.subtasks)) != len(self.subtasks):
            raise ConfigError("--subtasks: empty list or duplicates")

    def press_configs(self) -> list[PressConfig]:
        """The full-cache reference first, then every press x keep_ratio (order as given)."""
        common = dict(prune_after=self.prune_after, skip_layers=tuple(self.skip_layers),
                      mode=self.compress_mode, keep_recent=self.keep_recent, n_sink=self.n_sink, seed=self.seed)
        configs = [PressConfig(press="none", **common).validate()]
        if self.command == "baseline":
            return configs
        for spec in self.presses:
            name, params = parse_press_spec(spec)
            if name == "none":
                continue
            for kr in self.keep_ratios:
                configs.append(PressConfig(press=name, params=params, keep_ratio=kr, **common).validate())
        return configs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def planned_samples(cfg: RunConfig) -> int | None:
    """Prompts a run will measure, known from its configuration alone (None: only once the
    texts are cut). Shards and repeats are not counted here."""
    if cfg.task == "lm":
        return cfg.num_wikitext_samples + cfg.num_pg19_samples
    if cfg.task == "passkey":
        return len(cfg.passkey_lengths) * len(cfg.passkey_depths) * cfg.passkey_seeds
    if cfg.task == "ruler" and cfg.ruler_source == "generated":  # validate() filled in the defaults
        return len(cfg.context_lengths) * len(cfg.subtasks) * cfg.samples_per_task
    if cfg.task == "niah":
        return len(cfg.context_lengths) * len(cfg.needle_depths) * cfg.samples_per_task
    return None  # Hub datasets: as many records as the dataset has


