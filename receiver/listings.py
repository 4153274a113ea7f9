"""Read-only queries behind every listing: `receiver ... list|show` and the web console.

One function per question, returning plain rows, so the CLI and the console
answer the same question the same way. Deliveries page by keyset on their
UUIDv7 ids (they sort by arrival, so "newer than a time" is "an id above a
bound" on the primary key); nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    and_,
    func,
    or_,
    select,
)

from receiver.columns import ColumnType
from receiver.db import bytes_contain, json_text
from receiver.models import Delivery, Output, ResultColumn, ResultTable, Task
from receiver.schema import result_table
from receiver.states import DeliveryStatus

#: A row of a listing, read by column name.
Record = Row[*tuple[Any, ...]]


class NotFound(LookupError):
    """No row has this id (or id prefix)."""


class Ambiguous(LookupError):
    """An id prefix names more than one row."""


_ID_PREFIX = re.compile(r"^[0-9a-f-]{1,36}$")


#: A delivery's id is made just before its ``received_at`` is read (and a spooled one keeps
#: both), so an id bound taken this much early never leaves out a delivery the exact
#: ``received_at`` condition keeps: the bound only lets the primary key do the narrowing.
ID_SLACK = dt.timedelta(seconds=1)


def id_floor(when: dt.datetime) -> str:
    """The smallest UUIDv7 of ``when``'s millisecond, as `receiver.ledger` makes them."""
    millis = int(when.timestamp() * 1000) & ((1 << 48) - 1)
    h = f"{millis:012x}"
    return f"{h[:8]}-{h[8:12]}-7000-8000-000000000000"


def received_since(when: dt.datetime) -> Any:
    """``received_at >= when``, with an id bound the primary key can answer."""
    return and_(Delivery.id >= id_floor(when - ID_SLACK), Delivery.received_at >= when)


def received_before(when: dt.datetime) -> Any:
    """``received_at < when``, with an id bound the primary key can answer."""
    return and_(Delivery.id < id_floor(when + ID_SLACK), Delivery.received_at < when)


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a listing shows; every field is optional and they combine with AND."""

    hook: str | None = None
    status: DeliveryStatus | None = None
    kind: str | None = None
    output_type: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    session_id: str | None = None
    task_id: str | None = None
    #: ``(key, value)`` of a query-string label.
    label: tuple[str, str] | None = None
    #: Bytes the raw body must contain (a scan within the other filters).
    text: str | None = None
    #: Exactly this quarantine reason.
    reason: str | None = None

    def apply(self, query: Select[*tuple[Any, ...]], engine: Engine) -> Select[*tuple[Any, ...]]:
        conditions: list[Any] = []
        for column, value in (
            (Delivery.hook, self.hook),
            (Delivery.status, self.status and self.status.value),
            (Delivery.kind, self.kind),
            (Delivery.output_type, self.output_type),
            (Delivery.session_id, self.session_id),
            (Delivery.task_id, self.task_id),
            (Delivery.reason, self.reason),
        ):
            if value:
                conditions.append(column == value)
        if self.since is not None:
            conditions.append(received_since(self.since))
        if self.until is not None:
            conditions.append(received_before(self.until))
        if self.label is not None:
            key, value = self.label
            conditions.append(json_text(engine, Delivery.labels, key) == value)
        if self.text:
            conditions.append(bytes_contain(engine, Delivery.body, self.text.encode("utf-8")))
        return query.where(*conditions)


#: The columns of a delivery listing (no body, no headers).
DELIVERY_SUMMARY = (
    Delivery.id,
    Delivery.hook,
    Delivery.received_at,
    Delivery.status,
    Delivery.kind,
    Delivery.output_type,
    Delivery.body_size,
    Delivery.session_id,
    Delivery.task_id,
    Delivery.reason,
)


def list_deliveries(
    engine: Engine,
    where: DeliveryFilter = DeliveryFilter(),
    *,
    limit: int = 50,
    before: str | None = None,
) -> list[Record]:
    """The newest deliveries matching ``where``; ``before`` (an id) gives the next page."""
    query = select(*DELIVERY_SUMMARY).order_by(Delivery.id.desc()).limit(limit)
    if before:
        query = query.where(Delivery.id < before)
    query = where.apply(query, engine)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def resolve_delivery_id(conn: Connection, prefix: str) -> str:
    """The one delivery id starting with ``prefix`` (case-insensitive)."""
    prefix = prefix.strip().lower()
    if not _ID_PREFIX.match(prefix):
        raise NotFound(f"no delivery {prefix!r}: an id is hexadecimal digits and dashes")
    if len(prefix) == 36:
        found = list(conn.scalars(select(Delivery.id).where(Delivery.id == prefix)))
    else:
        found = list(
            conn.scalars(
                select(Delivery.id)
                .where(Delivery.id >= prefix, Delivery.id < prefix + "g")
                .order_by(Delivery.id)
                .limit(3)
            )
        )
    if not found:
        raise NotFound(f"no delivery {prefix}")
    if len(found) > 1:
        shown = ", ".join(found[:2]) + (", ..." if len(found) > 2 else "")
        raise Ambiguous(f"{prefix} is the start of several delivery ids: {shown}")
    return found[0]


@dataclass
class ResultRows:
    """A result table's rows made from one delivery."""

    table: str
    columns: list[str]
    rows: list[tuple[Any, ...]]


@dataclass
class DeliveryDetail:
    """One delivery and everything made from it."""

    delivery: Record
    output: Record | None
    task: Record | None
    results: list[ResultRows] = field(default_factory=list)

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(str(k), str(v)) for k, v in json.loads(self.delivery.headers or "[]")]

    @property
    def labels(self) -> dict[str, Any]:
        labels: dict[str, Any] = json.loads(self.delivery.labels or "{}")
        return labels


def delivery_detail(engine: Engine, prefix: str, *, result_rows: int = 100) -> DeliveryDetail:
    """One delivery by id or unique id prefix, with its output, task and result rows."""
    with engine.connect() as conn:
        delivery_id = resolve_delivery_id(conn, prefix)
        row = conn.execute(select(Delivery.__table__).where(Delivery.id == delivery_id)).one()
        output = conn.execute(
            select(Output.__table__).where(Output.delivery_id == delivery_id)
        ).first()
        task = None
        if row.task_id is not None:
            task = conn.execute(
                select(Task.__table__).where(
                    Task.task_id == row.task_id,
                    Task.hook == row.hook,
                    Task.session_id.is_(None)
                    if row.session_id is None
                    else Task.session_id == row.session_id,
                )
            ).first()
        detail = DeliveryDetail(row, output, task)
        for info in _tables(conn, hook=row.hook):
            table = _read_table(info)
            rows = conn.execute(
                select(table)
                .where(table.c._delivery_id == delivery_id)
                .order_by(table.c._row_index)
                .limit(result_rows)
            ).all()
            if rows:
                detail.results.append(
                    ResultRows(info.name, list(table.c.keys()), [tuple(r) for r in rows])
                )
    return detail


@dataclass(frozen=True)
class QuarantineGroup:
    """Quarantined deliveries of one hook sharing one reason."""

    hook: str
    reason: str | None
    deliveries: int
    first_seen: dt.datetime
    last_seen: dt.datetime


def quarantine_groups(engine: Engine) -> list[QuarantineGroup]:
    """Quarantined deliveries grouped by hook and reason, most recent first."""
    query = (
        select(
            Delivery.hook,
            Delivery.reason,
            func.count().label("deliveries"),
            func.min(Delivery.received_at).label("first_seen"),
            func.max(Delivery.received_at).label("last_seen"),
        )
        .where(Delivery.status == DeliveryStatus.QUARANTINED.value)
        .group_by(Delivery.hook, Delivery.reason)
    )
    with engine.connect() as conn:
        groups = [QuarantineGroup(*r) for r in conn.execute(query)]
    return sorted(groups, key=lambda g: g.last_seen, reverse=True)


# --- tasks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    hook: str | None = None
    since: dt.datetime | None = None


TASK_SUMMARY = (
    Task.task_key,
    Task.session_id,
    Task.task_id,
    Task.hook,
    Task.status,
    Task.output_type,
    Task.input_tokens,
    Task.output_tokens,
    Task.total_tokens,
    Task.compute_time_s,
    Task.cost_usd,
    Task.error_code,
    Task.first_seen_at,
    Task.last_delivery_id,
)


def list_tasks(
    engine: Engine,
    where: TaskFilter = TaskFilter(),
    *,
    limit: int = 50,
    before: tuple[dt.datetime, str] | None = None,
) -> list[Record]:
    """The most recently first-seen tasks; ``before`` (first_seen_at, task_key) pages on."""
    query = select(*TASK_SUMMARY).order_by(Task.first_seen_at.desc(), Task.task_key.desc())
    if where.status:
        query = query.where(Task.status == where.status)
    if where.hook:
        query = query.where(Task.hook == where.hook)
    if where.since is not None:
        query = query.where(Task.first_seen_at >= where.since)
    if before is not None:
        seen, key = before
        query = query.where(
            or_(Task.first_seen_at < seen, and_(Task.first_seen_at == seen, Task.task_key < key))
        )
    with engine.connect() as conn:
        return list(conn.execute(query.limit(limit)).all())


def find_task(engine: Engine, first: str, task_id: str | None = None) -> Record:
    """A task by ``SESSION_ID TASK_ID``, or by one argument: its task id or a unique prefix
    of it (or of its session id)."""
    with engine.connect() as conn:
        table = Task.__table__
        if task_id is not None:
            found = conn.execute(
                select(table).where(Task.session_id == first, Task.task_id == task_id).limit(2)
            ).all()
            if not found:
                raise NotFound(f"no task {task_id} in session {first}")
            return found[0]
        found = conn.execute(select(table).where(Task.task_id == first).limit(3)).all()
        if not found:
            pattern = _like_prefix(first)
            found = conn.execute(
                select(table)
                .where(
                    or_(
                        Task.task_id.like(pattern, escape="\\"),
                        Task.session_id.like(pattern, escape="\\"),
                    )
                )
                .limit(3)
            ).all()
        if not found:
            raise NotFound(f"no task {first}")
        if len(found) > 1:
            shown = ", ".join(f"{r.session_id} {r.task_id}" for r in found[:2])
            raise Ambiguous(f"{first} names several tasks: {shown}; give SESSION_ID TASK_ID")
        return found[0]


def task_by_ids(engine: Engine, session_id: str | None, task_id: str) -> Record:
    """The task of exactly this session (None: a task no delivery gave a session) and id."""
    session = Task.session_id.is_(None) if session_id is None else Task.session_id == session_id
    with engine.connect() as conn:
        row = conn.execute(select(Task.__table__).where(session, Task.task_id == task_id)).first()
    if row is None:
        raise NotFound(f"no task {task_id}" + (f" in session {session_id}" if session_id else ""))
    return row


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def task_deliveries(engine: Engine, task: Record, *, limit: int = 500) -> list[Record]:
    """The deliveries that spoke of ``task``, oldest first: its timeline."""
    query = (
        select(*DELIVERY_SUMMARY)
        .where(Delivery.task_id == task.task_id, Delivery.hook == task.hook)
        .order_by(Delivery.id)
        .limit(limit)
    )
    if task.session_id is not None:
        query = query.where(
            or_(Delivery.session_id == task.session_id, Delivery.session_id.is_(None))
        )
    with engine.connect() as conn:
        return list(conn.execute(query).all())


# --- result tables ---------------------------------------------------------------------


@dataclass
class ColumnInfo:
    name: str
    type: str
    #: The key as written in the payload, as ``a.b`` text.
    source: str
    #: What a special source key means, for a reader who has not met it ("" when plain).
    note: str = ""


@dataclass
class TableListing:
    name: str
    hook: str
    path: str
    parent_table: str | None
    created_at: dt.datetime
    columns: list[ColumnInfo] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


def source_text(key: Any) -> str:
    """A catalogued source key (a JSON path, nested for variants) as ``a.b.#variant:text``."""
    if isinstance(key, list):
        return ".".join(source_text(part) for part in key)
    return str(key)


def path_text(identity: str) -> str:
    """A table's catalogued ``[parent path, path]`` as words: where in the output its rows are."""
    try:
        _, path = json.loads(identity)
    except (ValueError, TypeError):
        return identity
    if not path:
        return "the output itself"
    return "each item of " + ".".join(source_text(p) for p in path)


def source_note(key: Any) -> str:
    """Why a column's source key is not a plain payload key, in words."""
    flat = source_text(key)
    if "#row-note" in flat:
        return "row note: set when a row did not parse cleanly (see README, Behaviour we chose)"
    if "#variant:" in flat:
        kind = flat.rsplit("#variant:", 1)[1]
        return f"variant: values of this key that are {kind}, not the main column's type"
    return ""


def _tables(conn: Connection, *, hook: str | None = None, name: str | None = None) -> list[Any]:
    query = select(ResultTable.__table__).order_by(ResultTable.table_name)
    if hook is not None:
        query = query.where(ResultTable.hook == hook)
    if name is not None:
        query = query.where(ResultTable.table_name == name)
    listings = {
        t.table_name: TableListing(
            t.table_name, t.hook, path_text(t.path), t.parent_table, t.created_at
        )
        for t in conn.execute(query)
    }
    if not listings:
        return []
    columns = conn.execute(
        select(ResultColumn.__table__)
        .where(ResultColumn.table_name.in_(list(listings)))
        .order_by(ResultColumn.table_name, ResultColumn.position)
    )
    for c in columns:
        key = json.loads(c.source_key)
        listings[c.table_name].columns.append(
            ColumnInfo(c.column_name, c.type, source_text(key), source_note(key))
        )
    children = conn.execute(
        select(ResultTable.table_name, ResultTable.parent_table).where(
            ResultTable.parent_table.in_(list(listings))
        )
    )
    for child, parent in children:
        listings[parent].children.append(child)
    return list(listings.values())


def list_tables(
    engine: Engine, *, since: dt.datetime | None = None, limit: int | None = None
) -> list[TableListing]:
    """Result tables by name (made at or after ``since``), with their columns and children."""
    with engine.connect() as conn:
        tables: list[TableListing] = _tables(conn)
    if since is not None:
        tables = [t for t in tables if _aware(t.created_at) >= since]
    return tables if limit is None else tables[:limit]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def table_listing(engine: Engine, name: str) -> TableListing:
    """One result table, by its exact name (a catalogued one only: names come from URLs)."""
    with engine.connect() as conn:
        found = _tables(conn, name=name)
    if not found:
        raise NotFound(f"no result table {name}")
    listing: TableListing = found[0]
    return listing


def _read_table(info: TableListing) -> Any:
    return result_table(info.name, tuple((c.name, ColumnType(c.type)) for c in info.columns))


def table_rows(
    engine: Engine,
    info: TableListing,
    *,
    limit: int = 50,
    after: tuple[str, int] | None = None,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A page of ``info``'s rows in key order; ``after`` (delivery id, row index) pages on."""
    table = _read_table(info)
    query = select(table).order_by(table.c._delivery_id, table.c._row_index).limit(limit)
    if after is not None:
        delivery_id, row_index = after
        query = query.where(
            or_(
                table.c._delivery_id > delivery_id,
                and_(table.c._delivery_id == delivery_id, table.c._row_index > row_index),
            )
        )
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
    return list(table.c.keys()), rows


def iter_table_rows(engine: Engine, info: TableListing, *, batch: int = 1000) -> Any:
    """Every row of ``info``, in batches of key order (for downloads): yields the column names
    first, then row tuples."""
    columns: list[str] | None = None
    after: tuple[str, int] | None = None
    while True:
        names, rows = table_rows(engine, info, limit=batch, after=after)
        if columns is None:
            columns = names
            yield columns
        yield from rows
        if len(rows) < batch:
            return
        after = (rows[-1][0], rows[-1][1])


# --- the overview ----------------------------------------------------------------------


@dataclass
class Overview:
    """The numbers an operator looks at first."""

    today: dict[str, int]
    last_hour: dict[str, int]
    backlog: int
    quarantined: int
    latest: list[Record]


def overview(engine: Engine, *, now: dt.datetime | None = None, latest: int = 10) -> Overview:
    """Deliveries today (UTC) and in the last hour by status, the backlog, the quarantined
    count and the latest deliveries."""
    now = now or dt.datetime.now(dt.UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def by_status(conn: Connection, since: dt.datetime) -> dict[str, int]:
        # Grouped by an expression, not the column: else SQLite scans ix_deliveries_status
        # (every delivery, 530 ms at 1M) instead of the id range (today's only).
        status = func.coalesce(Delivery.status, "")
        query = select(status, func.count()).where(received_since(since)).group_by(status)
        return {status: int(count) for status, count in conn.execute(query)}

    def count(conn: Connection, status: DeliveryStatus) -> int:
        query = select(func.count()).where(Delivery.status == status.value)
        return int(conn.scalar(query) or 0)

    with engine.connect() as conn:
        today = by_status(conn, midnight)
        last_hour = by_status(conn, now - dt.timedelta(hours=1))
        backlog = count(conn, DeliveryStatus.STORED)
        quarantined = count(conn, DeliveryStatus.QUARANTINED)
    return Overview(today, last_hour, backlog, quarantined, list_deliveries(engine, limit=latest))


# --- costs beyond the rollup's groupings -------------------------------------------------


def failed_cost_by_error(engine: Engine, *, since: dt.date | None = None) -> list[Record]:
    """Failed tasks per error code: how many, how many of unknown cost, and the known cost."""
    query = select(
        Task.error_code,
        func.count().label("tasks"),
        (func.count() - func.count(Task.cost_usd)).label("tasks_unknown_cost"),
        func.sum(Task.cost_usd).label("cost_usd"),
    )
    query = query.where(Task.status == "failed").group_by(Task.error_code)
    if since is not None:
        start = dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)
        query = query.where(Task.first_seen_at >= start)
    with engine.connect() as conn:
        return sorted(conn.execute(query).all(), key=lambda r: -r.tasks)


def top_labels(engine: Engine, *, since: dt.date | None = None, limit: int = 10) -> list[Record]:
    """The label values with the most known cost, from ``cost_by_label``."""
    from receiver.rollups import cost_by_label, fold

    view = cost_by_label
    query = select(
        view.c.label_key,
        view.c.label_value,
        func.sum(view.c.tasks).label("tasks"),
        func.sum(view.c.tasks_unknown_cost).label("tasks_unknown_cost"),
        func.sum(view.c.cost_usd).label("cost_usd"),
    ).group_by(view.c.label_key, view.c.label_value)
    if since is not None:
        query = query.where(view.c.day >= since)
    fold(engine)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return sorted(rows, key=lambda r: (-(r.cost_usd or 0), -r.tasks))[:limit]


@dataclass(frozen=True)
class HookListing:
    name: str
    output_type: str | None
    own_tokens: int
    deliveries: int
    created_at: dt.datetime


def list_hooks(
    engine: Engine, *, since: dt.datetime | None = None, limit: int | None = None
) -> list[HookListing]:
    """Hooks by name, with their output type, live tokens of their own and deliveries."""
    from receiver.models import Hook, Token

    query = select(Hook.name, Hook.output_type, Hook.created_at).order_by(Hook.name)
    if since is not None:
        query = query.where(Hook.created_at >= since)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        tokens = dict(
            conn.execute(
                select(Token.hook, func.count())
                .where(Token.revoked_at.is_(None))
                .group_by(Token.hook)
            ).all()
        )
        counts = dict(
            conn.execute(select(Delivery.hook, func.count()).group_by(Delivery.hook)).all()
        )
        rows = conn.execute(query).all()
    return [
        HookListing(
            r.name, r.output_type, tokens.get(r.name, 0), counts.get(r.name, 0), r.created_at
        )
        for r in rows
    ]


def hooks(engine: Engine) -> list[str]:
    """Every hook name that has deliveries or is registered (for filter menus)."""
    from receiver.models import Hook

    with engine.connect() as conn:
        names = set(conn.scalars(select(Hook.name)))
    return sorted(names)
