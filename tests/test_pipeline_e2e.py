"""End to end with Orthanc as the PACS: push → node (a real ``triage serve`` process) → results back.

A positive synthetic study pushed from Orthanc yields SEG, SR and SC in Orthanc under the same
study, and a webhook receiver and an HL7 MLLP listener get the flag; a negative study yields an SR
saying negative and no alarm. The SEG's mask equals the model's mask (re-run here on the stored
instances) and the SR's volumes equal the findings in the node's database.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from reports.dicom.seg import segment_label
from storage.models import Finding, Instance, Result, Series, Study
from tests.node_process import NodeProcess
from tests.peers import Orthanc, serving, wait_for
from tests.test_notify_hl7 import MLLPServer
from tests.test_notify_webhook import SECRET, Receiver
from triage import notify
from triage.labels import LABELS, SUBTYPES

pytestmark = [pytest.mark.network, pytest.mark.slow]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from triage.phantom.dicom_writer import Identity, write_study
    from triage.phantom.generator import PhantomOptions, generate_study

    work = tmp_path_factory.mktemp("e2e")
    with serving(Receiver()) as hook, serving(MLLPServer()) as mllp:
        pacs = Orthanc(work / "orthanc")
        node: NodeProcess | None = None
        try:
            pacs.start()
            node = NodeProcess(work / "node", "serve", env={
                "TRIAGE_AE_TITLE": "ICHTRIAGE",
                "TRIAGE_ALLOWED_AETS": "ORTHANC",
                "TRIAGE_DESTINATIONS": f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                "TRIAGE_WEBHOOK_URL": f"http://127.0.0.1:{hook.server_address[1]}/hook",
                "TRIAGE_WEBHOOK_SECRET": SECRET,
                "TRIAGE_HL7_DESTINATION": f"127.0.0.1:{mllp.server_address[1]}",
            })
            node.start(timeout=180)
            pacs.put_modality("TRIAGE", "ICHTRIAGE", "127.0.0.1", node.dicom_port)
            studies = {}
            for name, seed, opts in (
                ("positive", 4101, PhantomOptions(subtypes=("intraparenchymal",), size_class="medium")),
                ("negative", 4102, PhantomOptions(kind="negative")),
            ):
                study = generate_study(seed, opts)
                ident = Identity(index=7000 + seed % 100, seed=seed)
                files = write_study(study, ident, work / name)["head"]
                uploaded = pacs.upload(files)
                studies[name] = {"truth": study, "uid": ident.study_uid,
                                 "series_orthanc": uploaded[0]["ParentSeries"],
                                 "study_orthanc": uploaded[0]["ParentStudy"], "n": len(files)}
            for info in studies.values():
                pacs.store_to("TRIAGE", [info["series_orthanc"]])
            yield {"pacs": pacs, "node": node, "hook": hook, "mllp": mllp, "studies": studies}
        finally:
            if node is not None:
                node.stop()
            pacs.stop()


def _objects(pacs: Orthanc, study_orthanc: str) -> dict[str, list[str]]:
    """SOP class → Orthanc instance ids, for the study's instances in the PACS."""
    out: dict[str, list[str]] = {}
    for inst in pacs.get(f"/studies/{study_orthanc}/instances"):
        tags = pacs.get(f"/instances/{inst['ID']}/simplified-tags")
        out.setdefault(tags.get("SOPClassUID", ""), []).append(inst["ID"])
    return out


def _wait_results(stack: dict[str, Any], name: str, want_seg: bool | None) -> dict[str, list[str]]:
    """The study's result objects once SR and SC are in the PACS, and SEG when ``want_seg`` says so
    (``False``: none may come; ``None``: whatever the model's call, not waited for)."""
    pacs, node = stack["pacs"], stack["node"]
    info = stack["studies"][name]

    def arrived() -> dict[str, list[str]] | None:
        if not node.alive():
            raise RuntimeError(f"node died:\n{node.tail()}")
        objs = _objects(pacs, info["study_orthanc"])
        have_sc = any(c in objs for c in SC_CLASSES)
        if SR_CLASS in objs and have_sc and (want_seg is None or (SEG_CLASS in objs) == want_seg):
            return objs
        return None

    try:
        return wait_for(arrived, timeout=420, interval=1.0, message=f"{name} results in the PACS")
    except TimeoutError:
        raise AssertionError(f"results of the {name} study did not arrive:\n{node.tail(80)}") from None


def _db(stack: dict[str, Any]) -> Session:
    engine = create_engine(f"sqlite:///{stack['node'].workdir / 'data' / 'triage.sqlite3'}")
    return Session(engine)


def _download(pacs: Orthanc, orthanc_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(pacs.request("GET", f"/instances/{orthanc_id}/file", timeout=60)))


def _sr_groups(sr: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    """label → {"present": bool, "volume_ml": float, "probability": float} from the TID 1500 groups."""
    by_code = {v: k for k, v in _finding_codes().items()}
    groups: dict[str, dict[str, Any]] = {}

    def walk(items: Any, group: dict[str, Any] | None) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning.lower() if "ConceptNameCodeSequence" in item else ""
            vt = item.ValueType
            if vt == "CONTAINER" and name == "measurement group":
                g: dict[str, Any] = {}
                walk(item.get("ContentSequence", []), g)
                if "label" in g:
                    groups[g["label"]] = g
                continue
            if group is not None:
                if vt == "CODE" and name == "finding":
                    code = item.ConceptCodeSequence[0].CodeValue
                    if code in by_code:
                        group["label"] = by_code[code]
                elif vt == "NUM":
                    mv = item.MeasuredValueSequence[0]
                    unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
                    if unit == "ml" and "abc" not in name:
                        group.setdefault("volume_ml", float(mv.NumericValue))
                    elif "probab" in name:
                        group["probability"] = float(mv.NumericValue)
                elif vt == "CODE" and item.ConceptCodeSequence[0].CodeMeaning.lower() in ("present", "absent"):
                    group.setdefault("present", item.ConceptCodeSequence[0].CodeMeaning.lower() == "present")
            walk(item.get("ContentSequence", []), group)

    walk(sr.ContentSequence, None)
    return groups


def _finding_codes() -> dict[str, str]:
    from reports.dicom import codes

    return {label: str(codes.FINDING[label].value) for label in LABELS}


def test_positive_study_results_and_alarms(stack: dict[str, Any]) -> None:
    pacs, info = stack["pacs"], stack["studies"]["positive"]
    objs = _wait_results(stack, "positive", want_seg=True)

    # Everything filed under the same study in the PACS.
    for ids in objs.values():
        for oid in ids:
            assert pacs.get(f"/instances/{oid}/simplified-tags")["StudyInstanceUID"] == info["uid"]

    with _db(stack) as s:
        study = s.scalar(select(Study).where(Study.study_uid == info["uid"]))
        assert study is not None and study.flagged and study.status == "done"
        result = s.scalar(select(Result).where(Result.study_id == study.id, Result.superseded.is_(False)))
        assert result is not None and result.positive
        input_domain = result.summary["input_domain"]
        findings = {f.label: f for f in s.scalars(select(Finding).where(Finding.result_id == result.id))}
        series = s.get(Series, result.series_id)
        # the phantom writes ImagesInAcquisition, as scanners do: no quiet period to wait for
        assert series.meta["completed_early"] is True
        paths = [stack["node"].workdir / "data" / "store" / p for p in
                 s.scalars(select(Instance.path).where(Instance.series_id == series.id))]
    assert findings["any"].present and findings["intraparenchymal"].present

    # SR: one group per label, volumes equal the database's findings.
    sr = _download(pacs, objs[SR_CLASS][0])
    groups = _sr_groups(sr)
    assert list(groups) == list(LABELS)
    for label in LABELS:
        assert groups[label]["present"] == findings[label].present, label
        assert groups[label]["volume_ml"] == pytest.approx(findings[label].volume_ml, abs=1e-3), label

    # SEG: exactly the model's masks, recomputed here from the stored instances.
    from triage.dicom.assembly import load_volume
    from triage.models.inference import load_bundle

    volume, _headers = load_volume(paths)
    prediction = load_bundle(None).predict(volume)
    seg = hd.seg.segread(io.BytesIO(pacs.request("GET", f"/instances/{objs[SEG_CLASS][0]}/file", timeout=60)))
    seg_labels = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        seg_labels[number] = next(t for t in LABELS if desc.segment_label == segment_label(t))
    for number, label in seg_labels.items():
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_instance_uids, segment_numbers=[number],
            assert_missing_frames_are_empty=True, ignore_spatial_locations=True,
        )[..., 0].astype(bool)
        np.testing.assert_array_equal(arr, prediction.masks[label], err_msg=label)
    present_masks = {t for t in LABELS if prediction.masks.get(t) is not None and prediction.masks[t].any()}
    assert set(seg_labels.values()) == present_masks
    # The shipped bundle's input-domain check: a synthetic study is like its training studies.
    assert input_domain == prediction.input_domain and input_domain["in_domain"] is True
    assert "OUT OF DOMAIN" not in str(sr.SeriesDescription) and "OUT OF DOMAIN" not in str(seg.SeriesDescription)

    # Alarms: signed webhook and an HL7 ORU for this study.
    hook, mllp = stack["hook"], stack["mllp"]
    wait_for(lambda: any(info["uid"] in r["body"].decode() for r in hook.requests), timeout=60,
             message="webhook")
    req = next(r for r in hook.requests if info["uid"] in r["body"].decode())
    assert req["signature_ok"]
    body = json.loads(req["body"])
    assert json.dumps(body).count(info["uid"]) >= 1
    assert body["input_domain"] == input_domain
    wait_for(lambda: any("ORU^R01" in m for m in mllp.messages), timeout=60, message="HL7 ORU")
    assert notify.verify_signature(req["body"], req["headers"].get(notify.SIGNATURE_HEADER), SECRET)


def test_negative_study_has_negative_sr_and_no_alarm(stack: dict[str, Any]) -> None:
    pacs, info = stack["pacs"], stack["studies"]["negative"]
    # wait for either call (a false positive would bring a SEG), then require the negative one
    objs = _wait_results(stack, "negative", want_seg=None)
    groups = _sr_groups(_download(pacs, objs[SR_CLASS][0]))
    with _db(stack) as s:
        study = s.scalar(select(Study).where(Study.study_uid == info["uid"]))
        assert study is not None and study.status == "done"
        result = s.scalar(select(Result).where(Result.study_id == study.id, Result.superseded.is_(False)))
        findings = {f.label: f for f in s.scalars(select(Finding).where(Finding.result_id == result.id))}
    # Whatever the model said, the SR says the same as the database, and the flag follows the finding.
    for label in LABELS:
        assert groups[label]["present"] == findings[label].present, label
    assert study.flagged == findings["any"].present
    assert not findings["any"].present, f"the negative study was called positive (p={findings['any'].probability:.3f})"
    assert not any(info["uid"] in r["body"].decode() for r in stack["hook"].requests), "no alarm for a negative"
    assert groups["any"]["present"] is False
    assert all(groups[t]["present"] is False for t in SUBTYPES)
    assert SEG_CLASS not in objs, "a negative call sends no SEG"
