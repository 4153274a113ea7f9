"""Secrets stay secret: credentials in a URL or a header are masked before anything is stored.

Some users paste their token into the webhook URL (``?token=...``). A label
whose name looks like a credential (`SECRET_NAME`: token, auth, key, secret,
password, signature, cookie...) or whose value is a token the receiver
accepts (one of ``RECEIVER_TOKEN`` or a stored token, with or without its
``Bearer`` prefix) has its value replaced by `MASK` in the query string
before the delivery is recorded, so ``deliveries.query_string`` keeps the raw
string with only those values masked, and the labels (``deliveries.labels``,
``tasks.labels``, ``rollup_label``, ``cost_by_label``, exports) and the spool
never see them. Request headers named like credentials are masked the same
way (``Authorization`` is never stored at all). The body is stored as sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote_plus

MASK = "[redacted]"
#: A label or header name that looks like a credential (searched, case-insensitive).
SECRET_NAME = re.compile(
    r"token|auth|key|secret|passw|pwd|signature|credential|cookie|bearer|private|jwt"
    r"|^(sig|pass|tok|code|otp)$",
    re.IGNORECASE,
)
#: A value that is an Authorization value whoever it belongs to.
_AUTH_VALUE = re.compile(r"^\s*(bearer|basic|token)\s+\S", re.IGNORECASE)

#: Whether a value is a token the receiver accepts for the hook (``receiver.auth``).
IsToken = Callable[[bytes], bool]


def is_secret(name: str, value: str, is_token: IsToken) -> bool:
    """A credential by its name, its form (``Bearer ...``) or its value (an accepted token)."""
    if SECRET_NAME.search(name) or _AUTH_VALUE.match(value):
        return True
    if not value:
        return False
    raw = value.encode("utf-8", "surrogateescape")
    return is_token(raw) or is_token(b"Bearer " + raw)


def redact_query(query_string: str, is_token: IsToken) -> str:
    """``query_string`` with each secret's value replaced by `MASK`; the rest byte for byte."""
    if not query_string:
        return query_string
    parts = query_string.split("&")
    for i, part in enumerate(parts):
        raw_name, equals, raw_value = part.partition("=")
        name = unquote_plus(raw_name, errors="surrogateescape")
        value = unquote_plus(raw_value, errors="surrogateescape")
        if equals and is_secret(name, value, is_token):
            parts[i] = f"{raw_name}={MASK}"
        elif not equals and raw_name and is_secret("", name, is_token):
            parts[i] = MASK  # a bare `?<token>`: the name is the secret
    return "&".join(parts)


def _never(raw: bytes) -> bool:
    return False


def redact_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Headers with a credential's value (by its name or its ``Bearer ...`` form) masked."""
    if not any(is_secret(k, v, _never) for k, v in headers):
        return headers
    return tuple((k, MASK if is_secret(k, v, _never) else v) for k, v in headers)
