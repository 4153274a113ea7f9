"""The core tables. Alembic migrations create them; a test keeps the two in step.

Result tables (one per hook and nested list) are dynamic and live in `schema`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UtcDateTime = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Hook(Base):
    """A webhook endpoint, `/hooks/{name}`; created by `hooks add` or on first sight."""

    __tablename__ = "hooks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    output_type: Mapped[str | None] = mapped_column(String(32))
    output_schema: Mapped[Any | None] = mapped_column(JSON)


class Token(Base):
    """An accepted Authorization value, stored only as its SHA-256. ``hook`` NULL: any hook."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hook: Mapped[str | None] = mapped_column(ForeignKey("hooks.name"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)


class Delivery(Base):
    """One POST exactly as received. Never updated but for its processing state and retention."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_hook_received_at", "hook", "received_at"),
        Index("ix_deliveries_status", "status"),
        # Partial: written when a delivery is processed, never on the ingest path (still NULL).
        Index(
            "ix_deliveries_processed_at",
            "processed_at",
            postgresql_where=text("processed_at IS NOT NULL"),
            sqlite_where=text("processed_at IS NOT NULL"),
        ),
        # Partial, for a task's timeline (migration 0012): set only once classified.
        Index(
            "ix_deliveries_task_id",
            "task_id",
            postgresql_where=text("task_id IS NOT NULL"),
            sqlite_where=text("task_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    hook: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    body_sha256: Mapped[str] = mapped_column(String(64))
    body_size: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[str] = mapped_column(Text)
    query_string: Mapped[str] = mapped_column(Text)
    labels: Mapped[str] = mapped_column(Text)
    dedupe_key: Mapped[str] = mapped_column(String(64), index=True)
    #: Set on the first delivery of a key only: the unique index is what makes
    #: concurrent redeliveries collapse, not a check-then-insert.
    first_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    duplicate_of: Mapped[str | None] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str | None] = mapped_column(String(32))
    output_type: Mapped[str | None] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    #: Set by retention (`receiver.retention`): the body is gone (empty), the rest stays.
    body_pruned_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)


class Task(Base):
    """One WebRun task, merged from every delivery that speaks of it."""

    __tablename__ = "tasks"

    #: JSON text of ``[session_id, task_id]``: unique even when session_id is NULL.
    task_key: Mapped[str] = mapped_column(Text, primary_key=True)
    session_id: Mapped[str | None] = mapped_column(Text)
    #: NULL for a task record with no id anywhere (one task per such delivery).
    task_id: Mapped[str | None] = mapped_column(Text, index=True)
    hook: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str | None] = mapped_column(String(16))
    output_type: Mapped[str | None] = mapped_column(String(32))
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    compute_time_s: Mapped[float | None] = mapped_column(Float)
    completion_time_s: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(Text)
    guardrail_type: Mapped[str | None] = mapped_column(Text)
    guardrail_value: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)
    last_delivery_id: Mapped[str] = mapped_column(String(36))
    labels: Mapped[str] = mapped_column(Text)
    extra: Mapped[str | None] = mapped_column(Text)
    #: The status of the deliveries the usage came from: ``running`` usage is "so far".
    usage_status: Mapped[str | None] = mapped_column(String(16))


class TaskEvent(Base):
    """What one delivery said about a task; the `Task` row is their fold (`receiver.lifecycle`)."""

    __tablename__ = "task_events"

    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), primary_key=True)
    task_key: Mapped[str] = mapped_column(Text, index=True)
    hook: Mapped[str] = mapped_column(String(128))
    #: The ids as this delivery gave them (body, else labels); ``task_key`` is the task joined.
    session_id: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str | None] = mapped_column(String(16))
    output_type: Mapped[str | None] = mapped_column(String(32))
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    compute_time_s: Mapped[float | None] = mapped_column(Float)
    completion_time_s: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(Text)
    guardrail_type: Mapped[str | None] = mapped_column(Text)
    guardrail_value: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    labels: Mapped[str] = mapped_column(Text)
    extra: Mapped[str | None] = mapped_column(Text)


class TaskFile(Base):
    """One item of a task record's ``data.files``: a file the agent downloaded."""

    __tablename__ = "task_files"

    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_key: Mapped[str] = mapped_column(Text, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    source: Mapped[str | None] = mapped_column(Text)
    download_url: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    #: WebRun's Unix-milliseconds ``timestamp``, as a UTC time.
    timestamp: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    extra: Mapped[str | None] = mapped_column(Text)


class TaskNetwork(Base):
    """One visited URL of a task record's ``data.network`` entries."""

    __tablename__ = "task_network"

    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), primary_key=True)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    entry_index: Mapped[int] = mapped_column(Integer)
    url_index: Mapped[int | None] = mapped_column(Integer)
    task_key: Mapped[str] = mapped_column(Text, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    network_id: Mapped[str | None] = mapped_column(Text)
    network_task_id: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    timestamp: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    extra: Mapped[str | None] = mapped_column(Text)


class Output(Base):
    """Each processed delivery's output, normalised: the text, JSON text or CSV text."""

    __tablename__ = "outputs"

    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), primary_key=True)
    hook: Mapped[str] = mapped_column(String(128), index=True)
    session_id: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text, index=True)
    output_type: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)


class ResultTable(Base):
    """Catalog of result tables: which hook and JSON path each holds, and its parent."""

    __tablename__ = "result_tables"

    table_name: Mapped[str] = mapped_column(String(63), primary_key=True)
    hook: Mapped[str] = mapped_column(String(128), index=True)
    path: Mapped[str] = mapped_column(Text)
    parent_table: Mapped[str | None] = mapped_column(String(63))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ResultColumn(Base):
    """Catalog of result columns: the SQL name, the source key as written, the type."""

    __tablename__ = "result_columns"

    table_name: Mapped[str] = mapped_column(
        ForeignKey("result_tables.table_name"), primary_key=True
    )
    column_name: Mapped[str] = mapped_column(String(63), primary_key=True)
    source_key: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    position: Mapped[int] = mapped_column(Integer)


_TOKEN_SUM = BigInteger().with_variant(Numeric(), "postgresql")


class RollupMeasures:
    """Counts and sums of one rollup row; ``known_*`` counts tasks whose measure is known."""

    tasks: Mapped[int] = mapped_column(BigInteger)
    known_input_tokens: Mapped[int] = mapped_column(BigInteger)
    known_output_tokens: Mapped[int] = mapped_column(BigInteger)
    known_total_tokens: Mapped[int] = mapped_column(BigInteger)
    known_compute_time_s: Mapped[int] = mapped_column(BigInteger)
    known_cost_usd: Mapped[int] = mapped_column(BigInteger)
    # NUMERIC on PostgreSQL: a token sum cannot overflow (migration 0008).
    input_tokens: Mapped[int] = mapped_column(_TOKEN_SUM)
    output_tokens: Mapped[int] = mapped_column(_TOKEN_SUM)
    total_tokens: Mapped[int] = mapped_column(_TOKEN_SUM)
    compute_time_s: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)


class RollupDaily(RollupMeasures, Base):
    """Task measures summed per UTC day, hook and status, kept current by triggers on ``tasks``.

    Read it through the ``cost_daily`` view (migration 0003): ``status_key`` is
    ``'=' || status``, or ``''`` for a NULL status (a key column cannot be NULL),
    and each ``known_*`` counts the tasks whose measure is known, so a sum over
    no known value reads as NULL (unknown), never 0.
    """

    __tablename__ = "rollup_daily"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    hook: Mapped[str] = mapped_column(Text, primary_key=True)
    status_key: Mapped[str] = mapped_column(Text, primary_key=True)


class RollupDelta(RollupMeasures, Base):
    """PostgreSQL only (empty on SQLite): changes to `RollupDaily` not yet folded in.

    Statement triggers on ``tasks`` append here rather than update the shared
    daily rows, so concurrent writers never wait on (or deadlock over) a
    rollup row; `receiver.rollups.fold` moves the rows into ``rollup_daily``.
    """

    __tablename__ = "rollup_delta"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    day: Mapped[dt.date] = mapped_column(Date)
    hook: Mapped[str] = mapped_column(Text)
    status_key: Mapped[str] = mapped_column(Text)


class RollupLabel(RollupMeasures, Base):
    """Task measures per UTC day, hook, status and label, kept current by triggers on ``tasks``.

    Read it through the ``cost_by_label`` view (migration 0005): a task counts
    once under each of its labels; ``status_key`` is as in `RollupDaily` and
    ``label_value_key`` likewise ``'=' || value``, or ``''`` for a JSON null.
    """

    __tablename__ = "rollup_label"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    hook: Mapped[str] = mapped_column(Text, primary_key=True)
    status_key: Mapped[str] = mapped_column(Text, primary_key=True)
    label_key: Mapped[str] = mapped_column(Text, primary_key=True)
    label_value_key: Mapped[str] = mapped_column(Text, primary_key=True)


class RollupLabelDelta(RollupMeasures, Base):
    """PostgreSQL only (empty on SQLite): changes to `RollupLabel` not yet folded in.

    Appended by statement triggers for the same reason as `RollupDelta`, and
    moved by the same `receiver.rollups.fold`.
    """

    __tablename__ = "rollup_label_delta"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    day: Mapped[dt.date] = mapped_column(Date)
    hook: Mapped[str] = mapped_column(Text)
    status_key: Mapped[str] = mapped_column(Text)
    label_key: Mapped[str] = mapped_column(Text)
    label_value_key: Mapped[str] = mapped_column(Text)


class RunState(StrEnum):
    """Where a run stands. Only ``launched`` runs are reconciled; the rest are final."""

    #: Created at WebRun (or tracked); no final record with a cost has arrived yet.
    LAUNCHED = "launched"
    #: Its webhook brought the final record.
    DELIVERED = "delivered"
    #: Its final record was fetched from WebRun (the webhook never came, or carried no cost).
    RECONCILED = "reconciled"
    #: WebRun kept answering 404: it does not know the task.
    LOST = "lost"
    #: WebRun refused to create it (``last_error`` says why).
    LAUNCH_FAILED = "launch_failed"


class Run(Base):
    """A WebRun task the receiver launched (`receiver run`) or tracks; `receiver.runs`.

    ``config`` is the task config as sent, but never its ``secrets``.
    """

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_session_id_task_id", "session_id", "task_id"),
        Index("ix_runs_state_next_check_at", "state", "next_check_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    hook: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    #: ``launched`` (by `receiver run`) or ``tracked`` (launched elsewhere).
    origin: Mapped[str] = mapped_column(String(16))
    config: Mapped[str | None] = mapped_column(Text)
    submitted_data: Mapped[str | None] = mapped_column(String(16))
    labels: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text)
    expected_by: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    next_check_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
