"""Export destinations: the folder or URI, its manifest, the commit journal, the lock.

A destination is a local folder or a pyarrow URI (``s3://bucket/prefix``).
``DEST/_manifest.json``, written last by each run, holds each dataset's
watermark and every run's files (format 2: partitions ``date_=``; format 1,
``date=``, is refused). A run that replaces files first writes a journal
(``DEST/.export-journal.json``: its renames, deletions and new manifest),
which `complete_journal` finishes if the run died after writing it; every
step of `apply_plan` can be redone.

A run holds an exclusive lock on ``DEST/.export.lock`` (``flock``) from
reading the manifest to writing it (`destination_lock`), so a second export
to the same local folder fails at once with `DestinationBusy`; the OS drops
the lock when its holder dies, and the next run deletes the temporary files
it left (`delete_temporaries`). Remote destinations are not locked: pyarrow
has no conditional write to build a lock object on.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from receiver.db import utcnow
from receiver.errors import DestinationBusy, ReceiverError

MANIFEST = "_manifest.json"


#: A run's commit plan (renames, deletions, manifest), written before its first rename when it
#: replaces files, and completed by the next run if the run died before finishing it.
JOURNAL = ".export-journal.json"


#: The manifest's format: 2 since partitions are ``date_=`` (1 wrote ``date=``).
FORMAT = 2


#: The Hive partition key: a name no exported column can have (see the module docstring).
PARTITION_KEY = "date_"


#: Held (``flock``) by the run exporting to a local folder; hidden from readers and globs.
LOCK = ".export.lock"


#: A staged file's name (`_Run.stage`, `_Run.write_atomically`): ``.<name>.<run id>.tmp``.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def open_destination(dest: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and root path for a local folder or a URI (``s3://bucket/prefix``)."""

    if "://" in dest:
        fs, path = pafs.FileSystem.from_uri(dest)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(dest)


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any]:
    """The destination's manifest, or an empty one before the first run."""

    path = f"{root}/{MANIFEST}"
    if not exists(fs, path):
        return {"format": FORMAT, "partition_key": PARTITION_KEY, "watermarks": {}, "runs": []}
    with fs.open_input_stream(path) as stream:
        manifest: dict[str, Any] = json.loads(stream.read())
    if manifest.get("format") == 1:
        raise ReceiverError(
            f"{root} holds an export in the old layout (partitions date=..., which hide a result"
            f" column named date from Hive readers); export to a new folder, which gets every"
            f" row again in the current layout ({PARTITION_KEY}=...), and delete the old one"
        )
    if manifest.get("format") != FORMAT:
        raise ReceiverError(f"{path}: manifest format {manifest.get('format')!r} is not {FORMAT}")
    return manifest


def relative(root: str, path: str) -> str:
    return path.removeprefix(root + "/")


def complete_journal(fs: pafs.FileSystem, root: str) -> bool:
    """Finish the commit of a run that died after writing its journal; whether there was one."""

    path = f"{root}/{JOURNAL}"
    if not exists(fs, path):
        return False
    with fs.open_input_stream(path) as stream:
        plan: dict[str, Any] = json.loads(stream.read())
    apply_plan(fs, root, plan, uuid.uuid4().hex[:12])
    return True


def apply_plan(fs: pafs.FileSystem, root: str, plan: dict[str, Any], run_id: str) -> None:
    """Renames, then deletions, then the manifest, then the journal goes: each step redoable."""

    for temporary, final in plan["renames"]:
        source = f"{root}/{temporary}"
        if exists(fs, source):
            fs.move(source, f"{root}/{final}")
        elif not exists(fs, f"{root}/{final}"):
            raise ReceiverError(f"{root}/{JOURNAL}: {temporary} and {final} are both missing")
    delete_replaced(fs, [f"{root}/{p}" for p in plan["deletions"]])
    write_atomically(
        fs, f"{root}/{MANIFEST}", json.dumps(plan["manifest"], indent=2).encode(), run_id
    )
    if plan["deletions"]:
        fs.delete_file(f"{root}/{JOURNAL}")


def delete_replaced(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete the files rewritten days replaced (already gone: deleted by an earlier try)."""

    for path in paths:
        if exists(fs, path):
            fs.delete_file(path)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes, run_id: str) -> None:
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.{run_id}.tmp"
    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)


@contextlib.contextmanager
def destination_lock(fs: pafs.FileSystem, root: str) -> Iterator[bool]:
    """Hold ``root``'s export lock; yields whether there is one (local folders only).

    ``flock`` on ``root/.export.lock``, not waited for: a second export to the
    same folder raises `DestinationBusy` at once. The file stays; the lock goes
    with the descriptor, so also when the holder is killed.
    """

    if not isinstance(fs, pafs.LocalFileSystem):
        yield False  # no conditional write in pyarrow's S3 to build a lock on
        return

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode("utf-8", "replace").strip()
            raise DestinationBusy(
                f"another export to {root} is running ({holder or 'holder unknown'});"
                f" try again once it has finished"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()}, since {utcnow().isoformat()}\n".encode(), 0)
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def delete_temporaries(root: str) -> None:
    """Delete what runs that died left staged (only safe while holding the lock).

    Only this module's names are touched: ``.<file>.<run id>.tmp`` in the
    partition folders, and the manifest's and the journal's in ``root``.
    """
    doomed = glob.glob(os.path.join(glob.escape(root), f"*/{PARTITION_KEY}=*/.*.parquet.*.tmp"))
    doomed += glob.glob(os.path.join(glob.escape(root), f".{MANIFEST}.*.tmp"))
    doomed += glob.glob(os.path.join(glob.escape(root), f".{JOURNAL}.*.tmp"))
    for path in doomed:
        if _TEMPORARY.fullmatch(os.path.basename(path)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
