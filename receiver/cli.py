"""The ``receiver`` command: a thin click layer over the library.

Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import json
import os
import sys
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
    from rich.console import Console
    from rich.table import Table as RichTable

    table = RichTable(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


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
    again with a new schema, then `reprocess --hook NAME --quarantined`.
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
@click.pass_context
def hooks_list(ctx: click.Context) -> None:
    """List hooks with their output type, live tokens and deliveries."""
    from sqlalchemy import func, select

    from receiver.models import Delivery, Hook, Token

    engine = _engine(ctx)
    with engine.connect() as conn:
        tokens = dict(
            conn.execute(
                select(Token.hook, func.count())
                .where(Token.revoked_at.is_(None))
                .group_by(Token.hook)
            ).all()
        )
        counts = dict(
            conn.execute(select(Delivery.hook, func.count()).group_by(Delivery.hook)).all()
        )
        rows = conn.execute(select(Hook.name, Hook.output_type, Hook.created_at)).all()
    _print_table(
        "hooks",
        ["hook", "output type", "own tokens", "deliveries", "created"],
        [
            [r.name, r.output_type, tokens.get(r.name, 0), counts.get(r.name, 0), r.created_at]
            for r in rows
        ],
    )


@hooks.command("rotate")
@click.argument("name")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.pass_context
def hooks_rotate(ctx: click.Context, name: str, url: str) -> None:
    """Add a new token to NAME; the old ones stay valid until `hooks revoke`."""
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


def _source_text(key: Any) -> str:
    """A catalogued source key (a JSON path, nested for variants) as ``a.b.#variant:text``."""
    if isinstance(key, list):
        return ".".join(_source_text(part) for part in key)
    return str(key)


@main.command()
@click.pass_context
def tables(ctx: click.Context) -> None:
    """List result tables: hook, parent, columns (with the source key each came from)."""
    from sqlalchemy import select

    from receiver.models import ResultColumn, ResultTable

    engine = _engine(ctx)
    with engine.connect() as conn:
        tables_ = conn.execute(select(ResultTable.__table__).order_by(ResultTable.table_name)).all()
        columns = conn.execute(
            select(ResultColumn.__table__).order_by(ResultColumn.table_name, ResultColumn.position)
        ).all()
    by_table: dict[str, list[str]] = {}
    for c in columns:
        source = _source_text(json.loads(c.source_key))
        shown = f"{c.column_name} {c.type}"
        if source != c.column_name:
            shown += f" <- {source!r}"
        by_table.setdefault(c.table_name, []).append(shown)
    _print_table(
        "result tables",
        ["table", "hook", "parent", "columns"],
        [
            [t.table_name, t.hook, t.parent_table, ", ".join(by_table.get(t.table_name, []))]
            for t in tables_
        ],
    )


@main.group()
def deliveries() -> None:
    """Inspect stored deliveries."""


@deliveries.command("list")
@click.option("--status", help="stored, processed, duplicate or quarantined")
@click.option("--hook")
@click.option("--limit", default=50, show_default=True)
@click.pass_context
def deliveries_list(ctx: click.Context, status: str | None, hook: str | None, limit: int) -> None:
    """List the newest deliveries."""
    from sqlalchemy import select

    from receiver.models import Delivery

    query = (
        select(
            Delivery.id,
            Delivery.hook,
            Delivery.received_at,
            Delivery.status,
            Delivery.kind,
            Delivery.output_type,
            Delivery.body_size,
            Delivery.reason,
        )
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Delivery.status == status)
    if hook:
        query = query.where(Delivery.hook == hook)
    with _engine(ctx).connect() as conn:
        rows = conn.execute(query).all()
    _print_table(
        "deliveries",
        ["id", "hook", "received", "status", "kind", "output", "bytes", "reason"],
        [list(r) for r in rows],
    )


@deliveries.command("show")
@click.argument("delivery_id")
@click.pass_context
def deliveries_show(ctx: click.Context, delivery_id: str) -> None:
    """Show one delivery: its metadata, stored body, and what was derived from it."""
    from sqlalchemy import select

    from receiver.models import Delivery, Output, Task

    with _engine(ctx).connect() as conn:
        row = conn.execute(select(Delivery.__table__).where(Delivery.id == delivery_id)).first()
        if row is None:
            raise click.ClickException(f"no delivery {delivery_id}")
        output = conn.execute(
            select(Output.__table__).where(Output.delivery_id == delivery_id)
        ).first()
        task = None
        if row.task_id is not None:
            task = conn.execute(
                select(Task.__table__).where(Task.task_id == row.task_id, Task.hook == row.hook)
            ).first()
    meta = {k: v for k, v in row._mapping.items() if k != "body"}
    click.echo(json.dumps(meta, indent=2, default=str))
    click.echo("--- body ---")
    sys.stdout.write(row.body.decode("utf-8", "replace") + "\n")
    if output is not None:
        click.echo(f"--- output ({output.output_type}) ---")
        click.echo(output.content)
    if task is not None:
        click.echo("--- task ---")
        click.echo(json.dumps(dict(task._mapping), indent=2, default=str))


@main.command()
@click.option("--hook", help="only this hook's deliveries")
@click.option("--since", help="only deliveries received at or after this ISO time")
@click.option("--quarantined", is_flag=True, help="only quarantined deliveries")
@click.pass_context
def reprocess(ctx: click.Context, hook: str | None, since: str | None, quarantined: bool) -> None:
    """Rebuild derived rows of the chosen deliveries from the raw ledger (idempotent)."""
    from sqlalchemy import select

    from receiver.classify import parse_time
    from receiver.models import Delivery
    from receiver.pipeline import process_delivery

    engine = _engine(ctx)
    query = select(Delivery.id).where(Delivery.status != "duplicate").order_by(Delivery.id)
    if hook:
        query = query.where(Delivery.hook == hook)
    if since:
        when = parse_time(since)
        if when is None:
            raise click.BadParameter(f"not an ISO time: {since}")
        query = query.where(Delivery.received_at >= when)
    if quarantined:
        query = query.where(Delivery.status == "quarantined")
    with engine.connect() as conn:
        ids = list(conn.scalars(query))
    counts: dict[str, int] = {}
    with click.progressbar(ids, label="reprocessing", file=sys.stderr) as bar:
        for delivery_id in bar:
            outcome = process_delivery(engine, delivery_id, max_depth=_settings(ctx).max_depth)
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
    click.echo(json.dumps({"deliveries": len(ids), **counts}))


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
    fails at once. See `receiver.export` for the layout.
    """
    import datetime as dt

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from receiver.classify import parse_time
    from receiver.errors import ReceiverError
    from receiver.export import export

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
    try:
        if quiet:
            report = export(engine, dest, **options)
        else:
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), console=Console(stderr=True)
            ) as bar:
                tasks: dict[str, Any] = {}

                def show(name: str, rows: int) -> None:
                    if name not in tasks:
                        tasks[name] = bar.add_task(name)
                    bar.update(tasks[name], description=f"{name}: {rows:,} rows")

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
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.pass_context
def costs(
    ctx: click.Context, by: tuple[str, ...], since: str | None, until: str | None, format_: str
) -> None:
    """Sum task costs, tokens and compute time from the cost_daily / cost_by_label views.

    Unknown costs are counted apart (``unknown cost``), never as $0.
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
    total = rollups.total(rows)
    cells = [[*r.key, *_measure_cells(r)] for r in rows]
    cells.append(["total", *[""] * (len(columns) - 1), *_measure_cells(total)])
    _print_table(
        "costs",
        [
            *columns,
            "tasks",
            "cost unknown",
            "in tokens",
            "out tokens",
            "tokens",
            "compute s",
            "USD",
        ],
        cells,
    )


def _measure_cells(row: Any) -> list[str]:
    def number(value: float | int | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    cost = "unknown" if row.cost_usd is None else f"${row.cost_usd:,.4f}"
    return [
        f"{row.tasks:,}",
        f"{row.tasks_unknown_cost:,}",
        number(row.input_tokens, ","),
        number(row.output_tokens, ","),
        number(row.total_tokens, ","),
        number(row.compute_time_s, ",.1f"),
        cost,
    ]


# WebRun runs and reconciliation (receiver.runs_cli): imported last, it uses the helpers above.
from receiver.runs_cli import reconcile, run, runs  # noqa: E402

main.add_command(run)
main.add_command(runs)
main.add_command(reconcile)

if __name__ == "__main__":  # pragma: no cover
    main()
