"""Correlation: a delivery labelled ``run=<id>`` speaks of that run's task.

WebRun assigns the ``taskId`` after the webhook URL was written, so the URL
can only carry an id of the receiver's own (`receiver.runs`); here that id
becomes the task's ``session_id``/``task_id`` labels, whatever the body's
shape, so an ``ai_response`` joins its cost. A label naming no known run (or
one whose ids are not known yet) changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, select

from receiver.models import Run, RunState

RUN_LABEL = "run"
#: Label saying how a task's record reached the warehouse: ``webhook`` or ``reconciled``.
VIA_LABEL = "via"


def correlate(conn: Connection, labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` with the ids of the run they name (and ``via``), or unchanged."""
    run_id = labels.get(RUN_LABEL)
    out = dict(labels)
    if not run_id:
        return out
    found = conn.execute(
        select(Run.session_id, Run.task_id, Run.state).where(Run.id == run_id)
    ).first()
    if found is None or found.task_id is None:
        return out
    out["task_id"] = found.task_id
    if found.session_id is not None:
        out["session_id"] = found.session_id
    # Once reconciled, a late webhook does not make the task look delivered.
    out.setdefault(
        VIA_LABEL, str(RunState.RECONCILED) if found.state == RunState.RECONCILED else "webhook"
    )
    return out
