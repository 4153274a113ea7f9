"""``data.files`` and ``data.network`` of a task record, as typed rows. Pure.

WebRun's completed records may list the files the agent downloaded and the
pages it visited, each with a Unix-milliseconds ``timestamp``. They get tables
of their own (``task_files``, ``task_network``) with real types, linked to the
delivery and its task. A value that does not fit its column (a timestamp that
is not a time, a name that is not a string) and every key we do not know go
into the row's ``extra`` JSON under their original names: nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from receiver.classify import parse_time
from receiver.columns import JsonValue

#: ``data.files`` item keys with a column of their own: JSON name -> column.
FILE_FIELDS = {"source": "source", "downloadUrl": "download_url", "filename": "filename"}
#: ``data.network`` entry keys with a column of their own.
NETWORK_FIELDS = {"id": "network_id", "taskId": "network_task_id"}


def _typed(
    item: Mapping[str, JsonValue], fields: Mapping[str, str], extra: dict[str, JsonValue]
) -> dict[str, Any]:
    """The string columns of ``item``; what is not a string goes to ``extra``."""
    out: dict[str, Any] = dict.fromkeys(fields.values())
    for name, column in fields.items():
        value = item.get(name)
        if isinstance(value, str):
            out[column] = value
        elif name in item:
            extra[name] = value
    return out


def _time(item: Mapping[str, JsonValue], extra: dict[str, JsonValue]) -> dt.datetime | None:
    if item.get("timestamp") is None:
        if "timestamp" in item:
            extra["timestamp"] = None
        return None
    when = parse_time(item["timestamp"])
    if when is None:
        extra["timestamp"] = item["timestamp"]
    return when


def _extra(extra: dict[str, JsonValue]) -> str | None:
    return json.dumps(extra, ensure_ascii=False) if extra else None


def file_rows(
    files: JsonValue, *, delivery_id: str, received_at: dt.datetime
) -> list[dict[str, Any]]:
    """One row per ``data.files`` item."""
    items = files if isinstance(files, list) else [files]
    rows = []
    for position, item in enumerate(items):
        extra: dict[str, JsonValue] = {}
        if isinstance(item, dict):
            typed = _typed(item, FILE_FIELDS, extra)
            timestamp = _time(item, extra)
            extra |= {k: v for k, v in item.items() if k not in FILE_FIELDS and k != "timestamp"}
        else:
            typed, timestamp = dict.fromkeys(FILE_FIELDS.values()), None
            extra["item"] = item
        rows.append(
            {
                "delivery_id": delivery_id,
                "position": position,
                "received_at": received_at,
                **typed,
                "timestamp": timestamp,
                "extra": _extra(extra),
            }
        )
    return rows


def network_rows(
    network: JsonValue, *, delivery_id: str, received_at: dt.datetime
) -> list[dict[str, Any]]:
    """One row per visited URL of each ``data.network`` entry (an entry with none: one row)."""
    entries = network if isinstance(network, list) else [network]
    rows: list[dict[str, Any]] = []
    for entry_index, entry in enumerate(entries):
        base_extra: dict[str, JsonValue] = {}
        if isinstance(entry, dict):
            typed = _typed(entry, NETWORK_FIELDS, base_extra)
            urls = entry.get("urls")
            known = {*NETWORK_FIELDS, "urls"}
            base_extra |= {k: v for k, v in entry.items() if k not in known}
            if urls is not None and not isinstance(urls, list):
                base_extra["urls"] = urls
                urls = None
        else:
            typed, urls = dict.fromkeys(NETWORK_FIELDS.values()), None
            base_extra["entry"] = entry
        visits: list[JsonValue | None] = list(urls) if urls else [None]
        for url_index, visit in enumerate(visits):
            extra = dict(base_extra)
            url, timestamp = None, None
            if isinstance(visit, dict):
                if isinstance(visit.get("url"), str):
                    url = visit["url"]
                elif "url" in visit:
                    extra["url"] = visit["url"]
                timestamp = _time(visit, extra)
                extra |= {k: v for k, v in visit.items() if k not in ("url", "timestamp")}
            elif visit is not None:
                extra["visit"] = visit
            rows.append(
                {
                    "delivery_id": delivery_id,
                    "row_index": len(rows),
                    "entry_index": entry_index,
                    "url_index": url_index if urls else None,
                    "received_at": received_at,
                    **typed,
                    "url": url,
                    "timestamp": timestamp,
                    "extra": _extra(extra),
                }
            )
    return rows
