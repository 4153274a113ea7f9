"""The package's shape: pure cores that need no database, tested without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Modules that decide (classification, flattening, CSV typing, identifiers): plain Python.
PURE = (
    "receiver.classify",
    "receiver.rows",
    "receiver.normalise",
    "receiver.csvparse",
    "receiver.columns",
    "receiver.lifecycle",
    "receiver.attachments",
    "receiver.bounds",
    "receiver.nesting",
    "receiver.redaction",
)
HEAVY = ("sqlalchemy", "starlette", "psycopg", "pyarrow", "pandas")


def test_pure_modules_import_no_database_web_or_arrow_library() -> None:
    code = (
        f"import sys; import {', '.join(PURE)}; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert ran.stdout.strip() == "[]"


def test_pure_tests_run_without_a_database_server() -> None:
    """`pytest -m pure` with RECEIVER_TEST_PG pointing at a server that does not exist."""
    env = {**os.environ, "RECEIVER_TEST_PG": "postgresql://nobody@127.0.0.1:1/nothing"}
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "pure", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    summary = ran.stdout.strip().splitlines()[-1]
    assert " passed" in summary
    assert "failed" not in summary
    assert "error" not in summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 200, summary
