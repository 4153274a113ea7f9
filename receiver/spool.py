"""The local spool: where a delivery goes when the database cannot take it.

A delivery is answered 2xx only once its bytes are on disk. When the ledger
cannot commit, `Spool.append` writes the whole `RawDelivery` to one file
(temporary name, fsync, rename, fsync of the folder), and a `SpoolDrainer`
thread loads the files into the database in arrival order as soon as it is
reachable again. A file is deleted only after its commit; a crash between the
two re-inserts a delivery that is already there, which `write_deliveries`
recognises by its id, so nothing is doubled.

File layout (``<spooled-at ns>-<delivery id>.delivery``)::

    b"RSPOOL1\\n" | meta length (4 bytes, big-endian) | meta (JSON) | body | SHA-256 of all before

A file that fails its checksum is never deleted: it is moved to ``rejected/``
and logged, like a delivery the database refuses for good.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from receiver.db import begin_raw_write
from receiver.errors import SpoolCorrupt, SpoolUnavailable
from receiver.ledger import OnCommitted, RawDelivery, tell_committed, write_deliveries
from receiver.workers import Restarts, supervised

log = logging.getLogger("receiver.spool")

MAGIC = b"RSPOOL1\n"
SUFFIX = ".delivery"
_TMP = ".tmp-"
#: A temporary file older than this was left by a crash before its delivery was answered.
STALE_TMP_SECONDS = 60.0


def encode(delivery: RawDelivery) -> bytes:
    """The bytes of one spool file for ``delivery``."""
    meta = json.dumps(
        {
            "id": delivery.id,
            "hook": delivery.hook,
            "received_at": delivery.received_at.isoformat(),
            "content_type": delivery.content_type,
            "headers": [list(h) for h in delivery.headers],
            "query_string": delivery.query_string,
            "create_hook": delivery.create_hook,
            "body_size": len(delivery.body),
        }
    ).encode("utf-8")
    data = MAGIC + struct.pack(">I", len(meta)) + meta + delivery.body
    return data + hashlib.sha256(data).digest()


def decode(data: bytes) -> RawDelivery:
    """The delivery in a spool file; `SpoolCorrupt` if it is truncated or altered."""
    if len(data) < len(MAGIC) + 4 + 32 or not data.startswith(MAGIC):
        raise SpoolCorrupt("not a spool file or truncated")
    payload, digest = data[:-32], data[-32:]
    if hashlib.sha256(payload).digest() != digest:
        raise SpoolCorrupt("checksum mismatch")
    (meta_len,) = struct.unpack(">I", payload[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    meta: dict[str, Any] = json.loads(payload[start : start + meta_len])
    body = payload[start + meta_len :]
    if len(body) != meta["body_size"]:
        raise SpoolCorrupt("body size mismatch")
    return RawDelivery(
        hook=meta["hook"],
        body=body,
        content_type=meta["content_type"],
        headers=tuple((k, v) for k, v in meta["headers"]),
        query_string=meta["query_string"],
        id=meta["id"],
        received_at=dt.datetime.fromisoformat(meta["received_at"]),
        create_hook=meta["create_hook"],
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """An append-only folder of deliveries waiting for the database. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rejected_dir = directory / "rejected"
        self._lock = threading.Lock()
        self._last_ns = 0
        self.appended = threading.Event()  # set on every append: wakes the drainer

    def append(self, delivery: RawDelivery) -> Path:
        """Make ``delivery`` durable; returns only once file and folder entry are fsynced."""
        with self._lock:  # names sort in append order, even within one clock tick
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            name = f"{self._last_ns:020d}-{delivery.id}{SUFFIX}"
        path = self.directory / name
        tmp = self.directory / f"{_TMP}{name}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(encode(delivery))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise SpoolUnavailable(f"cannot write the spool: {exc.strerror or exc}") from exc
        self.appended.set()
        return path

    def pending(self, limit: int | None = None) -> list[Path]:
        """Spool files in arrival order (oldest first)."""
        try:
            names = sorted(
                e.name
                for e in os.scandir(self.directory)
                if e.name.endswith(SUFFIX) and not e.name.startswith(".")
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self.directory / n for n in names[:limit]]

    def load(self, path: Path) -> RawDelivery:
        return decode(path.read_bytes())

    def remove(self, paths: Sequence[Path]) -> None:
        """Forget deliveries that are committed (another drainer may have got there first)."""
        for p in paths:
            p.unlink(missing_ok=True)
        if paths:
            _fsync_dir(self.directory)

    def reject(self, path: Path, reason: str) -> None:
        """Set a file aside for a human: never deleted, never retried automatically."""
        self.rejected_dir.mkdir(exist_ok=True)
        target = self.rejected_dir / path.name
        os.replace(path, target)
        target.with_name(target.name + ".reason").write_text(reason + "\n")
        _fsync_dir(self.rejected_dir)
        _fsync_dir(self.directory)
        log.error("spool file %s rejected: %s", path.name, reason)

    def remove_stale_temporaries(self) -> int:
        """Delete half-written files left by a crash: their deliveries were never answered."""
        removed = 0
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            entries = list(os.scandir(self.directory))
        except OSError:  # no folder yet, or not a folder: `append` will say so
            return 0
        for e in entries:
            if e.name.startswith(_TMP) and e.stat().st_mtime < cutoff:
                Path(e.path).unlink(missing_ok=True)
                removed += 1
        return removed

    def backlog(self) -> int:
        """How many deliveries wait for the database."""
        return len(self.pending())

    def oldest_age_seconds(self) -> float | None:
        """Seconds since the oldest waiting delivery was spooled; None when empty."""
        oldest = self.pending(limit=1)
        if not oldest:
            return None
        spooled_ns = int(oldest[0].name.split("-", 1)[0])
        return max(0.0, (time.time_ns() - spooled_ns) / 1e9)


class SpoolDrainer:
    """A thread that moves spooled deliveries into the database, oldest first.

    It retries with a growing pause while the database is away. A delivery the
    database refuses for good (a data error on a batch of one, not a lost
    connection) is set aside in ``rejected/`` so it cannot block the rest.
    """

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        *,
        on_committed: OnCommitted | None = None,
        batch_size: int = 64,
        idle_seconds: float = 1.0,
        max_pause_seconds: float = 5.0,
    ) -> None:
        self.spool = spool
        self.engine = engine
        self.on_committed = on_committed
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.max_pause_seconds = max_pause_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._limit = batch_size
        self.restarts = Restarts()

    def alive(self) -> bool:
        """Started and running (or never started)."""
        return self._thread is None or self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self.spool.remove_stale_temporaries()
            target = supervised(self._run, "spool-drainer", self.restarts)
            self._thread = threading.Thread(target=target, name="spool-drainer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in hand and stop; what is left stays on disk for the next start."""
        if self._thread is not None:
            self._stop.set()
            self.spool.appended.set()
            self._thread.join()
            self._thread = None
        self._close()

    def drain_once(self) -> int:
        """Commit the next batch of spooled deliveries; raises if the database refuses."""
        paths = self.spool.pending(limit=self._limit)
        items: list[tuple[Path, RawDelivery]] = []
        for p in paths:
            try:
                items.append((p, self.spool.load(p)))
            except FileNotFoundError:
                continue  # another drainer (a sibling worker) took it
            except SpoolCorrupt as exc:
                self.spool.reject(p, str(exc))
        if not items:
            return 0
        if self._conn is None:
            self._conn = self.engine.raw_connection()
        cursor = self._conn.cursor()
        try:
            begin_raw_write(self.engine, cursor)
            results = write_deliveries(self.engine, cursor, [d for _, d in items])
        except BaseException:
            self._conn.rollback()
            raise
        finally:
            cursor.close()
        self._conn.commit()
        log.info("drained %d spooled deliveries", len(items))
        tell_committed(self.on_committed, [d for _, d in items], results)
        self.spool.remove([p for p, _ in items])
        return len(items)

    def _run(self) -> None:
        pause = 0.0
        while not self._stop.is_set():
            if pause:
                self._stop.wait(pause)
                if self._stop.is_set():
                    return
            try:
                drained = self.drain_once()
            except Exception as exc:
                self._close()
                pause = min(self.max_pause_seconds, max(0.2, pause * 2))
                self._after_failure(exc)
                continue
            pause = 0.0
            self._limit = self.batch_size
            if drained == 0:
                self.spool.appended.wait(self.idle_seconds)
                self.spool.appended.clear()

    def _after_failure(self, exc: Exception) -> None:
        dbapi = self.engine.dialect.dbapi
        transient: tuple[type[BaseException], ...] = (OSError,)
        if dbapi is not None:
            transient += (dbapi.OperationalError, dbapi.InterfaceError)
        if isinstance(exc, transient) or self._limit > 1:
            if self._limit > 1 and not isinstance(exc, transient):
                self._limit = 1  # find the one delivery the database refuses
            log.warning("spool drain failed, will retry: %s", type(exc).__name__)
            return
        head = self.spool.pending(limit=1)
        if head:
            self.spool.reject(head[0], f"database refused it: {type(exc).__name__}")

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the drainer's connection failed", exc_info=True)
            self._conn = None
