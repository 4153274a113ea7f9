"""The OpenAPI description served on ``GET /openapi.json``.

Written by hand: the interface is five routes and the document must say
exactly what `endpoints` answers (a schemathesis run checks it does).
"""

from __future__ import annotations

from typing import Any

from receiver.hooknames import HOOK_NAME_PATTERN, MAX_HOOK_NAME

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_document(max_body_bytes: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a receiver accepting bodies up to ``max_body_bytes``."""
    status_doc = {"description": "Process is up.", "content": {"application/json": {}}}
    receive = {
        "summary": "Receive one WebRun delivery",
        "description": (
            "Answered 200 only after the exact body, content type, headers (without"
            " Authorization), query string and time are committed (or spooled). Any body"
            " and content type is accepted; the payload is parsed afterwards and a body"
            " that cannot be understood is kept and quarantined, never refused. The query"
            " string is kept as labels."
        ),
        "operationId": "receiveDelivery",
        "parameters": [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "Hook name; created on first use with a global token"
                " (up to RECEIVER_MAX_HOOKS, unless RECEIVER_CREATE_HOOKS is false).",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_HOOK_NAME,
                    "pattern": f"^{HOOK_NAME_PATTERN}$",
                },
            }
        ],
        "requestBody": {
            "required": False,
            "description": f"The delivery, at most {max_body_bytes} bytes.",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        "security": [{"authorization": []}],
        "responses": {
            "200": {
                "description": "Committed.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Recorded"}}
                },
            },
            "400": _error("The client disconnected before the body was read."),
            "401": _error("Missing, wrong or repeated Authorization header; nothing stored."),
            "404": _error(
                "Not a hook name (the pattern), or an unknown hook that may not be created"
                " (RECEIVER_MAX_HOOKS reached, or RECEIVER_CREATE_HOOKS false)."
            ),
            "413": _error(f"Body larger than {max_body_bytes} bytes; nothing stored."),
            "503": _error(
                "Neither the database nor the spool could take the delivery, or (with"
                " Retry-After) no room in the memory budget or for one more connection."
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WebRun Receiver",
            "version": "1",
            "description": "Receives WebRun webhook deliveries and keeps every one.",
        },
        "paths": {
            "/hooks/{name}": {"post": receive},
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "operationId": "healthz",
                    "responses": {"200": status_doc},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the database answers",
                    "operationId": "readyz",
                    "responses": {
                        "200": {
                            "description": "Database reachable.",
                            "content": {"application/json": {}},
                        },
                        "503": _error("Database unavailable."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "authorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "The full header value, e.g. `Bearer abc`.",
                }
            },
            "schemas": {
                "Error": _ERROR,
                "Recorded": {
                    "type": "object",
                    "required": ["delivery_id", "status"],
                    "properties": {
                        "delivery_id": {"type": "string"},
                        "status": {"type": "string", "enum": ["stored", "duplicate", "spooled"]},
                    },
                },
            },
        },
    }
