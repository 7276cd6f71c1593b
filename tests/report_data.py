"""Hand-built runs for the report and plot tests: realistic rows, deterministic values.

Not a test module: ``test_report.py``, ``test_report_stats.py``, ``test_report_tasks.py``
and ``test_plot.py`` import ``fill_run`` from here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from knormctl.config import PressConfig

ENV = {"device": "cpu", "cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "torch_threads": 2, "gpu_name": None,
       "torch": "2.13.0+cpu", "transformers": "5.1.0", "python": "3.11.7", "os": "Linux", "knormctl": "0.1.0",
       "git_commit": "0123456789abcdef", "git_dirty": False}
NO_MEM = "CPU: peak memory of one sample is not measurable in-process (RSS high-water mark never resets)"


@dataclass
class Cfg:
    press: str = "none"
    keep_ratio: float = 1.0
    prune_after: int = 512
    mode: str = "decode"

    @property
    def pc(self) -> PressConfig:
        return PressConfig(press=self.press, keep_ratio=self.keep_ratio, prune_after=self.prune_after,
                           mode=self.mode).validate()


LM_CONFIGS = (Cfg(), Cfg("knorm", 1.0), Cfg("knorm", 0.9), Cfg("knorm", 0.7), Cfg("random", 0.7))
# question tasks: sample i asks subtask i % len(subtasks), at length lengths[(i // len(subtasks)) % len(lengths)]
QUESTION_TASKS = ("passkey", "ruler", "niah", "longbench")


def passkey_score(i: int, pc: PressConfig, subtask: str, depth: float | None, length: int) -> float:
    return float(pc.keep_ratio >= 0.9 or (depth is not None and depth > 0.5 and pc.press == "knorm"))


def fill_run(store, *, configs=LM_CONFIGS, n_samples: int = 3, seed: int = 0, model: str = "smollm2-135m",
             task: str = "lm", status: str = "complete", memory: bool = True, fail: tuple[int | None, str] | None = None,
             stop_after: int | None = None, prompt_tokens=(1024, 1024, 2048), new_tokens: int = 100,
             group: str | None = None, ttft_factor: dict[str, float] | None = None, token_match: bool = True,
             tpot_factor: dict[str, float] | None = None, prune_after: int | None = None,
             repeats: int = 1, round_factor: dict[int, float] | None = None, samples: Sequence[int] | None = None,
             hostname: str | None = None, env: dict | None = None, dtype: str = "float32",
             subtasks: Sequence[str] | None = None, lengths: Sequence[int] | None = None,
             depths: Sequence[float | None] = (0.1, 0.5, 0.9),
             score: Callable[[int, PressConfig, str, float | None, int], float] = passkey_score,
             score_metric: str = "passkey_digits", mem_jitter: float = 0.0,
             settings: dict | None = None) -> int:
    """One run with ``n_samples`` x ``configs`` x ``repeats`` sample rows; returns the run id.

    fail=(sample_index, config_key): that cell stores an error instead of numbers (None: every sample's).
    stop_after=N: only the first N cells are stored (an interrupted run).
    ttft_factor / tpot_factor: multiply the TTFT / TPOT of a config key (to provoke flags).
    token_match=False: store NULL there (the report may compute it from the generated ids).
    prune_after: overrides every config's prune_after (e.g. larger than any context: no compression).
    repeats: measurement rounds of every cell; round_factor={round: f} multiplies that round's timings.
    samples: the sample indices this run stores (a shard by sample); default range(n_samples).
    hostname / env / dtype: the run's machine (a group may mix them).
    Question tasks (task in QUESTION_TASKS): sample i asks subtasks[i % k] at lengths[...] with needle
    depths[i % len(depths)]; ``score`` gives its score (0..1), stored with ``score_metric``.
    mem_jitter: relative noise on peak memory (0: deterministic).
    settings: more run settings stored in the run's config (a study's runs differ in them).
    """
    if prune_after is not None:
        configs = tuple(Cfg(c.press, c.keep_ratio, prune_after, c.mode) for c in configs)
    rng = random.Random(seed)
    indices = list(range(n_samples)) if samples is None else list(samples)
    cells = [(i, c, r) for i in indices for c in configs for r in range(repeats)]
    subtasks = list(subtasks or ([task] if task in QUESTION_TASKS else []))
    run_id = store.create_run(
        command="sweep", task=task, model_requested=model,
        config={"num_wikitext_samples": 2, "num_pg19_samples": max(0, n_samples - 2), "wikitext_source": "wiki-lite",
                "pg19_source": "wiki-lite-long", "presses": sorted({c.press for c in configs}),
                "model": model, "dtype": dtype, **(settings or {})},
        command_line=f"knormctl sweep --model {model}", env=env or ENV, group_name=group, samples_planned=len(cells),
        dtype=dtype, device=(env or ENV)["device"], knormctl_version="0.1.0", git_commit="0123456789abcdef")
    store.update_run(run_id, model_resolved=f"/models/{model}", model_hash=f"sha256:{model}")
    for n, (i, c, rep) in enumerate(cells):
        if stop_after is not None and n >= stop_after:
            break
        pc = c.pc
        fields = dict(task=task, sample_index=i, repeat=rep, config_key=pc.key,
                      dataset="wiki-lite" if i < 2 else "wiki-lite-long", doc_id=f"doc{i}", doc_title=f"Article {i}",
                      text_hash=f"h{i}", prompt_tokens=prompt_tokens[i % len(prompt_tokens)], press=pc.press,
                      keep_ratio=pc.keep_ratio, prune_after=pc.prune_after, skip_layers="0", compress_mode=pc.mode,
                      keep_recent=0)
        if fail is not None and fail[1] == pc.key and fail[0] in (None, i):
            store.add_sample(run_id, **fields, error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                                                     "Traceback (most recent call last): ...")
            continue
        p = fields["prompt_tokens"]
        slow = (round_factor or {}).get(rep, 1.0)
        ttft = 0.12 * p / 1024 * rng.uniform(0.97, 1.03) * (ttft_factor or {}).get(pc.key, 1.0) * slow
        tpot = (0.030 * (1 - 0.1 * (1 - pc.keep_ratio)) * rng.uniform(0.95, 1.05) * (tpot_factor or {}).get(pc.key, 1.0)
                * slow)
        steps = [tpot * rng.uniform(0.8, 1.3) for _ in range(new_tokens - 1)]
        compressing = pc.press != "none" and pc.keep_ratio < 1.0 and p + new_tokens > pc.prune_after
        kv_full = 24 * (p + new_tokens) * 2 * 3 * 64 * 4
        ppl_ctx = 11.0 + i
        fields.update(
            new_tokens=new_tokens, ttft_s=ttft, tpot_s=tpot, itl_p50_s=sorted(steps)[len(steps) // 2],
            itl_p90_s=sorted(steps)[int(len(steps) * 0.9)], itl_p99_s=max(steps), throughput_tps=1 / tpot,
            total_s=ttft + sum(steps),
            peak_mem_bytes=int((600e6 + kv_full * pc.keep_ratio) * (1 + rng.uniform(-mem_jitter, mem_jitter)))
            if memory else None,
            peak_mem_kind="cpu_rss_delta" if memory else "n/a", peak_mem_reason=None if memory else NO_MEM,
            kv_bytes_peak=kv_full if not compressing else int(kv_full * (0.5 + pc.keep_ratio / 2)),
            kv_bytes_final=kv_full if not compressing else int(kv_full * pc.keep_ratio),
            kv_entries_peak=p + new_tokens, kv_entries_final=int((p + new_tokens) * pc.keep_ratio),
            compress_events=(new_tokens - i % 2 if compressing else 0),
            compress_time_s=(0.0004 * new_tokens if compressing else 0.0),
            ppl_context=ppl_ctx if task == "lm" else None,
            # a cache never cut gives the full cache's perplexity exactly (the same computation)
            ppl_compressed=(ppl_ctx * (1 + 1.5 * (1 - pc.keep_ratio)) * rng.uniform(0.99, 1.01) if compressing else
                            ppl_ctx * random.Random(f"{seed}/{i}").uniform(0.99, 1.01)) if task == "lm" else None,
            eval_tokens=128 if task == "lm" else None,
            token_match=(1.0 if pc.press == "none" else round(pc.keep_ratio ** 2, 3)) if token_match else None,
            generated_text="the quick brown fox", generated_ids_json=[rng.randrange(100) for _ in range(new_tokens)],
            step_latencies_json=steps)
        if task in QUESTION_TASKS:
            sub = subtasks[i % len(subtasks)]
            length = (lengths or [p])[(i // len(subtasks)) % len(lengths or [p])]
            depth = depths[i % len(depths)]
            fields.update(subtask=sub, protocol="context", needle_depth=depth, context_length=length,
                          question_tokens=12, answers_json=["48213"], score_metric=score_metric,
                          score=float(score(i, pc, sub, depth, length)))
        store.add_sample(run_id, **fields)
    if status != "running":
        store.finish_run(run_id, status, error="interrupted by SIGINT" if status == "interrupted" else None)
    if hostname:  # the machine that measured it: set last, as only the run's owner (this process) may store
        store.update_run(run_id, hostname=hostname)
    return run_id


def parse_tables(out: str) -> dict[tuple[str, str], list[str]]:
    """The text tables read back: (configuration label, column header) -> the cell's lines
    (value, "Δ change", interval). Headers and labels may wrap over several lines."""
    cells: dict[tuple[str, str], list[str]] = {}
    header: list[list[str]] = []
    block: list[list[str]] = []
    state = None

    def flush():
        if not block:
            return
        cols = list(zip(*block))
        label_lines = [t for t in cols[0] if t]
        label = " ".join(t for t in label_lines if not t.startswith(("n=", "1 failed")))
        names = [" ".join(w for w in col if w) for col in zip(*header)]
        for name, col in zip(names[1:], cols[1:]):
            cells[(label, name)] = [t for t in col if t]
        block.clear()

    for line in out.splitlines():
        if line.startswith("┏"):  # a table starts: its header follows
            header, state = [], "header"
        elif line.startswith("┡"):
            state = "body"
        elif line.startswith(("├", "└")):
            flush()
            if line.startswith("└"):
                state = None
        elif state == "header" and line.startswith("┃"):
            header.append([c.strip() for c in line.strip("┃").split("┃")])
        elif state == "body" and line.startswith("│"):
            block.append([c.strip() for c in line.strip("│").split("│")])
    return cells
