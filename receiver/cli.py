"""The ``receiver`` command: a thin click layer over the library.

Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from receiver import inspection
from receiver.db import create_db_engine
from receiver.settings import Settings
from receiver.terminal import Format

if TYPE_CHECKING:
    from sqlalchemy import Engine

# Heavy imports (Alembic, the ORM models, rich, uvicorn, prometheus_client) live in the
# commands that use them: every command pays for what the module imports, and
# `receiver costs` must answer in well under a second.


def _engine(ctx: click.Context, *, migrated: bool = True) -> Engine:
    """The database engine; with ``migrated``, checked to be at the migrations' head first,
    so a command on an unmigrated or older database says so instead of failing in SQL."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "engine" not in obj:
        obj["engine"] = create_db_engine(obj["settings"])
        ctx.find_root().call_on_close(obj["engine"].dispose)
    engine: Engine = obj["engine"]
    if migrated and not obj.get("schema_checked"):
        from receiver.db import check_schema

        check_schema(engine)
        obj["schema_checked"] = True
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


#: How `serve` runs uvicorn (the benchmark's baseline runs the same way). In-flight
#: requests get 25 s to finish on SIGTERM; no access log: the receiver's own line per
#: delivery (`receiver.logs`) says more, and a second line per request is noise.
UVICORN_OPTIONS: dict[str, Any] = {
    "timeout_graceful_shutdown": 25,
    "access_log": False,
    # uvicorn's loggers keep the receiver's handler (receiver.logs), which never blocks nor raises.
    "log_config": None,
    # A head timeout and a connection cap on top of uvicorn's httptools (receiver.connections).
    "http": "receiver.connections:BoundedHttpProtocol",
}


class ReceiverGroup(click.Group):
    """Turns the errors a user can cause into one line on stderr and exit 1.

    A traceback only with ``--debug`` (or ``RECEIVER_DEBUG=1``).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            from receiver.diagnosis import explain

            settings = ctx.ensure_object(dict).get("settings")
            url = settings.database_url if isinstance(settings, Settings) else None
            message = explain(error, url)
            if message is None:
                message = (
                    f"unexpected {type(error).__name__}: {str(error)[:300]}"
                    " (run with --debug for the traceback)"
                )
            raise click.ClickException(message) from None


@click.group(cls=ReceiverGroup)
@click.version_option(package_name="webrun-receiver", prog_name="receiver")
@click.option(
    "--debug",
    is_flag=True,
    envvar="RECEIVER_DEBUG",
    help="show the traceback of an error instead of one line (also RECEIVER_DEBUG=1)",
)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
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
    engine = _engine(ctx, migrated=False)
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
@click.option("--hook", help="hook name  [default: the one in --url, else default]")
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="receiver base URL, or a full hook URL with its query string",
)
@click.option("--token", help="Authorization value  [default: the first RECEIVER_TOKEN]")
@click.option("--content-type", help="[default: the sample's, or guessed from FILE's name]")
@click.option("--label", "labels", multiple=True, help="query label KEY=VALUE (repeatable)")
@click.pass_context
def send(
    ctx: click.Context,
    file: Path | None,
    sample: str | None,
    list_samples: bool,
    hook: str | None,
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

    from receiver.sender import hook_url, post_delivery

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
    try:
        target = hook_url(url, hook, [(k, v) for k, _, v in pairs])
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--url") from None
    try:
        status, answer = post_delivery(target, body, content_type or guessed, token)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"could not reach {target}: {reason}") from None
    click.echo(f"{status} {answer.decode('utf-8', 'replace')}")
    if status != 200:
        ctx.exit(1)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or upgrade the core schema (Alembic migrations), and say what changed."""
    from receiver.db import upgrade

    before, after = upgrade(_engine(ctx, migrated=False))
    if before == after:
        click.echo(f"nothing to do: the database is already at {after} (the newest)")
    elif before is None:
        click.echo(f"created the schema: no receiver tables before, now at {after}")
    else:
        click.echo(f"upgraded the database from {before} to {after}")


@main.group()
def hooks() -> None:
    """Create, list, rotate and revoke hooks and their tokens."""


hooks.add_command(inspection.hooks_list)
for _command in (inspection.tables, inspection.deliveries, inspection.tasks, inspection.costs):
    main.add_command(_command)


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
    from receiver.hooknames import NAME_REFUSAL, valid_hook_name
    from receiver.models import Hook
    from receiver.schema import declare

    if not valid_hook_name(name):
        raise click.BadParameter(NAME_REFUSAL, param_hint="NAME")
    engine = _engine(ctx, migrated=False)
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
    from receiver.inspection import parse_since
    from receiver.reprocessing import ReprocessSelection, select_deliveries
    from receiver.reprocessing import reprocess as run
    from receiver.terminal import Progress

    engine = _engine(ctx)
    selection = ReprocessSelection(
        hook=hook, since=parse_since(since), quarantined=quarantined, reason=reason
    )
    ids = select_deliveries(engine, selection)
    progress = Progress("reprocessing", len(ids), quiet=quiet)
    with progress.shown():
        report = run(engine, ids, max_depth=_settings(ctx).max_depth, progress=progress.advance)
    click.echo(json.dumps(report.as_dict()))


@main.command()
@click.option("--older-than", required=True, help="a duration: 90s, 15m, 12h, 30d")
@click.option("--dry-run", is_flag=True, help="only count what would be removed")
@click.option("--include-quarantined", is_flag=True, help="prune quarantined bodies too")
@click.option("--vacuum", "vacuum_", is_flag=True, help="then give the space back (see README)")
@inspection.format_option(Format.TABLE, Format.JSON)
@click.pass_context
def prune(
    ctx: click.Context,
    older_than: str,
    dry_run: bool,
    include_quarantined: bool,
    vacuum_: bool,
    format_: str,
) -> None:
    """Remove raw bodies of processed and duplicate deliveries received over DURATION ago.

    Metadata (size, SHA-256, headers, status) and everything derived stay; each
    pruned delivery records when. In batches: safe to interrupt and rerun.
    """
    from receiver import retention
    from receiver.db import utcnow
    from receiver.settings import parse_duration
    from receiver.terminal import Progress

    try:
        cutoff = utcnow() - parse_duration(older_than)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--older-than") from error
    engine = _engine(ctx)
    # A dry run only counts: nothing to show progress of.
    progress = Progress("pruning", None, quiet=dry_run)

    def show(done: int, size: int, planned: int) -> None:
        progress.advance(done, f"pruned {done:,} deliveries, {size:,} B", total=planned)

    with progress.shown():
        report = retention.prune(
            engine, cutoff, include_quarantined=include_quarantined, dry_run=dry_run, progress=show
        )
    if vacuum_ and not dry_run:
        report.vacuum = retention.vacuum(engine)
    if format_ == "json":
        click.echo(json.dumps(report.as_dict()))
        return
    _print_table("prune (dry run)" if dry_run else "prune", ["", "value"], report.rows())


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


# WebRun runs and reconciliation (receiver.runs_cli): imported last, it uses the helpers above.
from receiver.runs_cli import reconcile, run, runs  # noqa: E402

main.add_command(run)
main.add_command(runs)
main.add_command(reconcile)

if __name__ == "__main__":  # pragma: no cover
    main()
