"""Deterministic UIDs for result objects.

A UID is ``2.25.<decimal of the first 128 bits of sha256(source, bundle sha256, role)>``
(PS3.5 B.2: UUID-derived UIDs under the 2.25 root), at most 2 + 1 + 39 = 44 characters.

* Instance UIDs (``seg/instance``, ``sr/instance``, ``sc/instance/<n>``) take as source the
  :func:`source_key` of the input: the source series UID *and* the set of its SOP Instance UIDs.
  The same input and bundle always give the same UID, so a retried job re-sends the same
  instances (the PACS overwrites, never duplicates); a series reopened by a late instance is new
  input and gets new instance UIDs, so a PACS that keeps the first copy of a UID (Orthanc's and
  dcm4chee's default) still ends with the new finding. A new bundle gives new UIDs as well.
* Series UIDs (``seg/series``, ``sr/series``, ``sc/series``) and tracking UIDs (``track/<label>``)
  take the source series UID only: the results of every generation of one series land in one
  result series per kind, and a finding keeps its tracking identity across reports.
* ``device``: the observer device UID of the bundle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

ROOT = "2.25"


def derive_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (joined unambiguously)."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"{ROOT}.{int.from_bytes(h[:16], 'big')}"


def source_key(sources: Sequence[Any]) -> str:
    """The identity of a result's input: source series UID and a digest of its SOP Instance UIDs
    (order-free)."""
    if not sources:
        raise ValueError("a result needs at least one source instance")
    uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
    digest = hashlib.sha256("\x1f".join(uids).encode("ascii")).hexdigest()[:32]
    return f"{sources[0].SeriesInstanceUID}/{digest}"


def object_uid(source_series_uid: str, bundle_sha256: str, role: str) -> str:
    """The UID of one result object attribute (series or instance), see module doc for roles."""
    if not source_series_uid or not bundle_sha256 or not role:
        raise ValueError("source series UID, bundle sha256 and role are all required for a result UID")
    return derive_uid("ich-triage-result/1", source_series_uid, bundle_sha256, role)


def device_uid(bundle_sha256: str) -> str:
    """The Device Observer UID of a model bundle (same bundle, same UID everywhere)."""
    return derive_uid("ich-triage-device/1", bundle_sha256)
