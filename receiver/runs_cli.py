"""``receiver run``, ``receiver runs ...`` and ``receiver reconcile``: thin over `runs`/`reconcile`.

Registered on the main group by `receiver.cli`, whose helpers it imports when a command
runs (`receiver.cli` imports this module, so not before). Each docstring is the
command's ``--help``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from receiver.errors import WebRunError
from receiver.inspection import format_option
from receiver.terminal import Column, Format, print_listing

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from receiver.runs import RunInfo
    from receiver.settings import Settings
    from receiver.webrun import WebRunClient

#: `receiver.runs.SUBMITTED_DATA`, spelt out: importing `runs` (ORM, httpx) here would slow
#: every command, and `receiver costs` must answer fast (a test keeps the two equal).
SUBMITTED_DATA = ("full_response", "ai_response", "just_ping")

#: The runs table; --format json has every field, whole.
_COLUMNS = [
    Column("id", "run"),
    Column("hook", "hook"),
    Column("state", "state"),
    Column("session_id", "session"),
    Column("task_id", "task"),
    Column("created_at", "created"),
    Column("attempts", "attempts"),
    Column("last_error", "last error"),
]


def _engine(ctx: click.Context) -> Engine:
    from receiver.cli import _engine as engine_of

    return engine_of(ctx)


def _settings(ctx: click.Context) -> Settings:
    from receiver.cli import _settings as settings_of

    return settings_of(ctx)


def _render(runs: list[RunInfo], format_: str, title: str = "runs") -> None:
    print_listing(title, _COLUMNS, [asdict(r) for r in runs], format_)


def _client(settings: Settings) -> WebRunClient:
    from receiver.webrun import WebRunClient

    try:
        return WebRunClient.from_settings(settings)
    except WebRunError as exc:
        raise click.UsageError(str(exc)) from exc


def _labels(labels: tuple[str, ...]) -> dict[str, str]:
    pairs = [label.partition("=") for label in labels]
    if any(not sep or not key for key, sep, _ in pairs):
        raise click.BadParameter("a label is KEY=VALUE", param_hint="--label")
    return {k: v for k, _, v in pairs}


def _configs(
    task: str | None,
    config_file: Any,
    from_file: Path | None,
    output_type: str | None,
    schema_file: Any,
    max_duration: int | None,
) -> list[dict[str, Any]]:
    if sum(x is not None for x in (task, config_file, from_file)) != 1:
        raise click.UsageError("give one of --task TEXT, --config FILE or --from FILE.jsonl")
    if from_file is not None:
        lines = [ln for ln in from_file.read_text().splitlines() if ln.strip()]
        try:
            configs = [json.loads(line) for line in lines]
        except ValueError as exc:
            raise click.BadParameter(f"not JSON lines: {exc}", param_hint="--from") from exc
    elif config_file is not None:
        configs = [json.load(config_file)]
    else:
        configs = [{"taskDetails": task}]
    if not all(isinstance(c, dict) for c in configs):
        raise click.BadParameter("a task config is a JSON object")
    for config in configs:
        if output_type is not None:
            config["outputType"] = output_type
        if schema_file is not None:
            schema_file.seek(0)
            config["outputSchema"] = schema = json.load(schema_file)
            # A list of column names is a CSV schema, an object a JSON Schema.
            implied = "structured_csv" if isinstance(schema, list) else "structured_json"
            config.setdefault("outputType", implied)
        if max_duration is not None:
            config["maxDuration"] = max_duration
    return configs


@click.command("run")
@click.option("--hook", required=True, help="the hook the webhook is delivered to")
@click.option("--task", help="taskDetails: what the agent should do")
@click.option("--config", "config_file", type=click.File("r"), help="a WebRun TaskConfig (JSON)")
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="one TaskConfig per line (JSON lines): launched in turn, within the rate limit",
)
@click.option(
    "--submitted-data",
    type=click.Choice(SUBMITTED_DATA),
    default="full_response",
    show_default=True,
)
@click.option("--output-type", type=click.Choice(["text", "structured_json", "structured_csv"]))
@click.option("--schema", "schema_file", type=click.File("r"), help="outputSchema (JSON)")
@click.option("--max-duration", type=int, help="maxDuration in milliseconds (1000-300000)")
@click.option("--label", "labels", multiple=True, help="label KEY=VALUE on the webhook URL")
@format_option(Format.TABLE, Format.JSON)
@click.pass_context
def run(
    ctx: click.Context,
    hook: str,
    task: str | None,
    config_file: Any,
    from_file: Path | None,
    submitted_data: str,
    output_type: str | None,
    schema_file: Any,
    max_duration: int | None,
    labels: tuple[str, ...],
    format_: str,
) -> None:
    """Launch a WebRun task whose webhook comes to HOOK, and record it as a run.

    Prints the run id, sessionId, taskId and state. A task WebRun refuses (402,
    429 after retries, 503, a bad key) is recorded as launch_failed with the reason
    and the command exits 1 with a one-line error.
    """
    from receiver.db import upgrade
    from receiver.runs import launch, run_token
    from receiver.terminal import Progress

    settings = _settings(ctx)
    configs = _configs(task, config_file, from_file, output_type, schema_file, max_duration)
    wanted = _labels(labels)
    engine = _engine(ctx)
    upgrade(engine)
    token = run_token(engine, settings, hook)
    launched: list[RunInfo] = []
    failures: list[str] = []
    # A single task is a batch of one that shows no progress and whose refusal ends it.
    single = from_file is None
    progress = Progress("launching", len(configs), quiet=single)
    with _client(settings) as client, progress.shown():
        for done, config in enumerate(configs, 1):
            try:
                launched.append(
                    launch(
                        engine,
                        settings,
                        client,
                        hook=hook,
                        config=config,
                        token=token,
                        submitted_data=submitted_data,
                        labels=wanted,
                    )
                )
            except WebRunError as exc:
                if single:
                    raise click.ClickException(f"launch failed: {exc}") from exc
                failures.append(str(exc))
            progress.advance(done)
    _render(launched, format_, "launched")
    if failures:
        raise click.ClickException(f"{len(failures)} launch(es) failed; first: {failures[0]}")


@click.group("runs")
def runs() -> None:
    """List, show and track WebRun runs (tasks launched or watched)."""


@runs.command("list")
@click.option("--state", "states", multiple=True, help="launched, delivered, reconciled, ...")
@click.option("--hook")
@click.option("--limit", default=100, show_default=True)
@format_option(Format.TABLE, Format.JSON)
@click.pass_context
def runs_list(
    ctx: click.Context, states: tuple[str, ...], hook: str | None, limit: int, format_: str
) -> None:
    """List the newest runs."""
    from receiver.runs import list_runs

    _render(list_runs(_engine(ctx), states=states, hook=hook, limit=limit), format_)


@runs.command("show")
@click.argument("run_id")
@click.pass_context
def runs_show(ctx: click.Context, run_id: str) -> None:
    """Show one run as JSON (its config is stored without secrets)."""
    from receiver.runs import show

    found = show(_engine(ctx), run_id)
    if found is None:
        raise click.ClickException(f"no run {run_id}")
    click.echo(json.dumps(found.as_dict(), indent=2))


@runs.command("track")
@click.argument("session_id")
@click.argument("task_id")
@click.option("--hook", required=True, help="the hook its deliveries come to")
@click.option("--max-duration", type=int, default=300_000, show_default=True, help="ms")
@click.pass_context
def runs_track(
    ctx: click.Context, session_id: str, task_id: str, hook: str, max_duration: int
) -> None:
    """Watch a task launched by another tool, so its result is fetched if it is not delivered."""
    from receiver.runs import track

    found = track(
        _engine(ctx),
        _settings(ctx),
        session_id=session_id,
        task_id=task_id,
        hook=hook,
        max_duration_ms=max_duration,
    )
    _render([found], "table", "tracked")


@click.command("reconcile")
@click.option("--once", is_flag=True, help="one pass, then exit")
@click.pass_context
def reconcile(ctx: click.Context, once: bool) -> None:
    """Fetch from WebRun the final record of every overdue run (serve does it too).

    Each answer is stored and processed like a delivery. Without --once, passes
    repeat every RECEIVER_RECONCILE_INTERVAL_SECONDS until interrupted.
    """
    from receiver.db import check_schema
    from receiver.reconcile import standalone

    settings = _settings(ctx)
    engine = _engine(ctx)
    check_schema(engine)
    try:
        with standalone(engine, settings) as one_pass:
            while True:
                outcomes = one_pass()
                summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
                click.echo(f"reconciled: {summary or 'nothing due'}")
                if once:
                    break
                time.sleep(settings.reconcile_interval_seconds)
    except WebRunError as exc:
        raise click.UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        pass
