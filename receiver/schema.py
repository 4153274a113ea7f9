"""The result-table catalog: names, DDL and schema evolution.

Every result table and column is listed in ``result_tables`` /
``result_columns`` with the hook, JSON path or CSV header it came from, so
sanitised names never lose what they stand for. Evolution only ever adds:
a new key adds a column, a value that does not fit its column's type goes
to a variant column ``<name>__v_<type>``. On PostgreSQL, a per-hook
transaction-level advisory lock serialises the loads of one hook (so an
``ALTER TABLE`` never waits on a load that itself waits for the DDL lock), and
DDL happens under one global advisory lock so that several receivers evolving
one table at once queue up instead of failing. On SQLite, ``BEGIN IMMEDIATE``
already serialises writers.

A hook's JSON Schema (`declare`) creates tables and typed columns up front,
walking the schema exactly as `rows.flatten` walks a document, so the first
payload finds its columns already there. A registered CSV column list creates
the table; its columns are created by the first delivery, in the registered
order and with the names `csvparse` gives them, because only data can tell
an integer column from a text one (a column made TEXT up front would send
every number to a variant column).
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

from receiver.columns import ColumnType, sanitise_identifier, unique_identifier
from receiver.db import (
    add_columns,
    adds_columns_at_once,
    insert_for,
    lock_transaction,
    max_columns,
    text_holds_nul,
    utcnow,
)
from receiver.models import ResultColumn, ResultTable
from receiver.rows import VALUE_KEY, FlatColumn, FlatTable, Key, column_name

PREFIX = "results__"
MAX_TABLE_NAME = 63
_DDL_LOCK = 0x5EB7_0001
#: First key of the two-key advisory locks taken per hook (a key space apart from _DDL_LOCK).
_HOOK_LOCK = 0x5EB7
#: Keys of the per-transaction state `_held` keeps in ``Connection.info``.
_HOOKS_HELD = "receiver.hooks_locked"
_CATALOGS = "receiver.catalogs"

SQL_TYPES: dict[ColumnType, TypeEngine[Any]] = {
    ColumnType.INTEGER: BigInteger(),
    ColumnType.FLOAT: Float(),
    ColumnType.BOOLEAN: Boolean(),
    ColumnType.DATE: Date(),
    ColumnType.TIMESTAMP: DateTime(timezone=True),
    ColumnType.TEXT: Text(),
    ColumnType.JSON: Text(),
}

#: Columns every result table has; payload columns can never start with "_".
SYSTEM_COLUMNS: tuple[tuple[str, TypeEngine[Any]], ...] = (
    ("_delivery_id", Text()),
    ("_row_index", Integer()),
    ("_parent_index", Integer()),
    ("_list_index", Integer()),
    ("_session_id", Text()),
    ("_task_id", Text()),
    ("_received_at", DateTime(timezone=True)),
)

#: Columns added on demand for rows that did not parse cleanly (CSV repair, ragged rows).
ROW_NOTES: dict[str, ColumnType] = {
    "_flag": ColumnType.TEXT,
    "_raw": ColumnType.TEXT,
    "_extra": ColumnType.JSON,
    "_originals": ColumnType.JSON,
}


#: Keys past a table's column limit (`receiver.db.max_columns`) go, each under its original
#: name, into this JSON column of the row.
OVERFLOW_COLUMN = "_overflow"
#: SQLite: adding this many columns or more to a table of at most this many rows rebuilds
#: it in one copy instead of one ALTER per column.
SQLITE_REBUILD_COLUMNS = 32
SQLITE_REBUILD_ROWS = 100_000
OVERFLOW_KEY = json.dumps([["#row-note"], OVERFLOW_COLUMN])
#: How a key that went to the overflow column is named in `TableInfo.columns`: no SQL
#: identifier starts with NUL, so it can never be taken for a real column.
OVERFLOW_MARK = "\x00"


def is_overflow(name: str) -> bool:
    return name.startswith(OVERFLOW_MARK)


@dataclass
class TableInfo:
    name: str
    hook: str
    identity: str
    parent_table: str | None
    #: source key (JSON text) -> (column name, type)
    columns: dict[str, tuple[str, ColumnType]] = field(default_factory=dict)

    def sqla_table(self) -> Table:
        """A Core `Table` for inserts, with the system and catalogued columns."""
        return result_table(
            self.name, tuple(c for c in self.columns.values() if not is_overflow(c[0]))
        )

    def real_columns(self) -> int:
        return len(SYSTEM_COLUMNS) + sum(1 for n, _ in self.columns.values() if not is_overflow(n))


@functools.lru_cache(maxsize=1024)
def result_table(name: str, columns: tuple[tuple[str, ColumnType], ...] = ()) -> Table:
    """The Core `Table` for a result table with these payload columns.

    Cached, so one table shape is one object and SQLAlchemy's compiled-SQL
    cache can serve every delivery after the first.
    """
    cols = [Column(n, type_) for n, type_ in SYSTEM_COLUMNS]
    cols += [Column(n, SQL_TYPES[t]) for n, t in columns]
    return Table(name, MetaData(), *cols)


def fits(value: object, column_type: ColumnType) -> bool:
    """Whether ``value`` can be stored in a ``column_type`` column without any loss."""
    import datetime as dt

    if value is None:
        return True
    match column_type:
        case ColumnType.INTEGER:
            return isinstance(value, int) and not isinstance(value, bool)
        case ColumnType.FLOAT:
            if isinstance(value, bool):
                return False
            return isinstance(value, float) or (isinstance(value, int) and abs(value) <= 2**53)
        case ColumnType.BOOLEAN:
            return isinstance(value, bool)
        case ColumnType.TIMESTAMP:
            return isinstance(value, dt.datetime)
        case ColumnType.DATE:
            return isinstance(value, dt.date) and not isinstance(value, dt.datetime)
        case _:
            return isinstance(value, str)


def source_key(parts: tuple[str, ...] | list[str]) -> str:
    return json.dumps(list(parts), ensure_ascii=False)


def table_identity(path: tuple[str, ...], parent_path: tuple[str, ...] | None) -> str:
    return json.dumps([None if parent_path is None else list(parent_path), list(path)])


def lock_hook(conn: Connection, hook: str) -> None:
    """Hold ``hook``'s load lock until the transaction ends (`receiver.db.lock_transaction`).

    Without it, a load that has deleted rows (holding a lock on the table)
    and waits for the DDL lock deadlocks with a load that holds the DDL lock
    and waits to ``ALTER`` that table. Re-entrant within a transaction; free
    when `lock_hooks` already took it for this transaction.
    """
    if hook in _held(conn, _HOOKS_HELD, set):
        return
    objid = zlib.crc32(hook.encode("utf-8", "surrogatepass")) - 2**31  # into int4
    lock_transaction(conn, _HOOK_LOCK, objid)


def lock_hooks(conn: Connection, hooks: Iterable[str]) -> None:
    """Take the load locks of ``hooks`` for the whole transaction, in a fixed order.

    Taken outside any savepoint, so a savepoint rolled back cannot release them,
    and later `lock_hook` calls in this transaction cost no round trip. The
    sorted order keeps two processes locking several hooks from deadlocking.
    """
    ordered = sorted(set(hooks))
    for hook in ordered:
        lock_hook(conn, hook)
    _held(conn, _HOOKS_HELD, set).update(ordered)


def catalog_for(conn: Connection, hook: str) -> Catalog:
    """``hook``'s catalog, read once per transaction and shared by the loads in it.

    `forget_catalogs` must follow a rolled-back savepoint: what the catalog
    learnt or created inside it (tables, columns, the DDL lock) is undone.
    """
    catalogs: dict[str, Catalog] = _held(conn, _CATALOGS, dict)
    catalog = catalogs.get(hook)
    if catalog is None:
        catalog = catalogs[hook] = Catalog(conn, hook)
    return catalog


def forget_catalogs(conn: Connection) -> None:
    conn.info.pop(_CATALOGS, None)


def _held(conn: Connection, key: str, empty: Callable[[], Any]) -> Any:
    """Per-transaction state kept on the connection, made afresh for each transaction."""
    transaction = conn.get_transaction()
    entry = conn.info.get(key)
    if entry is None or entry[0] is not transaction:
        entry = conn.info[key] = (transaction, empty())
    return entry[1]


class Catalog:
    """The catalogued tables of one hook, read and extended inside a transaction."""

    def __init__(self, conn: Connection, hook: str) -> None:
        self.conn = conn
        self.hook = hook
        #: Text cannot hold NUL here (PostgreSQL): `receiver.results` checks values for it.
        self.pg = not text_holds_nul(conn)
        self._locked = False
        #: Tables this transaction created: on SQLite, still empty ones are made anew
        #: with all their columns in one CREATE TABLE (`columns`).
        self._created: set[str] = set()
        lock_hook(conn, hook)
        self.tables: dict[str, TableInfo] = {}
        self._load()

    def _load(self) -> None:
        self.tables = {}
        by_name: dict[str, TableInfo] = {}
        for t in self.conn.execute(
            select(ResultTable.__table__).where(ResultTable.hook == self.hook)
        ):
            info = TableInfo(t.table_name, t.hook, t.path, t.parent_table)
            self.tables[t.path] = info
            by_name[t.table_name] = info
        if by_name:
            rows = self.conn.execute(
                select(ResultColumn.__table__)
                .where(ResultColumn.table_name.in_(list(by_name)))
                .order_by(ResultColumn.table_name, ResultColumn.position)
            )
            for c in rows:
                by_name[c.table_name].columns[c.source_key] = (c.column_name, ColumnType(c.type))

    def _lock(self) -> None:
        """Serialise DDL across processes, then re-read what others may have added."""
        if self._locked:
            return
        lock_transaction(self.conn, _DDL_LOCK)
        self._locked = True
        self._load()

    def table(
        self, path: tuple[str, ...], parent_path: tuple[str, ...] | None, parent: TableInfo | None
    ) -> TableInfo:
        """The table for ``path`` under ``parent_path``, created when first seen."""
        identity = table_identity(path, parent_path)
        info = self.tables.get(identity)
        if info is not None:
            return info
        self._lock()
        info = self.tables.get(identity)
        if info is not None:
            return info
        name = self._new_table_name(path, parent)
        info = TableInfo(name, self.hook, identity, parent.name if parent else None)
        table = info.sqla_table()
        table.append_constraint(_pk(name))
        table.create(self.conn, checkfirst=True)
        self._created.add(name)
        self.conn.execute(
            insert_for(self.conn)(ResultTable)
            .values(
                table_name=name,
                hook=self.hook,
                path=identity,
                parent_table=info.parent_table,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing()
        )
        self.tables[identity] = info
        return info

    def _new_table_name(self, path: tuple[str, ...], parent: TableInfo | None) -> str:
        if parent is None:
            base = PREFIX + sanitise_identifier(self.hook, fallback="hook")
        else:
            base = "__".join([parent.name, *(sanitise_identifier(p) for p in path[-1:])])
        if len(base) > MAX_TABLE_NAME - 4:
            digest = hashlib.sha256(json.dumps([self.hook, list(path)]).encode()).hexdigest()[:8]
            base = f"{base[: MAX_TABLE_NAME - 13].rstrip('_')}_{digest}"
        taken = set(self.conn.scalars(select(ResultTable.table_name)))
        name = base
        n = 2
        while name in taken:
            name = f"{base}_{n}"
            n += 1
        return name

    def column(self, table: TableInfo, key: str, suggested: str, type_: ColumnType) -> str:
        """The column for source ``key`` in ``table``, added when first seen."""
        found = table.columns.get(key)
        if found is not None:
            return found[0]
        self._lock()
        # The reload replaced the TableInfo objects; keep the caller's in step.
        fresh = self.tables[table.identity]
        if fresh is not table:
            table.columns = fresh.columns
        found = table.columns.get(key)
        if found is not None:
            return found[0]
        if key != OVERFLOW_KEY and table.real_columns() >= max_columns(self.conn) - 1:
            # The table is full: the key's values go to the row's overflow column.
            self.column(table, OVERFLOW_KEY, OVERFLOW_COLUMN, ColumnType.JSON)
            table.columns[key] = (OVERFLOW_MARK + key, type_)
            return OVERFLOW_MARK + key
        taken = {name for name, _ in table.columns.values()} | {n for n, _ in SYSTEM_COLUMNS}
        name = unique_identifier(suggested, taken)
        add_column(self.conn, table.name, name, type_)
        self.conn.execute(
            insert_for(self.conn)(ResultColumn)
            .values(
                table_name=table.name,
                column_name=name,
                source_key=key,
                type=type_.value,
                position=len(table.columns),
            )
            .on_conflict_do_nothing()
        )
        table.columns[key] = (name, type_)
        self.tables[table.identity] = table
        return name

    def columns(self, table: TableInfo, specs: list[tuple[str, str, ColumnType]]) -> None:
        """Add the columns of many new source keys ``(key, suggested name, type)`` at once.

        One DDL statement per table, not one per column (``ALTER TABLE`` per key made a
        2,000-key object take tens of seconds and held the write lock meanwhile):
        PostgreSQL adds them in one ``ALTER TABLE``; on SQLite, which adds one column per
        ``ALTER``, a table this transaction created and still empty is made anew with all
        of them in one ``CREATE TABLE``. Keys past the column limit go to the overflow.
        """
        missing = [spec for spec in dict.fromkeys(specs) if spec[0] not in table.columns]
        if len({key for key, _, _ in missing}) < 2:
            for spec in missing:
                self.column(table, *spec)
            return
        self._lock()
        fresh = self.tables[table.identity]
        if fresh is not table:
            table.columns = fresh.columns
        first: dict[str, tuple[str, str, ColumnType]] = {}
        for spec in missing:
            if spec[0] not in table.columns:
                first.setdefault(spec[0], spec)
        missing = list(first.values())
        room = max(0, max_columns(self.conn) - 1 - table.real_columns())
        fitting, rest = missing[:room], missing[room:]
        taken = {name for name, _ in table.columns.values()} | {n for n, _ in SYSTEM_COLUMNS}
        added: list[tuple[str, str, ColumnType]] = []
        for key, suggested, type_ in fitting:
            name = unique_identifier(suggested, taken)
            taken.add(name)
            added.append((key, name, type_))
        if added:
            self._add_columns(table, [(name, type_) for _, name, type_ in added])
            start = len(table.columns)
            self.conn.execute(
                insert_for(self.conn)(ResultColumn).on_conflict_do_nothing(),
                [
                    {
                        "table_name": table.name,
                        "column_name": name,
                        "source_key": key,
                        "type": type_.value,
                        "position": start + i,
                    }
                    for i, (key, name, type_) in enumerate(added)
                ],
            )
            for key, name, type_ in added:
                table.columns[key] = (name, type_)
            self.tables[table.identity] = table
        for spec in rest:
            self.column(table, *spec)

    def _add_columns(self, table: TableInfo, new: list[tuple[str, ColumnType]]) -> None:
        typed = [(n, SQL_TYPES[t]) for n, t in new]
        if adds_columns_at_once(self.conn):
            add_columns(self.conn, table.name, typed)
            return
        # One column per ALTER (SQLite): a table still empty, or small, is made anew wider.
        name = self.conn.dialect.identifier_preparer.quote(table.name)
        real = [c for c in table.columns.values() if not is_overflow(c[0])]
        empty = self.conn.execute(text(f"SELECT 1 FROM {name} LIMIT 1")).first() is None
        if table.name in self._created and empty:
            whole = result_table(table.name, (*real, *new)).to_metadata(MetaData())
            whole.append_constraint(_pk(table.name))
            self.conn.execute(text(f"DROP TABLE {name}"))
            whole.create(self.conn)
            return
        few_rows = (
            self.conn.execute(
                text(f"SELECT 1 FROM {name} LIMIT 1 OFFSET {SQLITE_REBUILD_ROWS}")
            ).first()
            is None
        )
        if len(new) >= SQLITE_REBUILD_COLUMNS and few_rows:
            # One ALTER per column re-reads the whole schema each time (5 ms a column at
            # a thousand columns): copying a small table into its wider self is faster.
            savepoint = self.conn.begin_nested()
            try:
                self._rebuild_sqlite(table, real, new)
                savepoint.commit()
                return
            except DBAPIError:  # e.g. a view of the user's that names the table
                savepoint.rollback()
        add_columns(self.conn, table.name, typed)  # one ALTER per column

    def _rebuild_sqlite(
        self,
        table: TableInfo,
        real: list[tuple[str, ColumnType]],
        new: list[tuple[str, ColumnType]],
    ) -> None:
        """SQLite's own recipe for a change ALTER cannot make in one go: create the wider
        table, copy the rows, drop the old one, take its name."""
        quote = self.conn.dialect.identifier_preparer.quote
        wider_name = f"{table.name[:50]}__wider"
        wider = result_table(wider_name, (*real, *new)).to_metadata(MetaData())
        wider.append_constraint(_pk(table.name))
        wider.create(self.conn)
        kept = ", ".join(quote(c) for c in [*(n for n, _ in SYSTEM_COLUMNS), *(n for n, _ in real)])
        self.conn.execute(
            text(f"INSERT INTO {quote(wider_name)} ({kept}) SELECT {kept} FROM {quote(table.name)}")
        )
        self.conn.execute(text(f"DROP TABLE {quote(table.name)}"))
        self.conn.execute(text(f"ALTER TABLE {quote(wider_name)} RENAME TO {quote(table.name)}"))


def _pk(table_name: str) -> PrimaryKeyConstraint:
    return PrimaryKeyConstraint("_delivery_id", "_row_index", name=f"pk_{table_name}"[:63])


def add_column(conn: Connection, table: str, column: str, type_: ColumnType) -> None:
    """``ALTER TABLE ADD COLUMN``, tolerating a column another process added first."""
    add_columns(conn, table, [(column, SQL_TYPES[type_])])


# --------------------------------------------------------------------------- declared schemas

_SCALARS: dict[str, ColumnType] = {
    "string": ColumnType.TEXT,
    "number": ColumnType.FLOAT,
    "integer": ColumnType.INTEGER,
    "boolean": ColumnType.BOOLEAN,
}


def declare(conn: Connection, hook: str, schema: Any, *, max_depth: int) -> list[str]:
    """Create the result tables (and, for JSON, columns) a registered schema promises.

    Returns the names of the hook's tables touched. Only adds: a column that
    exists with another type keeps it, and misfits go to variant columns.
    """
    catalog = Catalog(conn, hook)
    if isinstance(schema, list):
        return [catalog.table((), None, None).name]
    infos: dict[Key, TableInfo] = {}
    for flat in json_schema_tables(schema, max_depth=max_depth):
        parent = infos.get(flat.parent_path) if flat.parent_path is not None else None
        info = catalog.table(flat.path, flat.parent_path, parent)
        infos[flat.path] = info
        for column in flat.columns.values():
            catalog.column(info, source_key(column.key), column.name, column.type)
    return [info.name for info in infos.values()]


def json_schema_tables(schema: Any, *, max_depth: int) -> list[FlatTable]:
    """The tables and typed columns `rows.flatten` would make from documents fitting ``schema``.

    string, number, integer, boolean map to TEXT, FLOAT, INTEGER, BOOLEAN;
    objects flatten into ``a__b`` columns, arrays become child tables (a
    scalar item is the child's ``value`` column), containers past
    ``max_depth`` become JSON columns. Whatever the schema leaves open (no
    ``type``, several types, ``additionalProperties``) is left to the data.
    """
    return _SchemaWalker(schema, max_depth).run()


class _SchemaWalker:
    def __init__(self, schema: Any, max_depth: int) -> None:
        self.root = schema
        self.max_depth = max_depth
        self.tables: dict[tuple[Key | None, Key], FlatTable] = {}

    def table(self, path: Key, parent_path: Key | None) -> FlatTable:
        found = self.tables.get((parent_path, path))
        if found is None:
            found = self.tables[(parent_path, path)] = FlatTable(path, {}, [], parent_path)
        return found

    def run(self) -> list[FlatTable]:
        root = self.table((), None)
        kind, node = self.kind(self.root)
        if kind == "array":
            self.row(root, self.items(node), 1)
        elif kind is not None:
            self.row(root, node, 1)
        return list(self.tables.values())

    def resolve(self, node: Any) -> Any:
        """Follow local ``$ref`` pointers (``#/$defs/x``); a loop or a remote ref gives {}."""
        seen: set[str] = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref: str = node["$ref"]
            if not ref.startswith("#") or ref in seen:
                return {}
            seen.add(ref)
            target: Any = self.root
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    return {}
            node = target
        return node

    def kind(self, node: Any) -> tuple[str | None, Any]:
        """The one non-null JSON type ``node`` allows, with the subschema that says so."""
        node = self.resolve(node)
        if not isinstance(node, dict):
            return None, None
        declared = node.get("type")
        types = [declared] if isinstance(declared, str) else declared
        if isinstance(types, list):
            kinds = {t for t in types if isinstance(t, str) and t != "null"}
            return (kinds.pop(), node) if len(kinds) == 1 else (None, None)
        if "properties" in node:
            return "object", node
        if "items" in node:
            return "array", node
        for union in ("anyOf", "oneOf"):
            branches = node.get(union)
            if isinstance(branches, list):
                found = [k for k in (self.kind(b) for b in branches) if k[0] not in (None, "null")]
                if len(found) == 1:
                    return found[0]
        return None, None

    def items(self, node: Any) -> Any:
        items = node.get("items") if isinstance(node, dict) else None
        return items if isinstance(items, dict) else None

    def row(self, table: FlatTable, node: Any, depth: int) -> None:
        """Mirror of ``_Flattener.row``: one item of ``table`` described by ``node``."""
        kind, node = self.kind(node)
        if kind == "object" and depth <= self.max_depth:
            self.fill(table, (), node, depth)
        elif kind == "array" and depth <= self.max_depth:
            child = self.table(table.path + VALUE_KEY, table.path)
            self.row(child, self.items(node), depth + 1)
        elif kind is not None:
            self.put(table, VALUE_KEY, kind)

    def fill(self, table: FlatTable, prefix: Key, node: Any, level: int) -> None:
        """Mirror of ``_Flattener.fill``: the properties of an object at ``level``."""
        properties = node.get("properties")
        if not isinstance(properties, dict):
            return
        for name, prop in properties.items():
            key = (*prefix, str(name))
            kind, sub = self.kind(prop)
            if kind in ("object", "array") and level + 1 > self.max_depth:
                self.put(table, key, "json")
            elif kind == "object":
                self.fill(table, key, sub, level + 1)
            elif kind == "array":
                child = self.table(table.path + key, table.path)
                self.row(child, self.items(sub), level + 2)
            elif kind is not None:
                self.put(table, key, kind)

    @staticmethod
    def put(table: FlatTable, key: Key, kind: str) -> None:
        column_type = ColumnType.JSON if kind in ("object", "array", "json") else _SCALARS.get(kind)
        if column_type is not None and key not in table.columns:
            table.columns[key] = FlatColumn(key, column_name(key), column_type)
