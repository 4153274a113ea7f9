"""Post a delivery to a receiver as WebRun would: what `receiver send` does, as a Python API."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

DEFAULT_HOOK = "default"


def hook_url(url: str, hook: str | None = None, labels: Sequence[tuple[str, str]] = ()) -> str:
    """The URL to POST to: ``url`` is a receiver's base URL or a full ``.../hooks/NAME`` URL.

    A query string in ``url`` is kept exactly as written and ``labels`` are appended
    to it, so what the receiver stores as labels is what the user typed. A hook
    named both in the URL and by ``hook`` must be the same one.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    _, sep, named = path.rpartition("/hooks/")
    if sep and named and "/" not in named:
        in_url = urllib.parse.unquote(named)
        if hook is not None and hook != in_url:
            raise ValueError(f"the URL names hook {in_url!r} but --hook says {hook!r}")
    else:
        path = f"{path}/hooks/{urllib.parse.quote(hook or DEFAULT_HOOK, safe='')}"
    query = "&".join(q for q in (parts.query, urllib.parse.urlencode(list(labels))) if q)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def post_delivery(
    target: str, body: bytes, content_type: str, token: str, *, timeout: float = 30
) -> tuple[int, bytes]:
    """POST ``body`` with ``token`` as the Authorization header; the status and answer.

    An HTTP error status is an answer, not an exception; `OSError` (from
    ``urllib``) means the receiver could not be reached.
    """
    request = urllib.request.Request(
        target,
        data=body,
        method="POST",
        headers={"Authorization": token, "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
