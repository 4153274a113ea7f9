"""Column names and value types shared by the CSV and JSON loaders.

Result tables are built from payloads, so every identifier here comes from
untrusted text: it is reduced to ``[a-z0-9_]``, bounded in length, and the
original is kept in the catalog so nothing about the name is lost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import unicodedata
from enum import StrEnum
from typing import TypeAlias

#: A parsed JSON document, as the stdlib parser returns it.
JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None

#: What a loader may put in a cell. JSON values travel as their JSON text.
Cell: TypeAlias = int | float | bool | str | dt.datetime | dt.date | None

#: PostgreSQL truncates identifiers at 63 bytes; leave room for the
#: ``results__`` prefix, ``__`` nesting and ``__v_timestamp`` variant suffixes.
MAX_IDENTIFIER = 40

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_UNSAFE = re.compile(r"[^a-z0-9_]+")
_UNDERSCORES = re.compile(r"_+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class ColumnType(StrEnum):
    """The logical type of a result column; `schema` maps it to SQL."""

    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    DATE = "date"
    TIMESTAMP = "timestamp"
    TEXT = "text"
    JSON = "json"


def sanitise_identifier(name: str, *, fallback: str = "col") -> str:
    """Reduce ``name`` to a short snake_case ``[a-z0-9_]`` identifier.

    Runs of underscores collapse to one, so ``__`` stays free to mean nesting.
    A name that had to be shortened ends in a hash of the original, so two
    long names that share a prefix stay distinct.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    ascii_name = _CAMEL.sub("_", ascii_name)  # inStock -> in_stock, as analysts write SQL
    cleaned = _UNDERSCORES.sub("_", _UNSAFE.sub("_", ascii_name.lower())).strip("_")
    if not cleaned:
        cleaned = fallback
    if cleaned[0].isdigit():
        cleaned = f"c_{cleaned}"
    if len(cleaned) > MAX_IDENTIFIER:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_IDENTIFIER - 9].rstrip('_')}_{digest}"
    return cleaned


def unique_identifier(candidate: str, taken: set[str]) -> str:
    """Return ``candidate``, or ``candidate_2``, ``_3``... whichever is not in ``taken``."""
    if candidate not in taken:
        return candidate
    n = 2
    while True:
        suffix = f"_{n}"
        name = f"{candidate[: MAX_IDENTIFIER - len(suffix)]}{suffix}"
        if name not in taken:
            return name
        n += 1


def unique_identifiers(names: list[str], *, fallback: str = "col") -> list[str]:
    """Sanitise each name and make the results distinct, in order."""
    taken: set[str] = set()
    out: list[str] = []
    for name in names:
        ident = unique_identifier(sanitise_identifier(name, fallback=fallback), taken)
        taken.add(ident)
        out.append(ident)
    return out
