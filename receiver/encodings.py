"""Content-Encoding: a compressed body is stored as sent and decoded for processing.

The raw ledger keeps the bytes exactly as they came (their hash, their size);
the pipeline decodes ``gzip`` (``x-gzip``) and ``deflate`` (zlib or raw) before
classifying, with the body limit counted after decoding: a body that inflates
past ``RECEIVER_MAX_BODY_BYTES`` is quarantined once that many bytes are out,
so a zip bomb never grows memory past the limit. ``br`` is decoded only where
a Brotli library is installed (none is a dependency); any other coding is
quarantined naming it.
"""

from __future__ import annotations

import json
import zlib
from types import ModuleType

from receiver.errors import Quarantine

_GZIP_MAGIC = b"\x1f\x8b"
#: Bytes fed to the decompressor at a time.
_CHUNK = 1 << 16


def _brotli() -> ModuleType | None:
    try:
        import brotli  # type: ignore[import-not-found]
    except ImportError:
        return None
    module: ModuleType = brotli
    return module


def content_encodings(headers_json: str | None) -> list[str]:
    """The codings of the stored ``Content-Encoding`` headers, in the order applied."""
    if not headers_json:
        return []
    codings: list[str] = []
    for name, value in json.loads(headers_json):
        if str(name).lower() == "content-encoding":
            codings += [c.strip().lower() for c in str(value).split(",") if c.strip()]
    return [c for c in codings if c != "identity"]


def _too_large(coding: str, limit: int) -> Quarantine:
    return Quarantine(
        f"Content-Encoding {coding}: the body decodes to more than {limit} bytes"
        " (RECEIVER_MAX_BODY_BYTES, counted after decoding)"
    )


def _inflate(body: bytes, wbits: int, limit: int, coding: str) -> bytes:
    decoder = zlib.decompressobj(wbits)
    out = bytearray()
    try:
        for start in range(0, len(body), _CHUNK):
            out += decoder.decompress(body[start : start + _CHUNK], limit + 1 - len(out))
            if len(out) > limit or decoder.unconsumed_tail:
                raise _too_large(coding, limit)
        out += decoder.flush(limit + 1 - len(out))
    except zlib.error as exc:
        raise Quarantine(
            f"Content-Encoding {coding}, but the body is not {coding}: {exc}"
        ) from None
    if len(out) > limit:
        raise Quarantine(
            f"Content-Encoding {coding}: the body decodes to more than {limit} bytes"
            " (RECEIVER_MAX_BODY_BYTES, counted after decoding)"
        )
    if not decoder.eof:
        raise Quarantine(f"Content-Encoding {coding}: the compressed body is truncated")
    return bytes(out)


def _decode_one(body: bytes, coding: str, limit: int) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, limit, coding)
    if coding == "deflate":  # RFC 9110 says zlib; some senders send raw deflate
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
        return _inflate(body, wbits, limit, coding)
    if coding == "br" and (brotli := _brotli()) is not None:
        decoder = brotli.Decompressor()
        out = bytearray()
        for start in range(0, len(body), _CHUNK):
            out += decoder.process(body[start : start + _CHUNK])
            if len(out) > limit:
                raise Quarantine(
                    f"Content-Encoding br: the body decodes to more than {limit} bytes"
                )
        return bytes(out)
    raise Quarantine(f"Content-Encoding {coding} is not supported (the body is kept as sent)")


def decode_body(body: bytes, headers_json: str | None, limit: int) -> bytes:
    """``body`` with its Content-Encoding undone (last applied, first undone), at most ``limit``."""
    codings = content_encodings(headers_json)
    if not codings and body.startswith(_GZIP_MAGIC):
        raise Quarantine("the body is gzip-compressed but came without Content-Encoding: gzip")
    for coding in reversed(codings):
        body = _decode_one(body, coding, limit)
    return body
