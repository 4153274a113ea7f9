"""The README's CLI reference, generated from the commands' own help.

``python -m receiver.clidoc`` rewrites the section of README.md between
``<!-- cli:start -->`` and ``<!-- cli:end -->``; ``--check`` only says whether
it is current (a test runs that), so a command added or changed anywhere is
picked up by rerunning it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

START = "<!-- cli:start -->"
END = "<!-- cli:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(
    command: click.Command, ctx: click.Context
) -> Iterator[tuple[click.Command, click.Context]]:
    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference(root: click.Command | None = None) -> str:
    """Markdown for every command: usage, help text and options, in the CLI's own words."""
    if root is None:
        from receiver.cli import main

        root = main
    out: list[str] = []
    for command, ctx in _commands(root, click.Context(root, info_name="receiver")):
        path = ctx.command_path
        out.append(f"### `{path}`" if ctx.parent else f"Usage: `{path} COMMAND`")
        out.append("")
        if ctx.parent:
            pieces = " ".join(command.collect_usage_pieces(ctx))
            out += [f"Usage: `{path} {pieces}`", ""]
        help_text = (command.help or "").strip()
        for paragraph in help_text.split("\n\n"):
            out += [" ".join(line.strip() for line in paragraph.splitlines()), ""]
        records = [
            record
            for param in command.get_params(ctx)
            if isinstance(param, click.Option)
            and "--help" not in param.opts
            and (record := param.get_help_record(ctx)) is not None
        ]
        if records:
            out += ["| option | meaning |", "| --- | --- |"]
            out += [f"| `{_cell(opts)}` | {_cell(meaning)} |" for opts, meaning in records]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def current(readme: str) -> str:
    start = readme.index(START) + len(START)
    return readme[start : readme.index(END)].strip("\n") + "\n"


def rewrite(readme: str) -> str:
    start = readme.index(START) + len(START)
    return readme[:start] + "\n" + reference() + readme[readme.index(END) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    if "--check" in args:
        if current(text) != reference():
            print("README.md's CLI reference is out of date: run python -m receiver.clidoc")
            return 1
        return 0
    README.write_text(rewrite(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
