"""What a real task's usage can be: token counts, times and cost past these are quarantined.

WebRun reports one task's usage; nothing a real task does comes near these
bounds (the largest models take a few million tokens of context; a task runs
minutes to hours and costs dollars), yet they keep every sum exact:

- tokens are whole numbers in ``0..MAX_TOKENS`` (10^9). A rollup group is one
  (UTC day, hook, status), so a 64-bit sum would need more than 9.2 * 10^9
  tasks of 10^9 tokens each in one day on one hook: 106,000 a second for a
  whole day, far past what one receiver can take (bench/README). So the
  rollups' 64-bit sums stay exact integers on SQLite (whose integer sums turn
  into floats past 2^63) for any accepted input; on PostgreSQL they are
  NUMERIC (migration 0008) and cannot overflow at all.
- times (``computeTime``, ``completion_time``) in ``0..MAX_SECONDS`` (10^7 s,
  116 days) and cost in ``0..MAX_COST_USD`` (10^6 USD): float64 sums of those
  stay finite for any number of tasks (float64 reaches 1.8 * 10^308).

A value past a bound is never clamped or coerced: the delivery is quarantined
with a reason naming the field, the value and the bound, and is kept.
"""

from __future__ import annotations

from receiver.errors import Quarantine

MAX_TOKENS = 10**9
MAX_SECONDS = 10**7
MAX_COST_USD = 10**6

#: Usage field -> (what it is, its largest accepted value).
BOUNDS: dict[str, tuple[str, int]] = {
    "input_tokens": ("input token count", MAX_TOKENS),
    "output_tokens": ("output token count", MAX_TOKENS),
    "total_tokens": ("total token count", MAX_TOKENS),
    "compute_time_s": ("compute time in seconds", MAX_SECONDS),
    "completion_time_s": ("completion time in seconds", MAX_SECONDS),
    "cost_usd": ("cost in USD", MAX_COST_USD),
}


def check_usage(values: dict[str, int | float | None]) -> None:
    """Quarantine usage no real task reaches (negative, or past its bound in `BOUNDS`)."""
    for name, value in values.items():
        if value is None or name not in BOUNDS:
            continue
        what, bound = BOUNDS[name]
        if not 0 <= value <= bound:
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)[:30]
            raise Quarantine(
                f"{what} {shown} is outside 0..{bound:.0e}: no real task reports that"
                " (limits: receiver.bounds, README 'What we guarantee')"
            )
