"""SQLAlchemy ORM models: one row per run, one row per (sample x configuration).

Typed columns hold what reports query; ``*_json`` columns hold the long tail
(simonw/llm style). Timestamps are UTC and named ``*_utc``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints so Alembic batch migrations on SQLite can find them again.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Run states. "complete_with_errors": finished, but some samples stored an error.
RUNNING, COMPLETE, COMPLETE_WITH_ERRORS, INTERRUPTED, FAILED = (
    "running", "complete", "complete_with_errors", "interrupted", "failed")
STATUSES = (RUNNING, COMPLETE, COMPLETE_WITH_ERRORS, INTERRUPTED, FAILED)


def utcnow() -> datetime:
    """Now, as the store keeps it: a naive datetime in UTC.

    Every ``*_utc`` column holds a *naive* datetime in UTC. SQLite's DateTime drops the
    zone anyway, and PostgreSQL's ``timestamp without time zone`` would shift an aware
    value by the session's TimeZone, so the store strips the zone from whatever it is
    given (``naive_utc``) and returns naive UTC values.
    """
    return datetime.now(timezone.utc).replace(tzinfo=None)


def naive_utc(value):
    """An aware datetime as naive UTC; anything else unchanged."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    __tablename__ = "runs"
    # Ids are what users share ("run 5"): SQLite must not give a deleted run's id to the next
    # (migration 0005); PostgreSQL's sequence never does.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Identity that survives export/import between stores (ids are local to one database).
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=lambda: str(uuid.uuid4()))
    command: Mapped[str] = mapped_column(String(32))  # baseline | sweep
    task: Mapped[str] = mapped_column(String(32), default="lm")  # lm | passkey
    status: Mapped[str] = mapped_column(String(32), default=RUNNING, index=True)
    group_name: Mapped[str | None] = mapped_column(String(200), index=True)
    shard: Mapped[str | None] = mapped_column(String(32))  # "I/N"
    resumed_from: Mapped[int | None] = mapped_column(Integer)
    started_utc: Mapped[datetime] = mapped_column(DateTime)
    ended_utc: Mapped[datetime | None] = mapped_column(DateTime)
    # seconds spent stopped between an interruption and a resume (None: never resumed); "took"
    # leaves them out
    stopped_s: Mapped[float | None] = mapped_column(Float)
    heartbeat_utc: Mapped[datetime | None] = mapped_column(DateTime)
    hostname: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    command_line: Mapped[str] = mapped_column(Text, default="")
    model_requested: Mapped[str] = mapped_column(String(500))
    model_resolved: Mapped[str | None] = mapped_column(Text)  # path / repo@revision / file
    model_hash: Mapped[str | None] = mapped_column(String(128))
    dtype: Mapped[str | None] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(64))
    attn_implementation: Mapped[str | None] = mapped_column(String(32))  # sdpa | eager | flash_attention_2 ...
    knormctl_version: Mapped[str | None] = mapped_column(String(64))
    git_commit: Mapped[str | None] = mapped_column(String(64))
    samples_done: Mapped[int] = mapped_column(Integer, default=0)
    samples_failed: Mapped[int] = mapped_column(Integer, default=0)
    samples_planned: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    config_json: Mapped[dict] = mapped_column(JSON, default=dict)
    env_json: Mapped[dict] = mapped_column(JSON, default=dict)

    samples: Mapped[list[Sample]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Sample.id")

    # Not a column. Readers show a 'running' run whose process is gone as 'interrupted'
    # without writing that down (reading never writes); the stored value is kept here.
    stored_status = None


class Sample(Base):
    """One text sample measured under one configuration (press x keep_ratio x ...)."""

    __tablename__ = "samples"
    __table_args__ = (
        # A (sample, configuration, repeat) cell is measured once per run: resume relies on it.
        UniqueConstraint("run_id", "sample_index", "config_key", "repeat", name="uq_samples_cell"),
        Index("ix_samples_run_config", "run_id", "config_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_utc: Mapped[datetime] = mapped_column(DateTime)
    task: Mapped[str] = mapped_column(String(32), default="lm")
    sample_index: Mapped[int] = mapped_column(Integer)  # position in the run's sample list
    repeat: Mapped[int] = mapped_column(Integer, default=0)  # measurement round of the same cell (0 = first)
    config_key: Mapped[str] = mapped_column(String(200))  # e.g. "knorm|kr=0.9|pa=512|skip=0|decode"

    # where the text came from
    dataset: Mapped[str] = mapped_column(String(200))
    doc_id: Mapped[str | None] = mapped_column(String(200))
    doc_title: Mapped[str | None] = mapped_column(String(500))
    char_offset: Mapped[int | None] = mapped_column(Integer)
    text_hash: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)

    # configuration
    press: Mapped[str] = mapped_column(String(64))
    keep_ratio: Mapped[float] = mapped_column(Float)
    prune_after: Mapped[int] = mapped_column(Integer)
    skip_layers: Mapped[str] = mapped_column(String(200), default="")  # "0,1" ("" = none)
    compress_mode: Mapped[str] = mapped_column(String(16))  # decode | prefill
    keep_recent: Mapped[int] = mapped_column(Integer, default=0)

    # speed
    new_tokens: Mapped[int | None] = mapped_column(Integer)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    tpot_s: Mapped[float | None] = mapped_column(Float)
    itl_p50_s: Mapped[float | None] = mapped_column(Float)
    itl_p90_s: Mapped[float | None] = mapped_column(Float)
    itl_p99_s: Mapped[float | None] = mapped_column(Float)
    throughput_tps: Mapped[float | None] = mapped_column(Float)
    total_s: Mapped[float | None] = mapped_column(Float)

    # memory (None + reason when the device cannot say)
    peak_mem_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_mem_kind: Mapped[str | None] = mapped_column(String(64))
    peak_mem_reason: Mapped[str | None] = mapped_column(Text)
    kv_bytes_peak: Mapped[int | None] = mapped_column(BigInteger)
    kv_bytes_final: Mapped[int | None] = mapped_column(BigInteger)
    kv_entries_peak: Mapped[int | None] = mapped_column(BigInteger)
    kv_entries_final: Mapped[int | None] = mapped_column(BigInteger)
    compress_events: Mapped[int | None] = mapped_column(Integer)
    compress_time_s: Mapped[float | None] = mapped_column(Float)

    # quality
    ppl_context: Mapped[float | None] = mapped_column(Float)
    ppl_compressed: Mapped[float | None] = mapped_column(Float)
    eval_tokens: Mapped[int | None] = mapped_column(Integer)
    token_match: Mapped[float | None] = mapped_column(Float)  # fraction equal to the full-cache output

    # question tasks (passkey, ruler, niah, longbench; NULL for lm)
    subtask: Mapped[str | None] = mapped_column(String(64))  # e.g. "niah_single_1", "qasper", "passkey"
    protocol: Mapped[str | None] = mapped_column(String(16))  # context | query-aware | paper
    context_length: Mapped[int | None] = mapped_column(Integer)  # the asked context length (a grid axis)
    needle_depth: Mapped[float | None] = mapped_column(Float)  # 0 = start of the context, 1 = end
    question_tokens: Mapped[int | None] = mapped_column(Integer)
    answers_json: Mapped[list | None] = mapped_column(JSON)  # the reference answer(s)
    score: Mapped[float | None] = mapped_column(Float)  # in [0, 1]; how, says score_metric
    score_metric: Mapped[str | None] = mapped_column(String(32))  # e.g. string_match_all, qa_f1, rouge_l
    batch_size: Mapped[int | None] = mapped_column(Integer)  # prompts generated together (None: 1)

    generated_text: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    generated_ids_json: Mapped[list | None] = mapped_column(JSON)
    step_latencies_json: Mapped[list | None] = mapped_column(JSON)  # seconds per decode step
    extra_json: Mapped[dict | None] = mapped_column(JSON)

    run: Mapped[Run] = relationship(back_populates="samples")
