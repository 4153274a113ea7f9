"""Two exports to one folder at once: the second fails fast, and a killed one blocks nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.destinations import LOCK
from receiver.errors import DestinationBusy
from receiver.export import export
from tests.test_export import CASES, NOW, check_readback, parquet_files, post_cases, post_items

ROOT = Path(__file__).resolve().parents[1]

#: An export in its own process that stops, lock held and a file staged, at its first
#: progress report, says so on stdout, and goes on when a line arrives on its stdin.
HOLDER = """
import datetime as dt, sys
from receiver.db import create_db_engine
from receiver.export import export
from receiver.settings import Settings

engine = create_db_engine(Settings(database_url=sys.argv[1]))
held = []

def hold(name, rows):
    if not held:
        held.append(name)
        print("holding", flush=True)
        sys.stdin.readline()

report = export(engine, sys.argv[2], lag=dt.timedelta(0), progress=hold)
print(report.rows, flush=True)
engine.dispose()
"""


@contextmanager
def holding_export(db_url: str, dest: Path) -> Iterator[subprocess.Popen[str]]:
    """A real export process, stopped mid-run with DEST locked; killed if still running at exit."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url, str(dest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line != "holding\n":
            process.kill()
            _, errors = process.communicate(timeout=60)
            pytest.fail(f"the holding export did not start: {line!r} {errors}")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def export_command(
    db_url: str, dest: Path, tmp_path: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """``receiver export`` in its own process, as cron would start it."""
    env = {
        **os.environ,
        "RECEIVER_DATABASE_URL": db_url,
        "RECEIVER_DATA_DIR": str(tmp_path / "data"),
    }
    return subprocess.run(
        [sys.executable, "-m", "receiver", "export", "--out", str(dest), "--lag", "0", *options],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def staged(dest: Path) -> list[str]:
    return [p for p in parquet_files(dest) if p.endswith(".tmp")]


def test_a_second_export_to_the_same_folder_fails_fast(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    post_cases(client, engine, CASES)
    post_items(client, engine, [{"sku": "A", "price": 1.5}])
    dest = tmp_path / "export"
    with holding_export(db_url, dest) as holder:
        assert staged(dest)  # mid-run: files staged, nothing visible yet
        assert not (dest / "_manifest.json").exists()

        second = export_command(db_url, dest, tmp_path)
        assert second.returncode == 1, second.stderr
        assert f"another export to {dest} is running (pid {holder.pid}," in second.stderr
        assert "try again once it has finished" in second.stderr
        assert "Traceback" not in second.stderr
        with pytest.raises(DestinationBusy, match=f"pid {holder.pid}"):
            export(engine, str(dest), lag=NOW)  # the library call is refused the same way
        assert not (dest / "_manifest.json").exists()

        assert holder.stdin is not None
        out, errors = holder.communicate("go\n", timeout=120)
        assert holder.returncode == 0, errors
        assert int(out.split()[-1]) > 0

    check_readback(engine, dest)
    assert not staged(dest)
    manifest = json.loads((dest / "_manifest.json").read_text())
    assert len(manifest["runs"]) == 1  # the refused runs left no trace

    # Once it is over, the next run goes ahead.
    again = export_command(db_url, dest, tmp_path, "--quiet")
    assert again.returncode == 0, again.stderr
    assert len(json.loads((dest / "_manifest.json").read_text())["runs"]) == 2
    check_readback(engine, dest)


def test_a_killed_export_leaves_no_lock_and_its_files_are_cleared(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    post_cases(client, engine, CASES[:4])
    dest = tmp_path / "export"
    export(engine, str(dest), lag=NOW)
    visible = [p for p in parquet_files(dest) if not p.endswith(".tmp")]
    post_cases(client, engine, CASES[4:])
    with holding_export(db_url, dest) as holder:
        left = staged(dest)
        assert left
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    assert staged(dest) == left  # kill -9: nothing cleaned up after it
    assert [p for p in parquet_files(dest) if not p.endswith(".tmp")] == visible
    assert (dest / LOCK).exists()  # the file stays, the lock went with the process

    after = export_command(db_url, dest, tmp_path, "--quiet")
    assert after.returncode == 0, after.stderr
    assert not staged(dest)
    check_readback(engine, dest)


def test_temporaries_of_others_are_left_alone(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    # DEST may be a folder with other things in it: only the export's own names are deleted.
    post_cases(client, engine, CASES[:2])
    dest = tmp_path / "export"
    dest.mkdir()
    foreign = [dest / ".notes.tmp", dest / ".report.parquet.tmp", dest / "tasks.tmp"]
    for path in foreign:
        path.write_text("mine")
    export(engine, str(dest), lag=NOW)
    export(engine, str(dest), lag=NOW)
    assert all(p.read_text() == "mine" for p in foreign)
