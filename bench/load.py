"""The load client: wrk (Debian package ``wrk``) with a Lua script for unique POST bodies.

Every request carries a distinct ~2 KB ``ai_response`` JSON body (a counter
is spliced in), so the receiver's dedupe never short-cuts a write. wrk's
``done`` hook prints the summary as one JSON line, read back here. A paced
load adds a ``delay()`` hook that keeps one schedule per wrk thread: a fixed
per-connection delay falls short of its rate by each request's latency.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "wrk is needed for the ingest, reconcile and sustained figures:"
    " sudo apt-get install -y wrk (Debian/Ubuntu)"
)

_DESCRIPTION = (
    "A compact stainless steel kettle with a 1.7 litre capacity, rapid boil element, "
    "illuminated water window, removable limescale filter and 360 degree swivel base. "
)


def ai_response_body(nonce: str, n: int) -> bytes:
    """One ~2 KB structured_json ai_response body, as WebRun sends it (the bare object)."""
    doc = {
        "title": f"Kettle {nonce}-{n}",
        "sku": f"KT-{n:08d}",
        "price": 29.99 + n % 100,
        "currency": "EUR",
        "inStock": n % 3 != 0,
        "rating": 4.4,
        "reviews": 1287 + n % 50,
        "url": f"https://shop.example.com/p/kettle-{n}",
        "seller": {"name": "Example Home GmbH", "country": "DE", "verified": True},
        "description": _DESCRIPTION * 10,
        "features": ["1.7 l", "3000 W", "auto shut-off"],
    }
    return json.dumps(doc, indent=1).encode()


_LUA = r"""
local template = [==[%(template)s]==]
counter = 0  -- a global, so that done() can read each thread's count (thread:get)
local prefix = "%(prefix)s"
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(token)s"

function setup(thread)
  thread:set("prefix", prefix .. "-" .. tostring(math.random(1, 1000000000)))
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  local body = string.gsub(template, "@@N@@", prefix .. "-" .. counter, 1)
  return wrk.format(nil, "%(path)s", nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local sent = 0
  for _, t in ipairs(threads) do sent = sent + t:get("counter") end
  io.write(string.format(
    '\nBENCH_JSON {"sent": %%d, "requests": %%d, "duration_us": %%d, "connect_errors": %%d, ' ..
    '"read_errors": %%d, "write_errors": %%d, "status_errors": %%d, "timeouts": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%f}\n',
    sent, summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""

_PACE = r"""
-- One schedule per wrk thread: request k is due at start + k * interval (ms), and goes
-- out on whichever of the thread's connections is free. A request overdue (every
-- connection was waiting for an answer) goes out at once, catching up, unless it is
-- more than a second late: then it is dropped from the schedule (not offered).
-- The monotonic clock comes from libc through LuaJIT's FFI (wrk's Lua has none).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval_ms = %(interval_ms)r
local next_ms = nil
function delay()
  local now = now_ms()
  if next_ms == nil or next_ms < now - 1000 then next_ms = now end
  local wait = next_ms - now
  next_ms = next_ms + interval_ms
  if wait < 0 then return 0 end
  return math.floor(wait)
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What wrk measured: completed requests, errors and latency (ms)."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: Requests wrk built (sent, or in flight when it stopped).
    sent: int = 0

    @property
    def ok(self) -> int:
        return self.requests - self.errors

    @property
    def rate(self) -> float:
        """Successful deliveries per second."""
        return self.ok / self.seconds

    @property
    def offered(self) -> float:
        """Requests sent per second."""
        return self.sent / self.seconds


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(INSTALL_HINT)
    return path


def run_wrk(
    url: str,
    token: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 1,
    rate: float | None = None,
) -> LoadResult:
    """POST unique ai_response bodies to ``url`` for ``seconds`` over ``connections``:
    flat out, or paced at ``rate`` requests a second (as far as the connections allow)."""
    wrk = require_wrk()
    template = ai_response_body("@@N@@", 0).decode().replace("Kettle @@N@@-0", "Kettle @@N@@")
    if "]==]" in template or '"' in token:
        raise ValueError("body template or token would break the Lua script")
    script = _LUA % {
        "template": template,
        "prefix": secrets.token_hex(4),
        "token": token,
        "path": "/" + url.split("/", 3)[3],
    }
    if rate is not None:
        script += _PACE % {"interval_ms": 1000.0 * threads / rate}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        lua = Path(f.name)
    try:
        completed = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--timeout",
                "30s",
                "-s",
                str(lua),
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        lua.unlink()
    line = next(x for x in completed.stdout.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(
        raw[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return LoadResult(
        requests=raw["requests"],
        errors=errors,
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1e3,
        p90_ms=raw["p90_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        max_ms=raw["max_us"] / 1e3,
        sent=raw["sent"],
    )
