"""Tiny folders laid out like the public datasets (RSNA 2019, CQ500, PhysioNet CT-ICH), written from
synthetic studies at test time: no real data is committed."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import nibabel as nib
import numpy as np

from triage.labels import LABELS
from triage.phantom.dicom_writer import Identity, axial_series, nifti_affine, write_study
from triage.phantom.generator import SyntheticStudy


def write_rsna(root: Path, studies: list[SyntheticStudy]) -> Path:
    """``stage_2_train/ID_*.dcm`` plus ``stage_2_train.csv`` (one row per image and label, shuffled)."""
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    rows: list[tuple[str, int]] = []
    for i, st in enumerate(studies):
        files = axial_series(st, Identity(index=i + 1, seed=st.seed), root / "tmp" / str(i))
        for k, f in enumerate(files):
            image_id = f"ID_{i:02d}{k:03d}{random.Random(k).randrange(16**4):04x}"
            f.rename(images / f"{image_id}.dcm")
            for j, label in enumerate(LABELS):
                rows.append((f"{image_id}_{label}", int(st.slice_labels[k, j])))
    random.Random(0).shuffle(rows)
    with (root / "stage_2_train.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Label"])
        w.writerows(rows)
    return root


def write_cq500(root: Path, studies: list[SyntheticStudy], numbers: tuple[int, ...]) -> Path:
    """``CQ500CT<n> CQ500CT<n>/Unknown Study/<series>/`` plus ``reads.csv`` (three readers; reader 3
    always disagrees, so the majority is the truth)."""
    reads = []
    for n, st in zip(numbers, studies, strict=True):
        pdir = root / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study"
        write_study(st, Identity(index=n, seed=st.seed), pdir, series=("head", "bone", "localizer"))
        (pdir / "head").rename(pdir / "CT PLAIN THICK")
        (pdir / "bone").rename(pdir / "CT BONE")
        row: dict[str, object] = {"name": f"CQ500-CT-{n}", "Category": "B1"}
        for r in (1, 2, 3):
            for col, label in (("ICH", "any"), ("IPH", "intraparenchymal"), ("IVH", "intraventricular"),
                               ("SDH", "subdural"), ("EDH", "epidural"), ("SAH", "subarachnoid")):
                truth = int(st.exam_labels[LABELS.index(label)])
                row[f"R{r}:{col}"] = truth if r != 3 else 1 - truth
        reads.append(row)
    with (root / "reads.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(reads[0]))
        w.writeheader()
        w.writerows(reads)
    return root


def write_ctich(root: Path, studies: list[SyntheticStudy], numbers: tuple[int, ...]) -> Path:
    """``ct_scans/NNN.nii``, ``masks/NNN.nii`` (one blood mask, no subtypes) and the per-slice CSV."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for num, st in zip(numbers, studies, strict=True):
        aff = nifti_affine(st)
        nib.save(nib.Nifti1Image(st.hu.transpose(2, 1, 0).astype(np.int16), aff), root / "ct_scans" / f"{num:03d}.nii")
        m = (st.any_mask * 255).astype(np.uint8).transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(m, aff), root / "masks" / f"{num:03d}.nii")
        for k in range(st.hu.shape[0]):
            lab = st.slice_labels[k]
            rows.append({"PatientNumber": num, "SliceNumber": k + 1,
                         "Intraventricular": lab[3], "Intraparenchymal": lab[2], "Subarachnoid": lab[4],
                         "Epidural": lab[1], "Subdural": lab[5], "No_Hemorrhage": int(not lab[0]),
                         "Fracture_Yes_No": 0})
    with (root / "hemorrhage_diagnosis_raw_ct.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def write_slice_set(root: Path, studies: list[SyntheticStudy], ordered: bool = True,
                    window: tuple[float, float] | None = (40.0, 80.0), subtypes_known: bool = True,
                    boxes: bool = False) -> Path:
    """A slice set (``labels.csv`` + ``images/`` + ``masks/``) from synthetic studies: each slice is
    the study's HU in ``window`` as an 8-bit PNG (``window`` None: written in 40/80 and marked
    unknown). ``ordered``: the slice column gives the order (else empty, each slice an exam).
    ``subtypes_known`` False leaves the subtype columns empty on slices with blood (as phe-sich);
    ``boxes`` writes the bounding box of the blood instead of a mask (as phe-sich)."""
    from PIL import Image

    from triage.labels import SUBTYPES
    from triage.models.preprocess import brain_window_u8

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    c, w = window or (40.0, 80.0)
    rows = []
    for i, st in enumerate(studies):
        pixels = brain_window_u8(np.round(st.hu), (c, w))
        for z in range(st.hu.shape[0]):
            name = f"{i:02d}_{z:02d}.png"
            Image.fromarray(pixels[z]).save(root / "images" / name)
            lab = [int(v) for v in st.slice_labels[z]]
            cells = [str(v) for v in lab]
            if not subtypes_known and lab[0]:
                cells[1:] = [""] * (len(LABELS) - 1)
            label_map = np.zeros(pixels[z].shape, np.uint8)
            for k, sub in enumerate(SUBTYPES):
                m = st.masks.get(sub)
                if m is not None:
                    label_map[np.asarray(m[z], bool)] = k + 1
            mask_cell, box_cell = "", ""
            if boxes:
                ys, xs = np.nonzero(label_map)
                if len(ys):
                    box_cell = f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"
            else:
                Image.fromarray(label_map).save(root / "masks" / name)
                mask_cell = f"masks/{name}"
            rows.append([f"images/{name}", f"s{i:02d}", str(z) if ordered else "", *cells, mask_cell, box_cell,
                         f"{c:g}/{w:g}" if window else "unknown"])
    with (root / "labels.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["image", "study", "slice", *LABELS, "mask", "boxes", "window"])
        wr.writerows(rows)
    return root
