"""Run configuration: dataclasses that validate themselves (no torch here).

Defaults -> CLI flags -> ``validate()``; the resolved config is stored with the run
as JSON, so ``--resume`` and ``report`` see exactly what was measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from knormctl.errors import UsageError as ConfigError  # bad input: one line on stderr, exit 2

PRESS_NAMES = ("none", "knorm", "knorm-inverse", "random", "streaming")
COMPRESS_MODES = ("decode", "prefill")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
TASKS = ("lm", "passkey")
PPL_METHODS = ("teacher-forced", "stream")


def parse_float_list(text: str, name: str) -> list[float]:
    """'0.9,0.8' -> [0.9, 0.8]; empty items, words, NaN and inf are errors."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise ConfigError(f"{name}: malformed list {text!r} (expected comma-separated numbers, e.g. 0.9,0.8)")
    values = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise ConfigError(f"{name}: {t!r} is not a number (in {text!r})") from None
        if not math.isfinite(v):
            raise ConfigError(f"{name}: {t!r} is not a finite number")
        values.append(v)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return values


def parse_int_list(text: str | None, name: str, allow_empty: bool = False) -> list[int]:
    """'0,1' -> [0, 1]; '' or 'none' -> [] when allowed."""
    if text is None or str(text).strip().lower() in ("", "none"):
        if allow_empty:
            return []
        raise ConfigError(f"{name}: empty list")
    items = [t.strip() for t in str(text).split(",")]
    if any(t == "" for t in items):
        raise ConfigError(f"{name}: malformed list {text!r} (expected comma-separated integers, e.g. 0,1)")
    values = []
    for t in items:
        try:
            values.append(int(t))
        except ValueError:
            raise ConfigError(f"{name}: {t!r} is not an integer (in {text!r})") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return values


def parse_name_list(text: str, name: str, allowed: tuple[str, ...]) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise ConfigError(f"{name}: malformed list {text!r}")
    for t in items:
        if t not in allowed:
            raise ConfigError(f"{name}: unknown {name.lstrip('-').rstrip('s')} {t!r} (choose from {', '.join(allowed)})")
    if len(set(items)) != len(items):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return items


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
        if self.press not in PRESS_NAMES:
            raise ConfigError(f"unknown press {self.press!r} (choose from {', '.join(PRESS_NAMES)})")
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
        return self

    @property
    def is_baseline(self) -> bool:
        return self.press == "none"

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
            k += "|" + ",".join(f"{name}={value}" for name, value in self.params)
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
    compress_mode: str = "decode"
    keep_recent: int = 0
    n_sink: int = 4
    warmup: bool = True
    # passkey task
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_seeds: int = 2
    passkey_new_tokens: int = 10  # the answer is five digits; more tokens only cost time
    # splitting and grouping
    shard: str | None = None  # "I/N"
    group: str | None = None
    study: dict | None = None  # the study (knormctl/study.py) this run belongs to, as resolved

    def validate(self) -> RunConfig:
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
            raise ConfigError(f"--ppl-method must be one of {', '.join(PPL_METHODS)}, got {self.ppl_method!r}")
        if self.ppl_skip is not None and self.ppl_skip < 0:
            raise ConfigError(f"--ppl-skip must be >= 0, got {self.ppl_skip}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not self.keep_ratios:
            raise ConfigError("--keep-ratios: empty list")
        for p in self.presses:
            if p not in PRESS_NAMES:
                raise ConfigError(f"unknown press {p!r} (choose from {', '.join(PRESS_NAMES)})")
        for kr in self.keep_ratios:
            PressConfig(press="knorm", keep_ratio=kr).validate()
        for L in self.passkey_lengths:
            if L < 64:
                raise ConfigError(f"--passkey-lengths: {L} is too short (>= 64 tokens)")
        for d in self.passkey_depths:
            if not (0.0 <= d <= 1.0):
                raise ConfigError(f"--passkey-depths: {d} is outside [0, 1]")
        if self.passkey_seeds < 1:
            raise ConfigError(f"--passkey-seeds must be >= 1, got {self.passkey_seeds}")
        if self.shard is not None:
            parse_shard(self.shard)
        self.press_configs()  # validates prune_after, skip_layers, mode
        return self

    def press_configs(self) -> list[PressConfig]:
        """The full-cache reference first, then every press x keep_ratio (order as given)."""
        common = dict(prune_after=self.prune_after, skip_layers=tuple(self.skip_layers),
                      mode=self.compress_mode, keep_recent=self.keep_recent, n_sink=self.n_sink, seed=self.seed)
        configs = [PressConfig(press="none", **common).validate()]
        if self.command == "baseline":
            return configs
        for press in self.presses:
            if press == "none":
                continue
            for kr in self.keep_ratios:
                configs.append(PressConfig(press=press, keep_ratio=kr, **common).validate())
        return configs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard I of N, 1-based."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if n < 1 or not (1 <= i <= n):
        raise ConfigError(f"--shard {text!r}: need 1 <= I <= N")
    return i, n
