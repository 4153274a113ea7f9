"""task_events: one row per delivery that spoke of a task; tasks becomes their fold

``tasks`` was merged in place, delivery by delivery, so a late guardrail
turned a completed task back and nothing could rebuild it. Now every delivery
that speaks of a task leaves a row in ``task_events`` (what it reported and
when), and the ``tasks`` row is computed from all of them (`receiver.lifecycle`).

``data.files`` and ``data.network`` get tables of their own (``task_files``,
``task_network``; rows from deliveries processed from now on or reprocessed).

``tasks.task_id`` becomes nullable (a task record with no id anywhere is still
a task, one per delivery, so its cost counts), and ``tasks.usage_status`` says
which status the usage was reported with (``running`` usage is "so far").

Existing tasks get one event each, from their row (``last_delivery_id``,
``first_seen_at``), so no task loses what it held; ``receiver reprocess``
rebuilds the true timeline from the ledger.

SQLite cannot make a column nullable in place: the table is rebuilt (batch
mode), and its rollup triggers, which the rebuild drops, are put back as they
were (their SQL read from ``sqlite_master`` first).

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-03 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None

UtcDateTime = sa.DateTime(timezone=True)

_EVENT_COLUMNS = (
    "delivery_id, task_key, hook, session_id, task_id, received_at, kind, status,"
    " output_type, input_tokens, output_tokens, total_tokens, compute_time_s,"
    " completion_time_s, cost_usd, error, error_code, guardrail_type, guardrail_value,"
    " completed_at, labels, extra"
)


def _rebuild_tasks(nullable: bool) -> None:
    bind = op.get_bind()
    triggers: list[str] = []
    if bind.dialect.name == "sqlite":
        triggers = [
            sql
            for (sql,) in bind.execute(
                sa.text(
                    "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'tasks'"
                )
            )
        ]
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.alter_column("task_id", existing_type=sa.Text(), nullable=nullable)
        if nullable:
            batch_op.add_column(sa.Column("usage_status", sa.String(length=16), nullable=True))
        else:
            batch_op.drop_column("usage_status")
    existing = set()
    if bind.dialect.name == "sqlite":
        existing = {
            name
            for (name,) in bind.execute(
                sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            )
        }
    for sql in triggers:
        name = sql.split()[2]
        if name not in existing:
            bind.execute(sa.text(sql))


def upgrade() -> None:
    op.create_table(
        "task_events",
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("task_key", sa.Text(), nullable=False),
        sa.Column("hook", sa.String(length=128), nullable=False),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("output_type", sa.String(length=32), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=True),
        sa.Column("output_tokens", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens", sa.BigInteger(), nullable=True),
        sa.Column("compute_time_s", sa.Float(), nullable=True),
        sa.Column("completion_time_s", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("guardrail_type", sa.Text(), nullable=True),
        sa.Column("guardrail_value", sa.Text(), nullable=True),
        sa.Column("completed_at", UtcDateTime, nullable=True),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("extra", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"], name=op.f("fk_task_events_delivery_id_deliveries")
        ),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_task_events")),
    )
    op.create_index(op.f("ix_task_events_task_key"), "task_events", ["task_key"])
    op.create_table(
        "task_files",
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("task_key", sa.Text(), nullable=False),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("download_url", sa.Text(), nullable=True),
        sa.Column("filename", sa.Text(), nullable=True),
        sa.Column("timestamp", UtcDateTime, nullable=True),
        sa.Column("extra", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"], name=op.f("fk_task_files_delivery_id_deliveries")
        ),
        sa.PrimaryKeyConstraint("delivery_id", "position", name=op.f("pk_task_files")),
    )
    op.create_index(op.f("ix_task_files_task_key"), "task_files", ["task_key"])
    op.create_table(
        "task_network",
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("row_index", sa.Integer(), nullable=False),
        sa.Column("entry_index", sa.Integer(), nullable=False),
        sa.Column("url_index", sa.Integer(), nullable=True),
        sa.Column("task_key", sa.Text(), nullable=False),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.Column("network_id", sa.Text(), nullable=True),
        sa.Column("network_task_id", sa.Text(), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("timestamp", UtcDateTime, nullable=True),
        sa.Column("extra", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_task_network_delivery_id_deliveries"),
        ),
        sa.PrimaryKeyConstraint("delivery_id", "row_index", name=op.f("pk_task_network")),
    )
    op.create_index(op.f("ix_task_network_task_key"), "task_network", ["task_key"])
    _rebuild_tasks(nullable=True)
    # One event per existing task, from its row: nothing it holds is lost before a reprocess.
    op.execute(
        f"INSERT INTO task_events ({_EVENT_COLUMNS})"
        " SELECT t.last_delivery_id, t.task_key, t.hook, t.session_id, t.task_id,"
        " t.first_seen_at, coalesce(d.kind, 'full_response'), t.status, t.output_type,"
        " t.input_tokens, t.output_tokens, t.total_tokens, t.compute_time_s,"
        " t.completion_time_s, t.cost_usd, t.error, t.error_code, t.guardrail_type,"
        " t.guardrail_value, t.completed_at, t.labels, t.extra"
        " FROM tasks AS t JOIN deliveries AS d ON d.id = t.last_delivery_id"
    )
    op.execute("UPDATE tasks SET usage_status = status")


def downgrade() -> None:
    op.execute("DELETE FROM tasks WHERE task_id IS NULL")
    _rebuild_tasks(nullable=False)
    for table in ("task_network", "task_files"):
        op.drop_index(op.f(f"ix_{table}_task_key"), table_name=table)
        op.drop_table(table)
    op.drop_index(op.f("ix_task_events_task_key"), table_name="task_events")
    op.drop_table("task_events")
