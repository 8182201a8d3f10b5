"""One answer per study, whatever order its series come in (a thick and a thin head CT).

A study often carries two reconstructions of the same scan: a thick series (5 mm, ~30 slices) and
a thin one (0.625 mm, 240+ slices). Each analysed series gets its own result, but the study has
one answer: positive as soon as any analysed series is positive, never lowered afterwards
(:func:`storage.lifecycle.record_result` keeps ``Study.flagged``). What goes to the PACS follows
that answer, so it never receives a negative next to a positive for one study from this node:

* a **positive** result is delivered at once (that is the flag), and any negative result of
  another series still held back is withdrawn;
* a **negative** result is withheld when the study is already positive;
* a negative result is **held** (its ``deliver`` jobs queued to run ``HOLD_SECONDS`` later) while
  another series of the study may still bring a result (receiving, complete, selected or
  processing); when the last of them ends negative (or is skipped, or its inference dies) the
  held deliveries are released at once; ``HOLD_SECONDS`` is only the backstop;
* a series that arrives after its study's result went out (a reopened or a late series) is
  analysed like any other; its result updates the study (a positive flags it; its objects carry
  new UIDs, :mod:`reports.dicom.uids`). A negative that reached the PACS before a later series
  turned out positive cannot be recalled: the positive follows it.

:func:`settle` applies the last three rules from the database's current state; the inference job,
the series monitor (a series skipped) and the worker (an inference that died) call it, each after
its own commit, so whichever runs last sees every result before it.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy.orm import Session

from storage import audit, lifecycle
from storage.lifecycle import JobKind
from storage.models import Study
from storage.queue import JobQueue

HOLD_SECONDS = 600.0  # the longest a negative result waits for the study's other series


class Delivery(StrEnum):
    NOW = "now"
    HOLD = "hold"
    WITHHOLD = "withhold"


def plan(*, positive: bool, study_flagged_before: bool, others_pending: bool) -> Delivery:
    """How a new result of one series goes to the PACS (module docstring)."""
    if positive:
        return Delivery.NOW
    if study_flagged_before:
        return Delivery.WITHHOLD
    return Delivery.HOLD if others_pending else Delivery.NOW


def settle(s: Session, queue: JobQueue, study_id: int, *, actor: str = "system") -> tuple[int, int]:
    """Release or withdraw the study's held deliveries as its answer now stands; returns
    (released, withdrawn). Runs in the caller's transaction."""
    study = s.get(Study, study_id)
    if study is None:
        return 0, 0
    released = withdrawn = 0
    if study.flagged:
        withdrawn = queue.withdraw_held(study_id, JobKind.DELIVER, session=s)
    elif not lifecycle.study_pending(s, study_id):
        released = queue.release_held(study_id, JobKind.DELIVER, session=s)
    if released or withdrawn:
        audit.record(s, audit.QUEUED, actor=actor, study_uid=study.study_uid, accession=study.accession,
                     details={"study_answer": "positive" if study.flagged else "negative",
                              "held_deliveries_released": released, "held_deliveries_withdrawn": withdrawn})
    return released, withdrawn
