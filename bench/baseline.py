"""The bare baseline for ingest: Starlette that checks the header and inserts the raw body.

One commit per request through the database's own driver (stdlib ``sqlite3``
with the receiver's WAL + ``synchronous`` + busy timeout; ``psycopg`` async
connections on PostgreSQL). No dedupe, no metadata, no processing: this is
what the hardware and the stack allow for "committed before answered".

``python -m bench.baseline --port N`` serves it with the same ``uvicorn.run``
settings as ``receiver serve``; ``--factory module:attr`` serves another app
factory the same way (the bench's diagnostic variants).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hmac
import importlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.cli import UVICORN_OPTIONS

PG_POOL_SIZE = 16
_SQLITE_DDL = """CREATE TABLE IF NOT EXISTS raw (
    id INTEGER PRIMARY KEY, hook TEXT NOT NULL, received_at TEXT NOT NULL,
    content_type TEXT, body BLOB NOT NULL)"""
_PG_DDL = """CREATE TABLE IF NOT EXISTS raw (
    id BIGSERIAL PRIMARY KEY, hook TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL,
    content_type TEXT, body BYTEA NOT NULL)"""
_INSERT = "INSERT INTO raw (hook, received_at, content_type, body) VALUES (%s, %s, %s, %s)"


def create_baseline(
    dialect: str, location: str, token: bytes, synchronous: str = "FULL"
) -> Starlette:
    """The bare app over a SQLite file or a PostgreSQL URL."""
    insert: Callable[[str, str | None, bytes], Any]

    if dialect == "sqlite":
        conn = sqlite3.connect(location, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(_SQLITE_DDL)
        sql = _INSERT.replace("%s", "?")

        async def insert(hook: str, content_type: str | None, body: bytes) -> None:
            # Inline on the event loop: one statement in autocommit is one commit (one fsync).
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
            conn.execute(sql, (hook, now, content_type, body))

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            conn.close()

    else:
        pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

        async def insert(hook: str, content_type: str | None, body: bytes) -> None:
            conn = await pool.get()
            try:
                await conn.execute(_INSERT, (hook, dt.datetime.now(dt.UTC), content_type, body))
            finally:
                pool.put_nowait(conn)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            conns = [
                await psycopg.AsyncConnection.connect(location, autocommit=True)
                for _ in range(PG_POOL_SIZE)
            ]
            await conns[0].execute(_PG_DDL)
            for c in conns:
                pool.put_nowait(c)
            yield
            for c in conns:
                await c.close()

    return bare_app(token, insert, lifespan)


def bare_app(
    token: bytes,
    store: Callable[[str, str | None, bytes], Awaitable[None]] | None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The bare apps' one shape: 401 without the token, else the whole body read, handed to
    ``store`` (this baseline) or to nothing (the no-store ceiling, `bench.ceiling`), answered."""
    answer = {"status": "stored" if store is not None else "received"}

    async def receive(request: Request) -> Response:
        header = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(header, token):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.body()
        if store is not None:
            await store(request.path_params["name"], request.headers.get("content-type"), body)
        return JSONResponse(answer)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/hooks/{name}", receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """Factory: ``BENCH_DIALECT``, ``BENCH_LOCATION``, ``BENCH_TOKEN``, ``BENCH_SYNCHRONOUS``."""
    return create_baseline(
        os.environ["BENCH_DIALECT"],
        os.environ["BENCH_LOCATION"],
        os.environ["BENCH_TOKEN"].encode(),
        os.environ.get("BENCH_SYNCHRONOUS", "FULL"),
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--factory", default="bench.baseline:app_from_env")
    args = parser.parse_args()
    module, _, attr = args.factory.partition(":")
    factory: Callable[[], Starlette] = getattr(importlib.import_module(module), attr)
    # The same call as `receiver serve` (single worker): only the app differs.
    uvicorn.run(factory(), host="127.0.0.1", port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
