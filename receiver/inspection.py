"""The CLI's read-only commands: listings (hooks list, tables, deliveries, tasks, costs) and
show commands, each a few lines over `receiver.listings` or `receiver.rollups`, rendered by
`receiver.terminal`. `receiver.cli` adds them to its groups.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from receiver.states import DeliveryStatus
from receiver.terminal import Format

if TYPE_CHECKING:
    from sqlalchemy import Engine


def _engine(ctx: click.Context) -> Engine:
    from receiver.cli import _engine as engine_of  # the group's engine, made once per run

    return engine_of(ctx)


def since_option(help_: str = "only what is newer: an ISO time, or a day (YYYY-MM-DD)") -> Any:
    return click.option("--since", help=help_)


def format_option(*formats: Format) -> Callable[[Any], Any]:
    """--format, as every command that has one spells it (default: every format; a command
    whose answer is no list of flat records offers fewer)."""
    names = [f.value for f in formats or Format]
    whole = [name for name in names if name != Format.TABLE]
    carry = "carry" if len(whole) > 1 else "carries"
    return click.option(
        "--format",
        "format_",
        type=click.Choice(names),
        default=Format.TABLE.value,
        show_default=True,
        help=f"table fits the terminal; {' and '.join(whole)} {carry} every value whole",
    )


def listing_options(default_limit: int | None = 50) -> Callable[[Any], Any]:
    """--format, --limit and --since, as every listing takes them."""

    def decorate(command: Any) -> Any:
        command = format_option()(command)
        command = click.option(
            "--limit",
            type=click.IntRange(min=1),
            metavar="N",
            default=default_limit,
            show_default=default_limit is not None,
            help="at most this many rows",
        )(command)
        return since_option()(command)

    return decorate


def parse_since(since: str | None) -> Any:
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


@click.command("list")
@listing_options(default_limit=None)
@click.pass_context
def hooks_list(ctx: click.Context, since: str | None, limit: int | None, format_: str) -> None:
    """List hooks with their output type, live tokens of their own and deliveries."""
    from dataclasses import asdict

    from receiver import listings
    from receiver.terminal import Column, print_listing

    rows = listings.list_hooks(_engine(ctx), since=parse_since(since), limit=limit)
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


@click.command()
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

    found = listings.list_tables(_engine(ctx), since=parse_since(since), limit=limit)
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


@click.group()
def deliveries() -> None:
    """Inspect stored deliveries."""


@deliveries.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in DeliveryStatus]),
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
        status=DeliveryStatus(status) if status else None,
        kind=kind,
        task_id=task_id,
        label=pair,
        since=parse_since(since),
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
    if row.body_pruned_at is not None:
        click.echo(f"--- body pruned at {row.body_pruned_at} (retention) ---")
    else:
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


@click.group()
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

    where = listings.TaskFilter(status=status, hook=hook, since=parse_since(since))
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


@click.command()
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
@format_option()
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
    import datetime as dt

    from receiver import rollups
    from receiver.terminal import Column, print_listing

    # An older schema would fail with a raw SQL error, or sum an older rollup: _engine checks.
    engine = _engine(ctx)
    ctx.call_on_close(engine.dispose)
    try:
        first = dt.date.fromisoformat(since) if since else None
        last = dt.date.fromisoformat(until) if until else None
        rows = rollups.costs(engine, by, since=first, until=last)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    if limit is not None:
        rows = rows[:limit]
    columns = list(by)
    listed = [
        *(Column(c, c, whole=c in ("day", "week", "month", "status")) for c in columns),
        Column("tasks", "tasks", right=True, whole=True),
        Column("tasks_unknown_cost", "cost unknown", right=True, whole=True),
        Column("input_tokens", "in tokens", right=True, drop=2),
        Column("output_tokens", "out tokens", right=True, drop=1),
        Column("total_tokens", "tokens", right=True, drop=4),
        Column("compute_time_s", "compute s", right=True, drop=3),
        Column("cost_usd", "USD", right=True, whole=True),
    ]
    if format_ != Format.TABLE:
        print_listing("costs", listed, [r.as_dict(columns) for r in rows], format_)
        return
    total = rollups.total(rows)
    shown = [_measure_cells(columns, r) for r in rows]
    shown.append(_measure_cells(columns, total, label="total"))
    partial = bool(total.partial)
    print_listing(
        "costs",
        listed,
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
