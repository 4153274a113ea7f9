"""How the console shows bytes: pretty JSON, CSV as a table, text, or hex when not UTF-8.

Pure, and display only: the stored bytes are never changed, and what is cut
for the page says how much was left out.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

#: Most bytes shown as hex, and most CSV rows shown as a table.
HEX_LIMIT = 64 * 1024
CSV_ROWS = 200


@dataclass
class BodyView:
    """One body ready for a template: ``kind`` is json, csv, text or hex."""

    kind: str
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    #: What the page leaves out, in words ("" when nothing).
    cut: str = ""


def hex_dump(data: bytes, limit: int = HEX_LIMIT) -> str:
    """``offset  hex bytes  |ascii|``, 16 bytes a line, as ``xxd`` shows them."""
    lines = []
    for offset in range(0, min(len(data), limit), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        shown = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  |{shown}|")
    return "\n".join(lines)


def view_text(content: str, content_type: str | None) -> BodyView:
    """Text as JSON (pretty) or CSV (a table) when it is that, else as it is."""
    media = (content_type or "").split(";")[0].strip().lower()
    stripped = content.lstrip()
    if media.endswith("json") or stripped[:1] in ("{", "["):
        try:
            value = json.loads(content)
        except ValueError:
            pass
        else:
            return BodyView("json", json.dumps(value, indent=2, ensure_ascii=False))
    if "csv" in media:
        rows = list(csv.reader(io.StringIO(content)))
        cut = ""
        if len(rows) > CSV_ROWS:
            cut = f"first {CSV_ROWS} of {len(rows)} rows shown"
            rows = rows[:CSV_ROWS]
        return BodyView("csv", content, rows, cut)
    return BodyView("text", content)


def view_body(body: bytes, content_type: str | None) -> BodyView:
    """A raw delivery body as the console shows it."""
    try:
        content = body.decode("utf-8")
    except UnicodeDecodeError:
        cut = f"first {HEX_LIMIT:,} of {len(body):,} bytes shown" if len(body) > HEX_LIMIT else ""
        return BodyView("hex", hex_dump(body), cut=cut)
    return view_text(content, content_type)


def view_output(content: str, output_type: str) -> BodyView:
    """A normalised output (text, JSON text or CSV text) as the console shows it."""
    kinds = {"structured_json": "application/json", "structured_csv": "text/csv"}
    return view_text(content, kinds.get(output_type, "text/plain"))
