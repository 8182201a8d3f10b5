"""Helpers for the web tests: seed studies/results/users straight into the database, run uvicorn.

The pipeline fills these tables in production; here rows are inserted with SQLAlchemy so the
pages can be tested on their own (audit events go through ``storage.audit.record``).
"""

from __future__ import annotations

import datetime as dt
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from reports.web.users import create_user, issue_token
from storage import audit
from storage.db import session_scope
from storage.models import Delivery, Finding, ModelVersion, Result, ResultObject, Series, Study, Worker
from triage.context import AppContext
from triage.labels import LABELS

PASSWORD = "correct horse battery"


def add_user(ctx: AppContext, username: str, role: str, password: str = PASSWORD, token: bool = False) -> str | None:
    """Create a user; return a fresh API token when ``token``."""
    with session_scope(ctx.sessions) as s:
        create_user(s, username, password, role, actor="test")
        return issue_token(s, username, actor="test") if token else None


def preview_png(seed: int, overlay: bool, size: int = 256) -> bytes:
    """A synthetic head-like slice; the overlay variant adds a red outline and a heat blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.where(r < size * 0.42, 90, 0) + np.where((r >= size * 0.42) & (r < size * 0.46), 250, 0)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(img).convert("RGB")
    if overlay:
        heat = np.exp(-(((yy - size * 0.4) ** 2 + (xx - size * 0.62) ** 2) / (2 * (size * 0.06) ** 2)))
        base = np.asarray(rgb).astype(np.float32)
        base[..., 0] = np.clip(base[..., 0] + 160 * heat, 0, 255)
        base[..., 1] = np.clip(base[..., 1] + 60 * heat, 0, 255)
        rgb = Image.fromarray(base.astype(np.uint8))
        d = ImageDraw.Draw(rgb)
        c = (size * 0.62, size * 0.4)
        d.ellipse([c[0] - 18, c[1] - 14, c[0] + 18, c[1] + 14], outline=(255, 40, 40), width=2)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Seeded:
    study_id: int
    study_uid: str
    accession: str
    result_id: int | None


def seed_study(
    ctx: AppContext,
    *,
    accession: str,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID0042",
    flagged: bool = False,
    status: str = "done",
    status_reason: str = "",
    probabilities: dict[str, float] | None = None,
    received_ago_s: float = 600.0,
    ttr_s: float = 95.0,
    with_previews: bool = True,
    deliveries: tuple[tuple[str, bool], ...] = (("PACS@127.0.0.1:4242", True),),
    input_domain: dict[str, Any] | None = None,
    patient_sex: str = "F",
    patient_birth_date: str = "19580314",
) -> Seeded:
    """One study with a series; for done studies a result, findings, previews, deliveries and audit events."""
    now = dt.datetime.now(dt.UTC)
    received = now - dt.timedelta(seconds=received_ago_s)
    study_uid = f"2.25.{uuid.uuid4().int}"[:64]
    series_uid = f"2.25.{uuid.uuid4().int}"[:64]
    probs = probabilities or {lb: 0.02 for lb in LABELS}
    with session_scope(ctx.sessions) as s:
        study = Study(
            study_uid=study_uid, accession=accession, patient_id=patient_id, patient_name=patient_name,
            patient_sex=patient_sex, patient_birth_date=patient_birth_date,
            study_date=received.strftime("%Y%m%d"), study_time=received.strftime("%H%M%S"),
            study_description="CT HEAD WO CONTRAST", status=status, status_reason=status_reason,
            flagged=flagged, priority=20 if flagged else 0, first_received_at=received, last_received_at=received,
            result_at=received + dt.timedelta(seconds=ttr_s) if status == "done" else None,
        )
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=series_uid, modality="CT", series_number=2,
                        description="AXIAL 5mm", state="done" if status == "done" else status,
                        skip_reason=status_reason, instance_count=32, first_received_at=received,
                        last_received_at=received)
        s.add(series)
        s.flush()
        audit.record(s, audit.RECEIVED, actor="CT_SCANNER", study_uid=study_uid, series_uid=series_uid,
                     accession=accession, details={"count": 32})
        if status == "skipped":
            audit.record(s, audit.SKIPPED, study_uid=study_uid, series_uid=series_uid, accession=accession,
                         details={"reason": status_reason})
        result_id = None
        if status == "done":
            mv = s.query(ModelVersion).filter_by(sha256="ab" * 32).first()
            if mv is None:
                mv = ModelVersion(name="ich-synthetic", version="0.1.0", sha256="ab" * 32,
                                  manifest={"trained_on": "synthetic phantoms"})
                s.add(mv)
                s.flush()
            previews = []
            if with_previews:
                for i, label in enumerate(("subdural", "any")):
                    plain_rel = ctx.store.result_rel(study_uid, series_uid, f"preview-{i}-plain.png")
                    overlay_rel = ctx.store.result_rel(study_uid, series_uid, f"preview-{i}-overlay.png")
                    ctx.store.write_atomic(plain_rel, preview_png(i, overlay=False))
                    ctx.store.write_atomic(overlay_rel, preview_png(i, overlay=True))
                    previews.append({"label": label, "slice": 14 + i, "plain": plain_rel, "overlay": overlay_rel})
            positive = any(p >= 0.5 for p in probs.values())
            result = Result(
                study_id=study.id, series_id=series.id, model_version_id=mv.id, positive=positive,
                total_volume_ml=12.4 if positive else 0.0, abc2_ml=11.8 if positive else 0.0,
                timings={"assemble": 0.41, "predict": 3.2, "seg": 0.3, "sr": 0.1, "total": 4.3},
                summary={"previews": previews, "input_domain": input_domain}, device="cpu", created_at=study.result_at,
            )
            s.add(result)
            s.flush()
            result_id = result.id
            for label in LABELS:
                p = probs.get(label, 0.01)
                s.add(Finding(result_id=result.id, label=label, probability=p, threshold=0.5, present=p >= 0.5,
                              volume_ml=12.4 if p >= 0.5 else 0.0, abc2_ml=11.8 if p >= 0.5 else 0.0,
                              key_slice=14 if p >= 0.5 else None))
            obj = ResultObject(result_id=result.id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                               sop_instance_uid=f"2.25.{uuid.uuid4().int}"[:64], series_uid=series_uid,
                               path="results/x/sr.dcm", size=1234)
            s.add(obj)
            s.flush()
            for dest, ok in deliveries:
                s.add(Delivery(result_id=result.id, result_object_id=obj.id, destination=dest, ok=ok,
                               status="0x0000" if ok else "0xA700", error="" if ok else "out of resources",
                               finished_at=now))
            audit.record(s, audit.INFERRED, actor="worker", study_uid=study_uid, series_uid=series_uid,
                         accession=accession, details={"positive": positive})
    return Seeded(study_id=study.id, study_uid=study_uid, accession=accession, result_id=result_id)


def heartbeat(ctx: AppContext, worker_id: str = "test:1:worker", role: str = "worker", age_s: float = 0.0) -> None:
    with session_scope(ctx.sessions) as s:
        s.merge(Worker(id=worker_id, role=role, host="test", pid=1,
                       heartbeat_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)))


def free_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_server(ctx: AppContext, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``create_app(ctx)`` with uvicorn in a thread on a free port; yield its base URL."""
    import httpx
    import uvicorn

    from reports.web.app import create_app

    sock = free_port()
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(ctx), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("web server did not start")
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
