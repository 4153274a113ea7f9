"""Figure 3: `receiver export` of ``tasks`` against ADBC batches -> pyarrow ParquetWriter.

Both run as child processes over the same seeded database, so each peak RSS
is the child's own; exported rows are counted from the Parquet footers.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.databases import BenchDatabase
from bench.subprocesses import run_measured

TIMEOUT_S = 600.0


def parquet_rows(folder: Path, dataset: str = "tasks") -> int:
    """Rows in a Parquet file, or in ``folder/dataset``'s files (hidden temporaries excluded)."""
    if folder.is_file():
        return int(pq.ParquetFile(folder).metadata.num_rows)
    root = folder / dataset if (folder / dataset).is_dir() else folder
    files = [p for p in root.rglob("*.parquet") if not p.name.startswith(".")]
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def cli_available(*command: str) -> bool:
    """Whether `receiver <command>` exists yet (it is being built alongside this bench)."""
    probe = run_measured([sys.executable, "-m", "receiver", *command, "--help"], {}, 60)
    return probe.returncode == 0


def receiver_env(db: BenchDatabase) -> dict[str, str]:
    return {"RECEIVER_DATABASE_URL": db.sqlalchemy_url, "RECEIVER_TOKEN": "Bearer bench-token"}


def measure(db: BenchDatabase, rows: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        base = run_measured(
            [
                sys.executable,
                "-m",
                "bench.adbc_export",
                db.dialect,
                db.location,
                str(out / "b.parquet"),
            ],
            {},
            TIMEOUT_S,
        )
        if base.returncode != 0:
            raise RuntimeError(f"ADBC baseline failed:\n{base.output[-3000:]}")
        baseline = {
            "seconds": round(base.seconds, 2),
            "rows_per_s": round(rows / base.seconds),
            "peak_rss_mb": base.peak_rss_mb,
            "rows": parquet_rows(out / "b.parquet"),
        }
        result: dict[str, Any] = {"rows": rows, "baseline": baseline}
        if not cli_available("export"):
            return result | {"receiver": "not available"}
        dest = out / "receiver"
        argv = [sys.executable, "-m", "receiver", "export", "--out", str(dest), "--table", "tasks"]
        argv.append("--quiet")
        recv = run_measured(argv, receiver_env(db), TIMEOUT_S)
        if recv.returncode != 0:
            return result | {"receiver": f"failed: {recv.output[-500:]}"}
        exported = parquet_rows(dest)
        result["receiver"] = {
            "seconds": round(recv.seconds, 2),
            "rows_per_s": round(rows / recv.seconds),
            "peak_rss_mb": recv.peak_rss_mb,
            "rows": exported,
        }
        result["ratio"] = round(base.seconds / recv.seconds, 3)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)
