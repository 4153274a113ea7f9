"""The web console: server-rendered pages over `receiver.listings`, under ``/console/``.

`create_console` is mounted by `receiver.app.create_app` only when
``RECEIVER_CONSOLE_TOKEN`` is set; without it there is no console at all.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from receiver.console import access
from receiver.console.pages import Pages
from receiver.settings import Settings
from receiver.spool import Spool

STATIC = Path(__file__).resolve().parent / "static"


def create_console(settings: Settings, engine: Engine, spool: Spool | None = None) -> Starlette:
    """The console app for ``settings.console_token`` (which must be set)."""
    token = settings.console_token
    if not token:
        raise ValueError("the console needs RECEIVER_CONSOLE_TOKEN")
    webhook_values = {t.decode() for t in settings.tokens}
    if token in webhook_values or f"Bearer {token}" in webhook_values:
        raise ValueError("RECEIVER_CONSOLE_TOKEN must differ from every RECEIVER_TOKEN")
    pages = Pages(settings, engine, spool)
    routes = [
        Route("/", pages.overview, name="overview"),
        Route("/sign-in", pages.sign_in_page, methods=["GET"], name="sign-in"),
        Route("/sign-in", pages.sign_in, methods=["POST"]),
        Route("/sign-out", pages.sign_out, methods=["POST"], name="sign-out"),
        Route("/deliveries", pages.deliveries, name="deliveries"),
        Route("/deliveries/{id}", pages.delivery, name="delivery"),
        Route("/quarantine", pages.quarantine, name="quarantine"),
        Route("/quarantine/reprocess", pages.reprocess, methods=["POST"], name="reprocess"),
        Route("/tasks", pages.tasks, name="tasks"),
        Route("/tasks/{task_id}", pages.task, name="task"),
        Route("/tables", pages.tables, name="tables"),
        Route("/tables/{name}", pages.table, name="table"),
        Route("/tables/{name}/rows.{format}", pages.download, name="download"),
        Route("/costs", pages.costs, name="costs"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=access.session_secret(token),
            session_cookie=access.SESSION_COOKIE,
            max_age=access.SESSION_SECONDS,
            path="/console",
            same_site="strict",
            https_only=False,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)
