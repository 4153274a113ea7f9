"""The console's pages: each handler parses its query, calls one `receiver.listings` function
(or `receiver.reprocessing`), and renders a template."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.templating import Jinja2Templates

from receiver import listings, reprocessing, rollups
from receiver.classify import parse_time
from receiver.console import access
from receiver.console.bodies import view_body, view_output
from receiver.console.charts import Series, stacked_bars
from receiver.listings import DeliveryFilter, TaskFilter
from receiver.settings import Settings
from receiver.spool import Spool
from receiver.states import DeliveryStatus

TEMPLATES = Path(__file__).resolve().parent / "templates"
PAGE = 50
FORM_BYTES = 64 * 1024


def usd(value: float | None) -> str:
    """Money as the console shows it: unknown is said, never $0."""
    return "unknown" if value is None else f"${value:,.4f}"


def number(value: float | None, spec: str = ",") -> str:
    return "unknown" if value is None else format(value, spec)


def when(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@jinja2.pass_context
def link(context: dict[str, Any], name: str, /, **params: Any) -> str:
    """A route's path (no scheme or host: right behind any proxy)."""
    request: Request = context["request"]
    return request.url_for(name, **params).path


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.globals["link"] = link
    templates.env.filters |= {"usd": usd, "number": number, "when": when}
    templates.env.globals["urlencode"] = urllib.parse.urlencode
    return templates


class Pages:
    """Handlers bound to one engine and settings (no globals)."""

    def __init__(self, settings: Settings, engine: Engine, spool: Spool | None) -> None:
        assert settings.console_token is not None
        self.token = settings.console_token
        self.settings = settings
        self.engine = engine
        self.spool = spool
        self.templates = make_templates()

    # --- plumbing ------------------------------------------------------------------------

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> Response:
        context["csrf"] = access.csrf_token(request)
        context["nav"] = name.split(".")[0]
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def refuse(self, request: Request) -> Response:
        if access.bearer(request) is not None or "text/html" not in request.headers.get(
            "accept", ""
        ):
            return Response(
                "sign in to the console: the console token is needed\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="receiver console"'},
            )
        return self.render(request, "sign_in.html", status_code=401, error=None)

    async def form(self, request: Request) -> dict[str, str]:
        """The POSTed form, once its CSRF token is checked (403 without)."""
        # The console's forms are small and urlencoded: parsed here, no multipart parser needed.
        body = await request.body()
        if len(body) > FORM_BYTES:
            raise HTTPException(413, "form too large")
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not access.csrf_ok(request, form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        return form

    def guard(self, request: Request) -> Response | None:
        return None if access.signed_in(request, self.token) else self.refuse(request)

    # --- sign in and out -----------------------------------------------------------------

    async def sign_in_page(self, request: Request) -> Response:
        return self.render(request, "sign_in.html", error=None)

    async def sign_in(self, request: Request) -> Response:
        form = await self.form(request)
        if access.token_matches(form.get("token", ""), self.token):
            access.sign_in(request, self.token)
            return RedirectResponse(request.url_for("console:overview").path, status_code=303)
        return self.render(request, "sign_in.html", status_code=401, error="wrong token")

    async def sign_out(self, request: Request) -> Response:
        await self.form(request)
        request.session.clear()
        return RedirectResponse(request.url_for("console:sign-in").path, status_code=303)

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused

        def load() -> dict[str, Any]:
            today = dt.datetime.now(dt.UTC).date()
            month = rollups.total(rollups.costs(self.engine, ["day"], since=today.replace(day=1)))
            day = rollups.total(rollups.costs(self.engine, ["day"], since=today))
            spool = self.spool
            return {
                "o": listings.overview(self.engine),
                "cost_today": day,
                "cost_month": month,
                "spool_backlog": None if spool is None else spool.backlog(),
                "statuses": list(DeliveryStatus),
            }

        return self.render(request, "overview.html", **await run_in_threadpool(load))

    async def deliveries(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        q = request.query_params
        errors: list[str] = []

        def time_param(name: str) -> dt.datetime | None:
            raw = q.get(name, "").strip()
            if not raw:
                return None
            parsed = parse_time(raw)
            if parsed is None:
                errors.append(f"{name}: not an ISO time: {raw}")
            return parsed

        label = None
        if raw_label := q.get("label", "").strip():
            key, sep, value = raw_label.partition("=")
            if sep:
                label = (key, value)
            else:
                errors.append("label: write KEY=VALUE")
        status = q.get("status") or None
        if status is not None and status not in set(DeliveryStatus):
            errors.append(f"status: one of {', '.join(DeliveryStatus)}")
            status = None
        where = DeliveryFilter(
            hook=q.get("hook") or None,
            status=DeliveryStatus(status) if status else None,
            kind=q.get("kind") or None,
            output_type=q.get("output_type") or None,
            since=time_param("since"),
            until=time_param("until"),
            session_id=q.get("session_id") or None,
            task_id=q.get("task_id") or None,
            label=label,
            text=q.get("q") or None,
        )
        before = q.get("before") or None
        rows = await run_in_threadpool(
            listings.list_deliveries, self.engine, where, limit=PAGE + 1, before=before
        )
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        kept = {k: v for k, v in q.items() if k != "before" and v}
        next_url = None
        if more:
            next_url = "?" + urllib.parse.urlencode({**kept, "before": rows[-1].id})
        hooks = await run_in_threadpool(listings.hooks, self.engine)
        return self.render(
            request,
            "deliveries.html",
            rows=rows,
            q=q,
            errors=errors,
            next_url=next_url,
            hooks=hooks,
            statuses=list(DeliveryStatus),
        )

    async def delivery(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        try:
            detail = await run_in_threadpool(
                listings.delivery_detail, self.engine, request.path_params["id"]
            )
        except listings.Ambiguous as error:
            raise HTTPException(409, str(error)) from error
        except listings.NotFound as error:
            raise HTTPException(404, str(error)) from error
        d = detail.delivery
        return self.render(
            request,
            "delivery.html",
            d=d,
            detail=detail,
            body=view_body(d.body, d.content_type),
            output=None
            if detail.output is None
            else view_output(detail.output.content, detail.output.output_type),
        )

    async def quarantine(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        groups = await run_in_threadpool(listings.quarantine_groups, self.engine)
        examples: dict[tuple[str, str | None], list[Any]] = {}
        for g in groups[:50]:
            where = DeliveryFilter(hook=g.hook, status=DeliveryStatus.QUARANTINED, reason=g.reason)
            examples[(g.hook, g.reason)] = await run_in_threadpool(
                listings.list_deliveries, self.engine, where, limit=10
            )
        outcome = request.session.pop("outcome", None)
        return self.render(
            request, "quarantine.html", groups=groups, examples=examples, outcome=outcome
        )

    async def reprocess(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        form = await self.form(request)
        if form.get("delivery_id"):
            selection = reprocessing.ReprocessSelection(ids=(form["delivery_id"],))
        elif form.get("hook"):
            selection = reprocessing.ReprocessSelection(
                hook=form["hook"], reason=form.get("reason", ""), quarantined=True
            )
        else:
            raise HTTPException(400, "give delivery_id, or hook and reason")

        def run() -> reprocessing.ReprocessReport:
            ids = reprocessing.select_deliveries(self.engine, selection)
            return reprocessing.reprocess(self.engine, ids, max_depth=self.settings.max_depth)

        report = await run_in_threadpool(run)
        request.session["outcome"] = {
            "counts": report.as_dict(),
            "reasons": dict(list(report.reasons.items())[:20]),
        }
        return RedirectResponse(request.url_for("console:quarantine").path, status_code=303)

    async def tasks(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        q = request.query_params
        since = parse_time(q["since"]) if q.get("since") else None
        where = TaskFilter(status=q.get("status") or None, hook=q.get("hook") or None, since=since)
        before = None
        if q.get("before_seen") and q.get("before_key"):
            seen = parse_time(q["before_seen"])
            if seen is not None:
                before = (seen, q["before_key"])
        rows = await run_in_threadpool(
            listings.list_tasks, self.engine, where, limit=PAGE + 1, before=before
        )
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        next_url = None
        if more:
            kept = {k: v for k, v in q.items() if not k.startswith("before") and v}
            last = rows[-1]
            seen_at = last.first_seen_at
            if seen_at.tzinfo is None:
                seen_at = seen_at.replace(tzinfo=dt.UTC)
            next_url = "?" + urllib.parse.urlencode(
                {**kept, "before_seen": seen_at.isoformat(), "before_key": last.task_key}
            )
        hooks = await run_in_threadpool(listings.hooks, self.engine)
        return self.render(request, "tasks.html", rows=rows, q=q, next_url=next_url, hooks=hooks)

    async def task(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        session_id = request.query_params.get("session_id") or None
        task_id = request.path_params["task_id"]

        def load() -> dict[str, Any]:
            task = listings.task_by_ids(self.engine, session_id, task_id)
            return {"t": task, "timeline": listings.task_deliveries(self.engine, task)}

        try:
            context = await run_in_threadpool(load)
        except listings.Ambiguous as error:
            raise HTTPException(409, str(error)) from error
        except listings.NotFound as error:
            raise HTTPException(404, str(error)) from error
        return self.render(request, "task.html", **context)

    async def tables(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        tables = await run_in_threadpool(listings.list_tables, self.engine)
        return self.render(request, "tables.html", tables=tables)

    async def _table(self, name: str) -> listings.TableListing:
        try:
            return await run_in_threadpool(listings.table_listing, self.engine, name)
        except listings.NotFound as error:
            raise HTTPException(404, str(error)) from error

    async def table(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        info = await self._table(request.path_params["name"])
        q = request.query_params
        after = None
        if q.get("after_delivery") and q.get("after_row", "").lstrip("-").isdigit():
            after = (q["after_delivery"], int(q["after_row"]))
        columns, rows = await run_in_threadpool(
            listings.table_rows, self.engine, info, limit=PAGE + 1, after=after
        )
        next_url = None
        if len(rows) > PAGE:
            rows = rows[:PAGE]
            next_url = "?" + urllib.parse.urlencode(
                {"after_delivery": rows[-1][0], "after_row": rows[-1][1]}
            )
        return self.render(
            request, "table.html", t=info, columns=columns, rows=rows, next_url=next_url
        )

    async def download(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        info = await self._table(request.path_params["name"])
        kind = request.path_params["format"]
        if kind not in ("csv", "json"):
            raise HTTPException(404, "download as .csv or .json")
        rows = listings.iter_table_rows(self.engine, info)
        chunks = _csv_chunks(rows) if kind == "csv" else _json_chunks(rows)
        return StreamingResponse(
            chunks,
            media_type="text/csv; charset=utf-8" if kind == "csv" else "application/json",
            headers={"Content-Disposition": f'attachment; filename="{info.name}.{kind}"'},
        )

    async def costs(self, request: Request) -> Response:
        if refused := self.guard(request):
            return refused
        raw_days = request.query_params.get("days", "30")
        days = int(raw_days) if raw_days.isdigit() and 0 < int(raw_days) <= 366 else 30

        def load() -> dict[str, Any]:
            first = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days - 1)
            by_day_hook = rollups.costs(self.engine, ["day", "hook"], since=first)
            categories = [(first + dt.timedelta(days=n)).isoformat() for n in range(days)]
            hooks = sorted({str(r.key[1]) for r in by_day_hook})
            cells = {(r.key[0], r.key[1]): r for r in by_day_hook}
            series = [
                Series(h, [cells[(d, h)].cost_usd if (d, h) in cells else None for d in categories])
                for h in hooks
            ]
            unknown = [
                sum(r.tasks_unknown_cost for (d, _), r in cells.items() if d == day)
                for day in categories
            ]
            return {
                "days": days,
                "chart": stacked_bars(
                    categories,
                    series,
                    unknown=unknown,
                    title=f"Cost per day by hook, last {days} days (USD)",
                ),
                "by_day_hook": by_day_hook,
                "total": rollups.total(by_day_hook),
                "by_status": rollups.costs(self.engine, ["status"], since=first),
                "labels": listings.top_labels(self.engine, since=first),
                "failed": listings.failed_cost_by_error(self.engine, since=first),
            }

        return self.render(request, "costs.html", **await run_in_threadpool(load))


def _text(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def _csv_chunks(rows: Iterator[Any]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(["" if v is None else _text(v) for v in row])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _json_chunks(rows: Iterator[Any]) -> Iterator[str]:
    """A JSON array of objects, one row at a time."""
    columns = next(rows)
    yield "["
    for n, row in enumerate(rows):
        record = dict(zip(columns, (_text(v) for v in row), strict=True))
        yield ("," if n else "") + "\n" + json.dumps(record, ensure_ascii=False)
    yield "\n]\n"
