"""The documented real-data path: ``triage train`` and ``triage evaluate`` on folders laid out like
RSNA 2019, CQ500 and CT-ICH (tiny synthetic stand-ins built at test time), including what each
source does not label (no masks in RSNA, exam labels only in CQ500, no subtype masks in CT-ICH)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from triage.cli import main as triage_main
from triage.labels import LABELS, SUBTYPES
from triage.models.bundle import load_weights, read_manifest
from triage.models.data import cached_studies, open_source
from triage.models.inference import load_bundle
from triage.models.preprocess import PreprocessConfig
from triage.phantom.generator import PhantomOptions, SyntheticStudy, generate_study

from .dataset_fixtures import write_cq500, write_ctich, write_rsna

SIZE = 128


def _study(seed: int, **kw: object) -> SyntheticStudy:
    return generate_study(seed, PhantomOptions(size=SIZE, tilt_deg=0.0, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    pos_a = _study(11, subtypes=("intraparenchymal",), size_class="medium")
    pos_b = _study(12, subtypes=("subdural", "subarachnoid"), size_class="medium")
    neg_a = _study(13, kind="negative")
    neg_b = _study(14, kind="negative")
    return {
        "rsna": write_rsna(root / "rsna", [pos_a, neg_a, pos_b]),
        "ctich": write_ctich(root / "ctich", [pos_b, neg_b], (49, 50)),
        "cq500": write_cq500(root / "cq500", [pos_a, neg_b], (7, 12)),
    }


def test_sources_say_what_they_do_not_label(layouts: dict[str, Path], tmp_path: Path) -> None:
    cfg = PreprocessConfig(size=32)
    rsna = cached_studies(open_source(str(layouts["rsna"])), cfg, tmp_path, progress=False)
    for c in rsna:
        assert c.label_known is not None and c.label_known.all(), "RSNA labels every slice"
        neg = c.slice_labels[:, 0] == 0
        assert np.array_equal(c.seg_known, neg), "no masks: only negative slices have known (empty) masks"
    cq = cached_studies(open_source(str(layouts["cq500"])), cfg, tmp_path, progress=False)
    pos, neg = sorted(cq, key=lambda c: -c.exam_labels[0])
    assert pos.exam_labels[0] == 1 and not pos.label_known.any() and not pos.seg_known.any()
    assert neg.label_known.all() and neg.seg_known.all() and not neg.slice_labels.any()
    ct = cached_studies(open_source(str(layouts["ctich"])), cfg, tmp_path, progress=False)
    sdh_sah = next(c for c in ct if c.exam_labels[0])
    bleeding = sdh_sah.slice_labels[:, 0] > 0
    one_subtype = (sdh_sah.slice_labels[:, 1:] > 0).sum(axis=1) == 1
    # the blood mask becomes a subtype mask where the slice has exactly one subtype
    assert np.array_equal(sdh_sah.seg_known, ~bleeding | one_subtype)
    assert sdh_sah.target[one_subtype].any()


def test_train_on_rsna_then_evaluate_on_ctich_and_cq500(layouts: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    rc = triage_main(["train", str(layouts["rsna"]), "--val", str(layouts["ctich"]), "--out", str(bundle),
                      "--epochs", "1", "--steps-per-epoch", "2", "--size", "32", "--seq-epochs", "1",
                      "--cache", str(tmp_path / "cache"), "--seed", "1", "--lr", "0.001",
                      "--hard-fraction", "0.3"])
    assert rc == 0
    m = read_manifest(bundle)
    assert "--lr 0.001" in m["training"]["command"], "the recorded command reproduces the run"
    assert "--hard-fraction 0.3" in m["training"]["command"]
    assert m["training"]["studies"] == 3 and "rsna" in m["training"]["data"]
    assert "input_domain" not in m, "3 and 2 studies are too few to fit the input-domain check"
    assert set(m["thresholds"]) == set(LABELS)
    with np.load(bundle / "checkpoints" / "validation_scores.npz") as v:  # to re-pick an operating point
        assert v["truth"].shape == v[m["exam_score"]].shape == (2, len(LABELS))  # the CT-ICH layout: 2

    out = tmp_path / "eval-ctich"
    assert triage_main(["evaluate", str(layouts["ctich"]), "--bundle", str(bundle), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["studies"] == 2 and report["positives"] == 1
    assert report["input_domain"] is None, "a bundle without the check reports none"
    assert report["dice"]["any_ge_1ml"]["n"] == 1, "CT-ICH's blood mask scores Dice and volume"
    assert report["volume_error_ml"]["n"] == 1
    assert all(report["dice"]["per_subtype_ge_1ml"][s]["n"] == 0 for s in SUBTYPES), "no subtype masks"
    assert (out / "roc.png").exists() or any(p.suffix == ".png" for p in out.iterdir())
    for line in (out / "rows.jsonl").read_text().splitlines():  # every rule's scores, to compare rules
        row = json.loads(line)
        assert set(row["probs_by_rule"]) == {"sequence_max", "segmentation_max", "mean", "max"}
        assert np.allclose(row["probs_by_rule"][m["exam_score"]], row["probs"], atol=1e-5)

    # the operating point chosen again without retraining, with mirror test-time augmentation
    weights = (bundle / m["weights"]["file"]).read_bytes()
    assert triage_main(["tune", str(bundle), "--val", str(layouts["ctich"]), "--tta", "flip", "--sensitivity", "1.0",
                        "--version", "tuned-1", "--cache", str(tmp_path / "cache"), "--per-label-rules",
                        "--scores-out", str(tmp_path / "val.npz")]) == 0
    with np.load(tmp_path / "val.npz") as v:  # every rule's scores per validation study
        assert v["truth"].shape == v["max"].shape == v["sequence_max"].shape == (2, len(LABELS))
        assert len(v["keys"]) == 2
    tuned = read_manifest(bundle)
    assert set(tuned["exam_score"]) == set(LABELS), "a rule per label"
    assert "--per-label-rules" in tuned["tuned"]["command"]
    assert tuned["test_time_augmentation"] == "flip" and tuned["version"] == "tuned-1"
    assert tuned["validation"]["operating_points"]["any"]["sensitivity"] == 1.0
    assert tuned["thresholds"]["any"] == tuned["validation"]["operating_points"]["any"]["threshold"]
    assert (bundle / m["weights"]["file"]).read_bytes() == weights, "tuning leaves the weights alone"
    assert load_bundle(bundle, device="cpu").flip

    # a second stage: only the sequence head learns, from the kept slice network's outputs on
    # studies that network never saw (here CQ500's exam labels: the multiple-instance loss)
    stage2 = tmp_path / "stage2"
    with pytest.raises(SystemExit, match="--init"):
        triage_main(["train", str(layouts["cq500"]), "--out", str(tmp_path / "no-init"), "--epochs", "0",
                     "--size", "32", "--cache", str(tmp_path / "cache")])
    with pytest.raises(SystemExit, match="--hard-fraction"):  # refused before any preprocessing
        triage_main(["train", str(layouts["cq500"]), "--out", str(tmp_path / "bad-hard"), "--epochs", "1",
                     "--size", "32", "--cache", str(tmp_path / "cache"), "--hard-fraction", "0.8"])
    assert triage_main(["train", str(layouts["cq500"]), "--val", str(layouts["ctich"]), "--out", str(stage2),
                        "--epochs", "0", "--init", str(bundle), "--size", "32", "--seq-epochs", "2", "--tta", "flip",
                        "--cache", str(tmp_path / "cache"), "--seed", "2"]) == 0
    m1, m2 = read_manifest(bundle), read_manifest(stage2)
    net1, seq1 = load_weights(bundle, m1)
    net2, seq2 = load_weights(stage2, m2)
    assert all(torch.equal(a, b) for a, b in zip(net1.state_dict().values(), net2.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seq1.state_dict().values(), seq2.state_dict().values(),
                                                     strict=True)), "the sequence head learned"
    assert m2["training"]["history"] == [] and len(m2["training"]["sequence_history"]) == 2
    assert m2["training"]["initial_training"]["command"] == m1["training"]["command"], "lineage kept"
    assert m2["test_time_augmentation"] == "flip"

    out = tmp_path / "eval-cq500"
    assert triage_main(["evaluate", str(layouts["cq500"]), "--bundle", str(bundle), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["studies"] == 2 and report["positives"] == 1
    assert report["dice"]["any_ge_1ml"]["n"] == 0 and report["volume_error_ml"]["n"] == 0, \
        "CQ500 has no masks: no Dice or volume error is made up"
    assert report["targets"]["any_auc"]["observed"] is not None
