"""Who may open the console: the console token, by a signed session cookie or a Bearer header.

The cookie is Starlette's signed session (itsdangerous), ``HttpOnly`` and
``SameSite=Strict``, keyed by a secret derived from the console token, so
changing the token signs everyone out and several workers agree without a
shared secret store. Webhook tokens never open the console: only the console
token does, and it may not be one of them. A cookie-borne POST must carry the
session's CSRF token; a Bearer POST needs none (a browser never adds one on
its own).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request

SESSION_COOKIE = "receiver_console"
#: Signed-in sessions last this long (seconds).
SESSION_SECONDS = 12 * 3600


def session_secret(console_token: str) -> str:
    """The session-signing key: the token's HMAC, so the token itself never signs anything."""
    return hmac.new(console_token.encode(), b"receiver-console-session", hashlib.sha256).hexdigest()


def _fingerprint(console_token: str) -> str:
    return hashlib.sha256(b"receiver-console-user:" + console_token.encode()).hexdigest()[:32]


def token_matches(given: str, console_token: str) -> bool:
    return hmac.compare_digest(given.encode(), console_token.encode())


def bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def signed_in(request: Request, console_token: str) -> bool:
    """Whether ``request`` carries the console token, as a Bearer header or a session."""
    given = bearer(request)
    if given is not None:
        return token_matches(given, console_token)
    return request.session.get("user") == _fingerprint(console_token)


def sign_in(request: Request, console_token: str) -> None:
    request.session.clear()
    request.session["user"] = _fingerprint(console_token)
    request.session["csrf"] = secrets.token_urlsafe(24)


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use, also before sign-in, for the form)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


def csrf_ok(request: Request, submitted: object) -> bool:
    """A POST is the user's own: Bearer-authenticated, or its form has the session's token."""
    if bearer(request) is not None:
        return True
    expected = request.session.get("csrf")
    return (
        isinstance(expected, str)
        and isinstance(submitted, str)
        and hmac.compare_digest(submitted.encode(), expected.encode())
    )
