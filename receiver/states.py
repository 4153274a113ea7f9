"""The states a delivery goes through, as one enum instead of string literals across modules.

Stored as their values (text columns); a `StrEnum` compares equal to its value, so a row read
back compares equal to the member.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryStatus(StrEnum):
    """Where a delivery is in its life: committed, then processed or quarantined (or a copy)."""

    STORED = "stored"
    PROCESSED = "processed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"
