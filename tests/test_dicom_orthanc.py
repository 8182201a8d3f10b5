"""Orthanc as the stand-in PACS: it pushes a study to the node, the node sends a result back."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from storage import audit
from storage.models import AuditEvent, Delivery, Instance, Job, Series
from tests.peers import SeriesSpec, make_ct_series, make_result_object, node_context, orthanc, running_node, wait_for
from triage.dicom.completion import SeriesMonitor
from triage.dicom.delivery import handle_deliver

pytestmark = pytest.mark.network


def test_orthanc_pushes_study_and_receives_result(tmp_path: Path) -> None:
    ctx = node_context(tmp_path / "node", allowed_aets="ORTHANC@127.0.0.1", stable_seconds=30)
    # JPEG 2000 in the PACS: Orthanc forwards it as stored, the node accepts it as is.
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=20), transfer_syntax="1.2.840.10008.1.2.4.90")
    with running_node(ctx) as node, orthanc(tmp_path / "orthanc",
                                            modalities={"TRIAGE": ("ICHTRIAGE", "127.0.0.1", node.port)}) as pacs:
        uploaded = pacs.upload(paths)
        series_ids = {u["ParentSeries"] for u in uploaded}
        assert len(series_ids) == 1
        pacs.store_to("TRIAGE", sorted(series_ids))

        def received() -> bool:
            with ctx.sessions() as s:
                return s.scalar(select(func.count()).select_from(Instance)) == 20

        wait_for(received, timeout=60, message="20 instances at the node")
        monitor = SeriesMonitor(ctx)
        done = monitor.tick()  # ImagesInAcquisition matches and the stack is gap-free: complete early
        assert len(done) == 1 and done[0].selected and done[0].early
        with ctx.sessions() as s:
            series = s.scalars(select(Series)).one()
            job = s.scalars(select(Job)).one()
            calling = set(s.scalars(select(Instance.calling_aet)))
            syntaxes = set(s.scalars(select(Instance.transfer_syntax)))
        assert series.state == "selected" and job.kind == "infer"
        assert calling == {"ORTHANC"} and syntaxes == {"1.2.840.10008.1.2.4.90"}

        # The node sends a (stand-in) result object back to the PACS through the deliver job.
        obj_id = make_result_object(ctx, tmp_path)
        ctx.queue.enqueue("deliver", {"result_object_id": obj_id,
                                      "destination": f"ORTHANC@127.0.0.1:{pacs.dicom_port}"})
        claimed = ctx.queue.claim("w", kinds=["deliver"])
        assert claimed is not None
        handle_deliver(ctx, claimed)
        ctx.queue.complete(claimed.id, "w")
        with ctx.sessions() as s:
            delivery = s.scalars(select(Delivery)).one()
            sent_uid = s.scalar(select(AuditEvent.details).where(AuditEvent.event_type == audit.DELIVERED))
        assert delivery.ok and delivery.status == "0x0000"
        expected = str(dcmread(ctx.store.path(_object_path(ctx, obj_id)), stop_before_pixels=True).SOPInstanceUID)
        assert sent_uid["sop_instance_uid"] == expected
        assert expected in pacs.instance_uids()


def _object_path(ctx, obj_id: int) -> str:  # noqa: ANN001
    from storage.models import ResultObject

    with ctx.sessions() as s:
        return s.get(ResultObject, obj_id).path
