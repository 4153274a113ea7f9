"""The README's settings table is generated from `receiver.settings.SETTINGS_DOC`."""

from __future__ import annotations

from pathlib import Path

from receiver.settings import SETTINGS_DOC

README = Path(__file__).resolve().parents[1] / "README.md"


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | `{default}` | {meaning} |" for name, default, meaning in SETTINGS_DOC]
    return "\n".join(lines)


def test_settings_table_matches_code() -> None:
    text = README.read_text()
    start = text.index("<!-- settings:start -->") + len("<!-- settings:start -->")
    end = text.index("<!-- settings:end -->")
    assert text[start:end].strip() == settings_table()
