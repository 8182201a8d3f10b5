"""Deterministic UIDs for result objects.

A UID is ``2.25.<decimal of the first 128 bits of sha256(source series UID, bundle sha256,
role)>`` (PS3.5 B.2: UUID-derived UIDs under the 2.25 root), at most 2 + 1 + 39 = 44
characters. The same series, bundle and role always give the same UID, so a retried job
re-sends the same instances (the PACS overwrites, never duplicates), and a new bundle or a
new series gives new ones.

Roles used: ``seg/series``, ``seg/instance``, ``sr/series``, ``sr/instance``, ``sc/series``,
``sc/instance/<n>``, ``device`` (observer device UID of the bundle).
"""

from __future__ import annotations

import hashlib

ROOT = "2.25"


def derive_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (joined unambiguously)."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"{ROOT}.{int.from_bytes(h[:16], 'big')}"


def object_uid(source_series_uid: str, bundle_sha256: str, role: str) -> str:
    """The UID of one result object attribute (series or instance), see module doc for roles."""
    if not source_series_uid or not bundle_sha256 or not role:
        raise ValueError("source series UID, bundle sha256 and role are all required for a result UID")
    return derive_uid("ich-triage-result/1", source_series_uid, bundle_sha256, role)


def device_uid(bundle_sha256: str) -> str:
    """The Device Observer UID of a model bundle (same bundle, same UID everywhere)."""
    return derive_uid("ich-triage-device/1", bundle_sha256)
