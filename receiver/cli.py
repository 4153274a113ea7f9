"""The ``receiver`` command: a thin click layer over the library.

Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from receiver.db import create_db_engine
from receiver.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

# Heavy imports (Alembic, the ORM models, rich, uvicorn, prometheus_client) live in the
# commands that use them: every command pays for what the module imports, and
# `receiver costs` must answer in well under a second.


def _engine(ctx: click.Context) -> Engine:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "engine" not in obj:
        obj["engine"] = create_db_engine(obj["settings"])
        ctx.find_root().call_on_close(obj["engine"].dispose)
    engine: Engine = obj["engine"]
    return engine


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.ensure_object(dict)["settings"]
    return settings


def webhook_object(name: str, url: str, token: str, submitted: str = "full_response") -> str:
    """The ``webhook`` block to paste into a WebRun task config."""
    return json.dumps(
        {"webhook": {"name": name, "url": url, "auth": token, "submittedData": submitted}}, indent=2
    )


def _print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from receiver.terminal import Column, print_listing

    print_listing(
        title,
        [Column(str(i), c) for i, c in enumerate(columns)],
        [{str(i): v for i, v in enumerate(r)} for r in rows],
    )


def _since_option(help_: str = "only what is newer: an ISO time, or a day (YYYY-MM-DD)") -> Any:
    return click.option("--since", help=help_)


def listing_options(default_limit: int | None = 50) -> Callable[[Any], Any]:
    """--format, --limit and --since, as every listing takes them."""

    def decorate(command: Any) -> Any:
        command = click.option(
            "--format",
            "format_",
            type=click.Choice(["table", "json", "csv"]),
            default="table",
            show_default=True,
            help="table fits the terminal; json and csv carry every value whole",
        )(command)
        command = click.option(
            "--limit",
            type=click.IntRange(min=1),
            metavar="N",
            default=default_limit,
            show_default=default_limit is not None,
            help="at most this many rows",
        )(command)
        return _since_option()(command)

    return decorate


def _parse_since(since: str | None) -> Any:
    """``--since`` as an aware time (a bare day is its UTC midnight)."""
    if not since:
        return None
    from receiver.classify import parse_time

    when = parse_time(since)
    if when is None:
        raise click.BadParameter(f"not an ISO time: {since}", param_hint="--since")
    return when


def _lookup(call: Callable[[], Any]) -> Any:
    """``call()``, with a missing or ambiguous id said in one line."""
    from receiver.listings import Ambiguous, NotFound

    try:
        return call()
    except (NotFound, Ambiguous) as error:
        raise click.ClickException(str(error)) from error


#: How `serve` runs uvicorn (the benchmark's baseline runs the same way). In-flight
#: requests get 25 s to finish on SIGTERM; no access log: the receiver's own line per
#: delivery (`receiver.logs`) says more, and a second line per request is noise.
UVICORN_OPTIONS: dict[str, Any] = {"timeout_graceful_shutdown": 25, "access_log": False}


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """WebRun Receiver: store every WebRun webhook delivery and turn it into SQL."""
    ctx.ensure_object(dict)["settings"] = Settings.from_env()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Migrate the database, then receive deliveries on POST /hooks/{name}."""
    import shutil

    import uvicorn

    from receiver import auth
    from receiver.app import create_app, settle_heap
    from receiver.db import upgrade
    from receiver.logs import configure_logging
    from receiver.metrics import MULTIPROC_ENV

    settings = _settings(ctx)
    configure_logging(settings.log_format)
    engine = _engine(ctx)
    upgrade(engine)
    token = auth.ensure_token(engine, settings.tokens)
    if token is not None:
        click.echo("No token was configured, so one was made. It is shown only this once:")
        click.echo(f"  Authorization: {token}")
        click.echo("Paste this into your WebRun task config (any hook name works):")
        click.echo(webhook_object("default", f"http://{host}:{port}/hooks/default", token))
    if workers > 1:
        # Each worker is a process: prometheus_client's multiprocess mode keeps every
        # worker's values in this folder and a scrape of any worker sums them.
        metrics_dir = (settings.data_dir / "metrics").resolve()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        uvicorn.run(
            "receiver.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            **UVICORN_OPTIONS,
        )
    else:
        app = create_app(settings, engine=engine)
        settle_heap()
        uvicorn.run(app, host=host, port=port, **UVICORN_OPTIONS)


#: Package data: the catalogue bodies and ``index.json`` (name, content type, submittedData).
SAMPLES = Path(__file__).resolve().parent / "samples"


def sample_deliveries() -> list[dict[str, str]]:
    """The built-in sample deliveries: the WebRun delivery catalogue's 15 bodies."""
    index = SAMPLES / "index.json"
    samples: list[dict[str, str]] = json.loads(index.read_text())
    return samples


def _sample(name: str) -> tuple[bytes, str]:
    """Body and content type of the sample named ``name`` or starting with it (``01``)."""
    samples = sample_deliveries()
    found = [s for s in samples if s["name"] == name] or [
        s for s in samples if s["name"].startswith(name)
    ]
    if len(found) != 1:
        names = ", ".join(s["name"] for s in samples)
        raise click.BadParameter(f"{name!r} names no single sample; samples: {names}")
    sample = found[0]
    body = (SAMPLES / f"{sample['name']}.body").read_bytes()
    return body, sample["content_type"]


@main.command()
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--sample", help="send a built-in sample instead of FILE: its name or number")
@click.option("--list-samples", is_flag=True, help="list the built-in samples and exit")
@click.option("--hook", default="default", show_default=True)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="receiver base URL")
@click.option("--token", help="Authorization value  [default: the first RECEIVER_TOKEN]")
@click.option("--content-type", help="[default: the sample's, or guessed from FILE's name]")
@click.option("--label", "labels", multiple=True, help="query label KEY=VALUE (repeatable)")
@click.pass_context
def send(
    ctx: click.Context,
    file: Path | None,
    sample: str | None,
    list_samples: bool,
    hook: str,
    url: str,
    token: str | None,
    content_type: str | None,
    labels: tuple[str, ...],
) -> None:
    """POST FILE or a built-in sample to a running receiver, as WebRun would.

    Prints the HTTP status and the answer; exits 1 unless the answer is 200.
    """
    import mimetypes
    import urllib.error
    import urllib.parse
    import urllib.request

    if list_samples:
        _print_table(
            "samples",
            ["name", "content type", "submittedData"],
            [[s["name"], s["content_type"], s["submitted_data"]] for s in sample_deliveries()],
        )
        return
    if (file is None) == (sample is None):
        raise click.UsageError("give either FILE or --sample NAME")
    if file is not None:
        body = file.read_bytes()
        guessed = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    else:
        body, guessed = _sample(str(sample))
    if token is None:
        tokens = _settings(ctx).tokens
        if not tokens:
            raise click.UsageError("no token: pass --token or set RECEIVER_TOKEN")
        token = tokens[0].decode()
    pairs = [label.partition("=") for label in labels]
    if any(not sep for _, sep, _ in pairs):
        raise click.BadParameter("a label is KEY=VALUE", param_hint="--label")
    query = urllib.parse.urlencode([(k, v) for k, _, v in pairs])
    target = f"{url.rstrip('/')}/hooks/{urllib.parse.quote(hook, safe='')}"
    request = urllib.request.Request(
        target + (f"?{query}" if query else ""),
        data=body,
        method="POST",
        headers={"Authorization": token, "Content-Type": content_type or guessed},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise click.ClickException(f"could not reach {target}: {exc.reason}") from exc
    click.echo(f"{status} {answer.decode('utf-8', 'replace')}")
    if status != 200:
        ctx.exit(1)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or upgrade the core schema (Alembic migrations)."""
    from receiver.db import upgrade

    upgrade(_engine(ctx))
    click.echo("database is up to date")


@main.group()
def hooks() -> None:
    """Create, list, rotate and revoke hooks and their tokens."""


@hooks.command("add")
@click.argument("name")
@click.option("--schema", "schema_file", type=click.File("r"), help="WebRun outputSchema (JSON)")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="receiver base URL")
@click.pass_context
def hooks_add(ctx: click.Context, name: str, schema_file: Any, url: str) -> None:
    """Create hook NAME with its own token, printed once with its webhook object.

    With --schema, the hook's outputSchema (a JSON Schema object, or a list of
    CSV column names) fixes its output type and validates each payload; the
    result table and the schema's typed columns are created at once. Run it
    again with a new schema, then: receiver reprocess --hook NAME --quarantined.
    """
    from sqlalchemy import insert, select, update

    from receiver import auth
    from receiver.db import upgrade, utcnow, write_transaction
    from receiver.models import Hook
    from receiver.schema import declare

    engine = _engine(ctx)
    upgrade(engine)
    schema = json.load(schema_file) if schema_file else None
    output_type = None
    if isinstance(schema, list):
        if not all(isinstance(c, str) for c in schema):
            raise click.BadParameter("a CSV schema must list column names (strings)")
        output_type = "structured_csv"
    elif isinstance(schema, dict):
        output_type = "structured_json"
    elif schema is not None:
        raise click.BadParameter("the schema must be a JSON object or a list of column names")
    with engine.connect() as conn, write_transaction(conn):
        exists = conn.scalar(select(Hook.name).where(Hook.name == name)) is not None
        if exists:
            conn.execute(
                update(Hook)
                .where(Hook.name == name)
                .values(output_type=output_type, output_schema=schema)
            )
        else:
            conn.execute(
                insert(Hook).values(
                    name=name, created_at=utcnow(), output_type=output_type, output_schema=schema
                )
            )
        if schema is not None:
            declare(conn, name, schema, max_depth=_settings(ctx).max_depth)
    token = auth.add_token(engine, name)
    click.echo(webhook_object(name, f"{url.rstrip('/')}/hooks/{name}", token))


@hooks.command("list")
@listing_options(default_limit=None)
@click.pass_context
def hooks_list(ctx: click.Context, since: str | None, limit: int | None, format_: str) -> None:
    """List hooks with their output type, live tokens of their own and deliveries."""
    from dataclasses import asdict

    from receiver import listings
    from receiver.terminal import Column, print_listing

    rows = listings.list_hooks(_engine(ctx), since=_parse_since(since), limit=limit)
    print_listing(
        "hooks",
        [
            Column("name", "hook", whole=True),
            Column("output_type", "output type", drop=2),
            Column("own_tokens", "own tokens", right=True),
            Column("deliveries", "deliveries", right=True),
            Column("created_at", "created (UTC)", drop=1),
        ],
        [asdict(r) for r in rows],
        format_,
    )


@hooks.command("rotate")
@click.argument("name")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.pass_context
def hooks_rotate(ctx: click.Context, name: str, url: str) -> None:
    """Add a new token to NAME; the old ones stay valid until hooks revoke."""
    from receiver import auth

    token = auth.add_token(_engine(ctx), name)
    click.echo(webhook_object(name, f"{url.rstrip('/')}/hooks/{name}", token))


@hooks.command("revoke")
@click.argument("name")
@click.pass_context
def hooks_revoke(ctx: click.Context, name: str) -> None:
    """Revoke every token of NAME (global tokens still work)."""
    from receiver import auth

    count = auth.revoke_tokens(_engine(ctx), name)
    click.echo(f"revoked {count} token(s) of {name}")


@main.command()
@listing_options(default_limit=None)
@click.pass_context
def tables(ctx: click.Context, since: str | None, limit: int | None, format_: str) -> None:
    """List result tables and their columns: type, and the payload key each came from.

    A source key with #variant:TYPE holds the values of a key that did not fit
    its column's type; one with #row-note holds notes on rows that did not parse
    cleanly. The README's Data model section says more.
    """
    from dataclasses import asdict

    from receiver import listings
    from receiver.terminal import Column, print_listing

    found = listings.list_tables(_engine(ctx), since=_parse_since(since), limit=limit)
    if format_ == "json":
        print_listing("result tables", [], [asdict(t) for t in found], format_)
        return
    records = [
        {
            "table": t.name,
            "hook": t.hook,
            "parent": t.parent_table,
            "column": c.name,
            "type": c.type,
            "source_key": c.source,
            "note": c.note,
        }
        for t in found
        for c in t.columns
    ]
    print_listing(
        "result tables",
        [
            Column("table", "table", whole=True),
            Column("column", "column"),
            Column("type", "type", whole=True),
            Column("source_key", "source key"),
            Column("hook", "hook", drop=2),
            Column("parent", "parent", drop=3),
            Column("note", "note", drop=1),
        ],
        records,
        format_,
        note=_notes(found),
    )


def _notes(found: list[Any]) -> str:
    kinds = {c.note.split(":")[0] for t in found for c in t.columns if c.note}
    lines = []
    if "variant" in kinds:
        lines.append("#variant:TYPE: values of the key that are of TYPE, not the column's type")
    if "row note" in kinds:
        lines.append("#row-note: set on rows that did not parse cleanly (what was repaired)")
    return "\n".join(lines)


@main.group()
def deliveries() -> None:
    """Inspect stored deliveries."""


@deliveries.command("list")
@click.option(
    "--status",
    type=click.Choice(["stored", "processed", "duplicate", "quarantined"]),
    help="only deliveries in this state",
)
@click.option("--hook", help="only this hook's deliveries")
@click.option("--kind", help="full_response, ai_response, just_ping, failure, guardrail ...")
@click.option("--task", "task_id", help="only this task id's deliveries")
@click.option("--label", help="only deliveries with this query-string label, KEY=VALUE")
@listing_options()
@click.pass_context
def deliveries_list(
    ctx: click.Context,
    status: str | None,
    hook: str | None,
    kind: str | None,
    task_id: str | None,
    label: str | None,
    since: str | None,
    limit: int,
    format_: str,
) -> None:
    """List the newest deliveries. Ids are shown as short unique prefixes, which
    deliveries show accepts; --format json gives them whole."""
    from receiver import listings
    from receiver.terminal import Column, print_listing

    pair = None
    if label:
        key, sep, value = label.partition("=")
        if not sep:
            raise click.BadParameter("a label is KEY=VALUE", param_hint="--label")
        pair = (key, value)
    where = listings.DeliveryFilter(
        hook=hook,
        status=listings.DeliveryStatus(status) if status else None,
        kind=kind,
        task_id=task_id,
        label=pair,
        since=_parse_since(since),
    )
    rows = listings.list_deliveries(_engine(ctx), where, limit=limit)
    records = [dict(r._mapping) for r in rows]
    if format_ == "table":
        short = _short_ids([r["id"] for r in records])
        for r in records:
            r["short_id"] = short[r["id"]]
    print_listing(
        "deliveries",
        [
            Column("short_id", "id", whole=True),
            Column("hook", "hook"),
            Column("received_at", "received (UTC)", whole=True, drop=5),
            Column("status", "status", whole=True),
            Column("kind", "kind", drop=3),
            Column("output_type", "output", drop=2),
            Column("body_size", "bytes", right=True, drop=4),
            Column("task_id", "task", drop=1),
            Column("reason", "reason", drop=6),
        ],
        records,
        format_,
    )


def _short_ids(ids: list[str], shortest: int = 13) -> dict[str, str]:
    """Each id cut to the shortest prefix (at least ``shortest``) that no other listed id
    shares."""
    ordered = sorted(ids)
    out = {}
    for n, delivery_id in enumerate(ordered):
        neighbours = ordered[max(n - 1, 0) : n] + ordered[n + 1 : n + 2]
        length = shortest
        for other in neighbours:
            common = next(
                (i for i, (a, b) in enumerate(zip(delivery_id, other, strict=False)) if a != b),
                len(delivery_id),
            )
            length = max(length, common + 1)
        out[delivery_id] = delivery_id[: min(length, len(delivery_id))]
    return out


@deliveries.command("show")
@click.argument("delivery_id")
@click.pass_context
def deliveries_show(ctx: click.Context, delivery_id: str) -> None:
    """Show one delivery: its metadata, stored body, and what was derived from it.

    DELIVERY_ID may be any unique prefix of the id (as deliveries list shows it).
    """
    from receiver import listings

    detail = _lookup(lambda: listings.delivery_detail(_engine(ctx), delivery_id))
    row = detail.delivery
    meta = {k: v for k, v in row._mapping.items() if k != "body"}
    click.echo(json.dumps(meta, indent=2, default=str))
    click.echo("--- body ---")
    sys.stdout.write(row.body.decode("utf-8", "replace") + "\n")
    if detail.output is not None:
        click.echo(f"--- output ({detail.output.output_type}) ---")
        click.echo(detail.output.content)
    if detail.task is not None:
        click.echo("--- task ---")
        click.echo(json.dumps(dict(detail.task._mapping), indent=2, default=str))
    for result in detail.results:
        click.echo(f"--- {len(result.rows)} row(s) in {result.table} ---")


@main.group()
def tasks() -> None:
    """Inspect tasks: one row per WebRun task, merged from its deliveries."""


@tasks.command("list")
@click.option("--status", help="only tasks in this state: completed, failed or guardrail")
@click.option("--hook", help="only this hook's tasks")
@listing_options()
@click.pass_context
def tasks_list(
    ctx: click.Context,
    status: str | None,
    hook: str | None,
    since: str | None,
    limit: int,
    format_: str,
) -> None:
    """List the tasks first seen most recently, with tokens, compute time and cost.

    A cost or token count WebRun did not report is shown as unknown, never as 0.
    """
    from receiver import listings
    from receiver.terminal import Column, count, money, print_listing

    where = listings.TaskFilter(status=status, hook=hook, since=_parse_since(since))
    rows = listings.list_tasks(_engine(ctx), where, limit=limit)
    print_listing(
        "tasks",
        [
            Column("task_id", "task"),
            Column("session_id", "session", drop=3),
            Column("hook", "hook", drop=4),
            Column("status", "status", whole=True),
            Column("total_tokens", "tokens", right=True, show=count, drop=5),
            Column(
                "compute_time_s", "compute s", right=True, show=lambda v: count(v, ",.1f"), drop=2
            ),
            Column("cost_usd", "USD", right=True, whole=True, show=money),
            Column("error_code", "error", drop=6),
            Column("first_seen_at", "first seen (UTC)", whole=True, drop=1),
        ],
        [dict(r._mapping) for r in rows],
        format_,
    )


@tasks.command("show")
@click.argument("session_or_task")
@click.argument("task_id", required=False)
@click.pass_context
def tasks_show(ctx: click.Context, session_or_task: str, task_id: str | None) -> None:
    """Show one task and the deliveries that spoke of it.

    Give SESSION_ID TASK_ID, or one argument: a task id, or a unique prefix of a
    task or session id.
    """
    from receiver import listings

    engine = _engine(ctx)
    task = _lookup(lambda: listings.find_task(engine, session_or_task, task_id))
    click.echo(json.dumps(dict(task._mapping), indent=2, default=str))
    click.echo("--- deliveries ---")
    for d in listings.task_deliveries(engine, task):
        received = d.received_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{received}  {d.id}  {d.kind or '-'}  {d.status}  {d.reason or ''}".rstrip())


@main.command()
@click.option("--hook", help="only this hook's deliveries")
@click.option("--since", help="only deliveries received at or after this ISO time")
@click.option("--quarantined", is_flag=True, help="only quarantined deliveries")
@click.option("--reason", help="only quarantined deliveries with exactly this reason")
@click.option("--quiet", is_flag=True, help="no progress (the summary is still printed)")
@click.pass_context
def reprocess(
    ctx: click.Context,
    hook: str | None,
    since: str | None,
    quarantined: bool,
    reason: str | None,
    quiet: bool,
) -> None:
    """Rebuild the derived rows of the chosen deliveries from the raw ledger.

    Idempotent: reprocessing twice changes nothing. Prints what the deliveries
    became as one JSON line, e.g. {"deliveries": 3, "processed": 2, "quarantined": 1}.
    """
    from receiver.reprocessing import ReprocessSelection, select_deliveries
    from receiver.reprocessing import reprocess as run
    from receiver.terminal import Progress

    engine = _engine(ctx)
    selection = ReprocessSelection(
        hook=hook, since=_parse_since(since), quarantined=quarantined, reason=reason
    )
    ids = select_deliveries(engine, selection)
    progress = Progress("reprocessing", len(ids), quiet=quiet)
    with progress.shown():
        report = run(engine, ids, max_depth=_settings(ctx).max_depth, progress=progress.advance)
    click.echo(json.dumps(report.as_dict()))


@main.command("export")
@click.option("--out", "dest", required=True, help="folder or URI (s3://bucket/prefix)")
@click.option("--since", help="export nothing received before this ISO time")
@click.option("--table", "tables_", multiple=True, help="only this dataset (repeatable)")
@click.option("--with-bodies", is_flag=True, help="include the raw delivery bodies")
@click.option("--lag", default=2.0, show_default=True, help="skip the last SECONDS received")
@click.option("--quiet", is_flag=True, help="no progress and no summary (for cron)")
@click.pass_context
def export_command(
    ctx: click.Context,
    dest: str,
    since: str | None,
    tables_: tuple[str, ...],
    with_bodies: bool,
    lag: float,
    quiet: bool,
) -> None:
    """Write tasks, delivery metadata, result tables and rollups to DEST as Parquet.

    Incremental: DEST/_manifest.json records what each run wrote, and the next
    run exports only what is new. One run at a time per local DEST: a second
    fails at once. The README's Analyst recipes section shows the layout.
    """
    import datetime as dt

    from receiver.classify import parse_time
    from receiver.errors import ReceiverError
    from receiver.export import export
    from receiver.terminal import Progress

    when = None
    if since:
        when = parse_time(since)
        if when is None:
            raise click.BadParameter(f"not an ISO time: {since}")
    options: dict[str, Any] = {
        "since": when,
        "tables": tables_,
        "with_bodies": with_bodies,
        "lag": dt.timedelta(seconds=lag),
    }
    engine = _engine(ctx)
    ctx.call_on_close(engine.dispose)
    progress = Progress("exporting", None, quiet=quiet)
    rows: dict[str, int] = {}

    def show(name: str, done: int) -> None:
        rows[name] = done
        progress.advance(sum(rows.values()), f"{name}: {done:,} rows", key=name)

    try:
        with progress.shown():
            report = export(engine, dest, progress=show, **options)
    except (ValueError, ReceiverError) as error:  # e.g. another export holds DEST's lock
        raise click.ClickException(str(error)) from error
    if not quiet:
        summary = {name: d.rows for name, d in report.datasets.items()}
        click.echo(json.dumps({"until": report.until.isoformat(), "rows": summary}))


@main.command()
@click.option(
    "--by",
    "by",
    multiple=True,
    default=("day",),
    show_default=True,
    help="day, week, month, hook, status or label:KEY (repeatable)",
)
@click.option("--since", help="first UTC day (YYYY-MM-DD), inclusive")
@click.option("--until", help="last UTC day (YYYY-MM-DD), inclusive")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table fits the terminal; json and csv carry every value whole",
)
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="at most this many groups")
@click.pass_context
def costs(
    ctx: click.Context,
    by: tuple[str, ...],
    since: str | None,
    until: str | None,
    format_: str,
    limit: int | None,
) -> None:
    """Sum task costs, tokens and compute time from the cost_daily / cost_by_label views.

    Tasks of unknown cost are counted apart (the unknown cost column), never as $0.
    A sum marked + leaves out tasks that did not report that value.
    """
    import csv
    import datetime as dt

    from receiver import rollups
    from receiver.db import check_schema
    from receiver.errors import SchemaOutOfDate

    engine = _engine(ctx)
    ctx.call_on_close(engine.dispose)
    try:
        # An older schema would fail with a raw SQL error, or sum an older rollup.
        check_schema(engine)
    except SchemaOutOfDate as error:
        raise click.ClickException(str(error)) from error
    try:
        first = dt.date.fromisoformat(since) if since else None
        last = dt.date.fromisoformat(until) if until else None
        rows = rollups.costs(engine, by, since=first, until=last)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    if limit is not None:
        rows = rows[:limit]
    columns = list(by)
    records = [r.as_dict(columns) for r in rows]
    if format_ == "json":
        click.echo(json.dumps(records, indent=2))
        return
    if format_ == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=[*columns, *rollups.MEASURES])
        writer.writeheader()
        writer.writerows(records)
        return
    from receiver.terminal import Column, print_listing

    total = rollups.total(rows)
    shown = [_measure_cells(columns, r) for r in rows]
    shown.append(_measure_cells(columns, total, label="total"))
    partial = bool(total.partial)
    print_listing(
        "costs",
        [
            *(Column(c, c, whole=c in ("day", "week", "month", "status")) for c in columns),
            Column("tasks", "tasks", right=True, whole=True),
            Column("tasks_unknown_cost", "cost unknown", right=True, whole=True),
            Column("input_tokens", "in tokens", right=True, drop=2),
            Column("output_tokens", "out tokens", right=True, drop=1),
            Column("total_tokens", "tokens", right=True, drop=4),
            Column("compute_time_s", "compute s", right=True, drop=3),
            Column("cost_usd", "USD", right=True, whole=True),
        ],
        shown,
        note="+: the sum of the tasks that reported it; others did not (unknown)"
        if partial
        else "",
    )


def _measure_cells(columns: list[str], row: Any, label: str | None = None) -> dict[str, str]:
    """One costs row as text: unknown is said, and a sum that leaves some out is marked +."""
    from receiver.terminal import count, money

    def mark(name: str, text: str) -> str:
        return text + "+" if name in row.partial else text

    key = [label, *[""] * (len(columns) - 1)] if label is not None else list(row.key)
    return {
        **{c: "" if v is None else str(v) for c, v in zip(columns, key, strict=True)},
        "tasks": f"{row.tasks:,}",
        "tasks_unknown_cost": f"{row.tasks_unknown_cost:,}",
        "input_tokens": mark("input_tokens", count(row.input_tokens)),
        "output_tokens": mark("output_tokens", count(row.output_tokens)),
        "total_tokens": mark("total_tokens", count(row.total_tokens)),
        "compute_time_s": mark("compute_time_s", count(row.compute_time_s, ",.1f")),
        "cost_usd": mark("cost_usd", money(row.cost_usd)),
    }


if __name__ == "__main__":  # pragma: no cover
    main()
