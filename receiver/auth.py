"""Who may deliver: global tokens and per-hook tokens, compared as bytes in constant time.

Only SHA-256 hashes of generated tokens are stored. Tokens from the
environment are compared directly. No token configured means nobody gets in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
from starlette.concurrency import run_in_threadpool

from receiver.db import utcnow
from receiver.models import Hook, Token

MAX_CACHED_HOOKS = 4096


def token_sha256(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def new_token() -> str:
    """A fresh ``Bearer`` value with 256 bits of randomness."""
    return f"Bearer {secrets.token_urlsafe(32)}"


def matches_any(value: bytes, candidates: Sequence[bytes]) -> bool:
    """Compare against every candidate without stopping early, each in constant time."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(value, candidate)
    return found


@dataclass(frozen=True)
class Verdict:
    """``ok``: let it in. ``create_hook``: let in by a global token, so the hook may be new."""

    ok: bool
    create_hook: bool = False


@dataclass
class _HookEntry:
    expires: float
    exists: bool
    hashes: tuple[bytes, ...]


class Authenticator:
    """Checks an Authorization value for a hook, caching stored hashes briefly."""

    def __init__(self, engine: Engine, env_tokens: Sequence[bytes], cache_seconds: float) -> None:
        self.engine = engine
        self.env_tokens = tuple(env_tokens)
        self.cache_seconds = cache_seconds
        self._hooks: dict[str, _HookEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure_fresh(self, hook: str, timeout: float) -> None:
        """Refresh ``hook``'s hashes when stale; concurrent requests share one lookup."""
        if self.is_cached(hook):
            return
        lock = self._locks.setdefault(hook, asyncio.Lock())
        async with lock:
            if not self.is_cached(hook):
                await asyncio.wait_for(run_in_threadpool(self.refresh, hook), timeout)

    def is_cached(self, hook: str) -> bool:
        entry = self._hooks.get(hook)
        return entry is not None and entry.expires > time.monotonic()

    def refresh(self, hook: str) -> None:
        """Load the hashes valid for ``hook`` (its own and the global ones). Blocking I/O."""
        with self.engine.connect() as conn:
            exists = conn.scalar(select(Hook.name).where(Hook.name == hook)) is not None
            rows = conn.execute(
                select(Token.hook, Token.token_sha256).where(
                    Token.revoked_at.is_(None), (Token.hook == hook) | Token.hook.is_(None)
                )
            ).all()
        hashes = tuple(f"{'g' if h is None else 'h'}{digest}".encode() for h, digest in rows)
        now = time.monotonic()
        if len(self._hooks) >= MAX_CACHED_HOOKS:  # names come from unauthenticated URLs
            self._hooks = {k: v for k, v in self._hooks.items() if v.expires > now}
            self._locks = {k: v for k, v in self._locks.items() if k in self._hooks}
            if len(self._hooks) >= MAX_CACHED_HOOKS:
                self._hooks.clear()
        self._hooks[hook] = _HookEntry(now + self.cache_seconds, exists, hashes)

    def check(self, hook: str, header: bytes | None) -> Verdict:
        """Decide from the cache; call `refresh` first when `is_cached` is false."""
        if not header:
            return Verdict(False)
        entry = self._hooks.get(hook)
        hashes = entry.hashes if entry else ()
        digest = token_sha256(header)
        global_ok = matches_any(header, self.env_tokens) | matches_any(
            f"g{digest}".encode(), [h for h in hashes if h.startswith(b"g")]
        )
        hook_ok = matches_any(f"h{digest}".encode(), [h for h in hashes if h.startswith(b"h")])
        if not (global_ok or hook_ok):
            return Verdict(False)
        exists = entry is not None and entry.exists
        return Verdict(True, create_hook=global_ok and not exists)


def has_any_token(engine: Engine, env_tokens: Sequence[bytes]) -> bool:
    if env_tokens:
        return True
    with engine.connect() as conn:
        return conn.scalar(select(Token.id).where(Token.revoked_at.is_(None)).limit(1)) is not None


def ensure_token(engine: Engine, env_tokens: Sequence[bytes]) -> str | None:
    """Fail closed but never locked out: with no token anywhere, make a global one.

    Returns the new token (to be shown once), or None when one already exists.
    """
    if has_any_token(engine, env_tokens):
        return None
    return add_token(engine, None)


def add_token(engine: Engine, hook: str | None, now: dt.datetime | None = None) -> str:
    """Create a token (for ``hook``, or global when None), store its hash, return it once."""
    token = new_token()
    with engine.begin() as conn:
        conn.execute(
            insert(Token).values(
                hook=hook, token_sha256=token_sha256(token.encode()), created_at=now or utcnow()
            )
        )
    return token


def revoke_tokens(engine: Engine, hook: str | None) -> int:
    """Revoke every live token of ``hook`` (global ones when None); returns how many."""
    condition = Token.hook.is_(None) if hook is None else Token.hook == hook
    with engine.begin() as conn:
        result = conn.execute(
            update(Token).where(condition, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
    return result.rowcount
