"""``triage phantom OUT --studies N --seed S [--montage] [--extra key=value] [--workers W]``.

Writes one folder per study (DICOM series, ground truth, optional montage) and a manifest
(``manifest.json`` and ``manifest.csv``) listing them. Study ``i`` (0-based) uses the seed
``S * 100000 + i``, so any study can be regenerated on its own.

Extra keys besides the :class:`PhantomOptions` fields: ``series`` (comma list of head, bone,
localizer, chest, contrast; default head) and ``transfer_syntax`` (explicit, jpegls, j2k, rle,
or ``mixed`` to rotate through them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from triage.config import Settings
from triage.labels import LABELS
from triage.logging import get_logger

log = get_logger(__name__)

CLI_KEYS = ("series", "transfer_syntax")
SYNTAX_CYCLE = ("explicit", "jpegls", "j2k", "rle")


def study_seed(base: int, index: int) -> int:
    return base * 100_000 + index


def parse_extra(pairs: list[str]) -> tuple[Any, tuple[str, ...], str]:
    """Split ``--extra`` pairs into PhantomOptions, the series kinds and the transfer syntax."""
    from triage.phantom.dicom_writer import SERIES_KINDS, TRANSFER_SYNTAXES
    from triage.phantom.generator import PhantomOptions

    gen: list[str] = []
    series: tuple[str, ...] = ("head",)
    syntax = "explicit"
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--extra expects key=value, got {pair!r}")
        key = key.strip()
        if key == "series":
            series = tuple(s.strip() for s in value.split(",") if s.strip())
            bad = [s for s in series if s not in SERIES_KINDS]
            if bad or "head" not in series:
                raise ValueError(f"series must include head and be among {', '.join(SERIES_KINDS)}")
        elif key == "transfer_syntax":
            syntax = value.strip()
            if syntax != "mixed" and syntax not in TRANSFER_SYNTAXES:
                raise ValueError(f"transfer_syntax must be mixed or one of {', '.join(TRANSFER_SYNTAXES)}")
        else:
            gen.append(pair)
    return PhantomOptions.from_strings(gen), series, syntax


def make_one(out: Path, index: int, seed: int, options: Any, series: tuple[str, ...], syntax_name: str,
             montage: bool) -> dict[str, Any]:
    """Generate and write study ``index`` (1-based); return its manifest row."""
    from triage.phantom.dicom_writer import TRANSFER_SYNTAXES, Identity, write_study
    from triage.phantom.generator import generate_study
    from triage.phantom.truth import save_truth

    t0 = time.perf_counter()
    study = generate_study(seed, options)
    t_gen = time.perf_counter() - t0
    if syntax_name == "mixed":
        syntax_name = SYNTAX_CYCLE[index % len(SYNTAX_CYCLE)]
    ident = Identity(index=index, seed=seed)
    sid = f"study-{index:04d}"
    d = out / sid
    files = write_study(study, ident, d / "dicom", series=series, syntax=TRANSFER_SYNTAXES[syntax_name])
    head_uids = [f.name for f in files["head"]]
    save_truth(study, d / "truth", extra={"study_id": sid, "study_instance_uid": ident.study_uid,
                                          "head_files": head_uids, "transfer_syntax": syntax_name})
    if montage:
        from triage.phantom.montage import save_montage

        save_montage(d / "montage.png", study.hu, study.masks, tile=192)
    return {
        "study_id": sid,
        "seed": seed,
        "kind": study.kind,
        "subtypes": ";".join(study.meta["subtypes"]),
        **{f"label_{k}": int(v) for k, v in zip(LABELS, study.exam_labels, strict=True)},
        "volume_any_ml": round(study.volumes_ml["any"], 4),
        "slices": study.hu.shape[0],
        "pixel_spacing_mm": round(study.pixel_spacing[0], 4),
        "slice_spacing_mm": round(study.slice_spacing, 3),
        "tilt_deg": round(study.geometry.tilt_deg, 2),
        "series": ";".join(series),
        "transfer_syntax": syntax_name,
        "patient_id": ident.patient_id,
        "accession": ident.accession,
        "study_instance_uid": ident.study_uid,
        "path": sid,
        "generate_s": round(t_gen, 3),
    }


def _job(a: tuple) -> dict[str, Any]:
    return make_one(*a)


def main(args: argparse.Namespace, settings: Settings) -> int:
    out = Path(args.out)
    try:
        options, series, syntax = parse_extra(list(args.extra or []))
    except ValueError as exc:
        print(f"triage phantom: {exc}")
        return 2
    if args.studies < 1:
        print("triage phantom: --studies must be >= 1")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i + 1, study_seed(args.seed, i), options, series, syntax, bool(args.montage))
            for i in range(args.studies)]
    workers = args.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) == 1:
        rows = [_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            rows = list(pool.map(_job, jobs))
    elapsed = time.perf_counter() - t0
    rate = len(rows) / elapsed if elapsed > 0 else 0.0
    manifest = {
        "generator": "triage.phantom",
        "format": "triage-phantom/1",
        "seed": args.seed,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        "series": list(series),
        "transfer_syntax": syntax,
        "labels": list(LABELS),
        "studies": rows,
        "elapsed_s": round(elapsed, 2),
        "workers": workers,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with (out / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    log.info("phantom_done", studies=len(rows), seconds=round(elapsed, 2), rate_per_s=round(rate, 3))
    print(f"wrote {len(rows)} studies to {out} in {elapsed:.1f} s ({rate:.2f} studies/s, {workers} workers)")
    return 0
