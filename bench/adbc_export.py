"""The export baseline: ADBC record batches from ``tasks`` straight into a ParquetWriter (zstd).

``python -m bench.adbc_export DIALECT LOCATION OUT`` prints the row count; run
as a child so its peak memory is its own.
"""

from __future__ import annotations

import sys
from typing import Any

import pyarrow.parquet as pq


def connect(dialect: str, location: str) -> Any:
    if dialect == "sqlite":
        import adbc_driver_sqlite.dbapi

        return adbc_driver_sqlite.dbapi.connect(location)
    import adbc_driver_postgresql.dbapi

    return adbc_driver_postgresql.dbapi.connect(location)


def export_tasks(dialect: str, location: str, out: str) -> int:
    rows = 0
    with connect(dialect, location) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM tasks")
        reader = cur.fetch_record_batch()
        with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    return rows


if __name__ == "__main__":
    print(export_tasks(sys.argv[1], sys.argv[2], sys.argv[3]))
