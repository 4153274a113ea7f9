"""A database an operator would open the console on: the 15 samples, a quarantined delivery,
a non-UTF-8 one and a few hundred generated tasks (some failed, some of unknown cost)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver.cli import SAMPLES, sample_deliveries
from receiver.models import Delivery
from receiver.states import DeliveryStatus
from tests.conftest import TOKEN

CONSOLE_TOKEN = "console-secret-1234"
#: Outputs this schema rejects; `ACCEPTING_SCHEMA` takes them.
STRICT_SCHEMA = {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}}
ACCEPTING_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "price": {"type": "number"}},
}


def generated_task(n: int) -> bytes:
    """Task ``n``: every 7th failed, every 5th of unknown cost, the rest completed with a price."""
    if n % 7 == 0:
        return json.dumps(
            {
                "success": False,
                "status": "failed",
                "sessionId": f"gen-s{n // 10}",
                "taskId": f"gen-t{n:04d}",
                "error": "Page took too long to load",
                "code": "NAVIGATION_TIMEOUT" if n % 2 else "CAPTCHA",
                "usage": {"inputTokens": 100, "outputTokens": 5, "computeTime": 3, "cost": 0.001},
            }
        ).encode()
    usage: dict[str, object] = {"inputTokens": 1000 + n, "outputTokens": 200, "computeTime": 4.5}
    if n % 5:
        usage["cost"] = round(0.002 + n / 100000, 6)
    return json.dumps(
        {
            "type": "task_completed",
            "sessionId": f"gen-s{n // 10}",
            "taskId": f"gen-t{n:04d}",
            "data": {"message": json.dumps({"sku": f"SKU-{n}", "price": n + 0.5, "stock": n % 3})},
            "usage": usage,
            "completedAt": "2026-12-01T10:30:00.000Z",
        }
    ).encode()


@dataclass
class Seeded:
    quarantined_id: str
    binary_id: str
    csv_id: str
    deliveries: int


#: POST one delivery: (hook, body, content type, query string) -> its delivery id.
Post = Callable[[str, bytes, str, str], str]


def client_post(client: TestClient) -> Post:
    def post(hook: str, body: bytes, content_type: str, query: str) -> str:
        url = f"/hooks/{hook}" + (f"?{query}" if query else "")
        headers = {"authorization": TOKEN, "content-type": content_type}
        response = client.post(url, content=body, headers=headers)
        assert response.status_code == 200, response.text
        delivery_id: str = response.json()["delivery_id"]
        return delivery_id

    return post


def http_post(http: httpx.Client) -> Post:
    """The same over real HTTP, to a live receiver."""

    def post(hook: str, body: bytes, content_type: str, query: str) -> str:
        url = f"/hooks/{hook}" + (f"?{query}" if query else "")
        headers = {"authorization": TOKEN, "content-type": content_type}
        response = http.post(url, content=body, headers=headers)
        assert response.status_code == 200, response.text
        delivery_id: str = response.json()["delivery_id"]
        return delivery_id

    return post


def seed(post: Post, *, tasks: int = 300) -> Seeded:
    """Fill a database through the receiver's own HTTP edge; the schema of hook ``strict``
    (which rejects sample 01's output) must be registered already."""
    csv_id = ""
    for sample in sample_deliveries():
        body = (SAMPLES / f"{sample['name']}.body").read_bytes()
        hook = "crypto" if "csv" in sample["name"] else "pricing"
        delivery_id = post(hook, body, sample["content_type"], "team=ops")
        if sample["name"] == "05-full-response-csv":
            csv_id = delivery_id
    sample_01 = (SAMPLES / "01-full-response-json.body").read_bytes()
    quarantined_id = post("strict", sample_01, "application/json", "")
    binary_id = post("pricing", b"\xff\xfe\x00binary\x81", "application/octet-stream", "")
    for n in range(1, tasks + 1):
        post("generated", generated_task(n), "application/json", f"team=t{n % 3}")
    return Seeded(quarantined_id, binary_id, csv_id, len(sample_deliveries()) + 2 + tasks)


def wait_processed(engine: Engine, timeout: float = 120.0) -> None:
    """Until no delivery is left only stored (the pipeline works in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = conn.scalar(
                select(func.count()).where(Delivery.status == DeliveryStatus.STORED.value)
            )
        if not left:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{left} deliveries still unprocessed")
