"""``triage demo``: generate a few synthetic studies and C-STORE them to the running node.

Study 1 is positive (intraparenchymal + intraventricular blood), study 2 negative, study 3 a hard
negative with calcifications; more studies are drawn at random. Some carry an extra localizer or
bone-kernel series so that series selection has something to skip. Files go through the node's own
SCU (pynetdicom, TCP_NODELAY) to ``settings.ae_title`` at ``--host``:``--port``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from triage.config import Destination, Settings
from triage.logging import get_logger

log = get_logger(__name__)

CALLING_AET = "TRIAGE-DEMO"


def plan(n: int) -> list[dict[str, Any]]:
    """What each demo study is: options for the generator, extra series, transfer syntax."""
    from triage.phantom.generator import PhantomOptions

    fixed = [
        {"options": PhantomOptions(subtypes=("intraparenchymal", "intraventricular"), size_class="medium"),
         "series": ("head", "localizer"), "syntax": "explicit"},
        {"options": PhantomOptions(kind="negative"), "series": ("head", "bone"), "syntax": "explicit"},
        {"options": PhantomOptions(kind="hard_negative_calcification"), "series": ("head",), "syntax": "jpegls"},
    ]
    return [fixed[i] if i < len(fixed) else {"options": PhantomOptions(), "series": ("head",), "syntax": "explicit"}
            for i in range(n)]


def generate(out: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Write ``n`` demo studies under ``out``; return one summary per study with its files."""
    from triage.phantom.dicom_writer import TRANSFER_SYNTAXES, Identity, write_study
    from triage.phantom.generator import generate_study

    done = []
    for i, item in enumerate(plan(n)):
        s = seed + i
        study = generate_study(s, item["options"])
        ident = Identity(index=9000 + i + 1, seed=s)
        files = write_study(study, ident, out / f"demo-{i + 1}", series=item["series"],
                            syntax=TRANSFER_SYNTAXES[item["syntax"]])
        done.append({
            "index": i + 1, "seed": s, "kind": study.kind, "subtypes": study.meta["subtypes"],
            "volume_ml": round(study.volumes_ml["any"], 1), "accession": ident.accession,
            "study_uid": ident.study_uid, "series": list(item["series"]),
            "files": [p for kind in item["series"] for p in files[kind]],
        })
    return done


def main(args: argparse.Namespace, settings: Settings) -> int:
    from triage.dicom.scu import SendError, is_success, send_files

    n = max(2, int(args.studies))
    port = int(args.port or settings.dicom_port)
    dest = Destination(settings.ae_title, args.host, port)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="triage-demo-") as tmp:
        studies = generate(Path(tmp), n, int(args.seed))
        for st in studies:
            try:
                results = send_files(dest, st["files"], CALLING_AET, connection_timeout=15.0)
            except SendError as exc:
                print(f"triage demo: cannot reach the node at {dest}: {exc}")
                print("Is it running?  triage serve  (or check --host/--port and ae_title)")
                return 2
            bad = [r for r in results if not is_success(r[1])]
            failed += len(bad)
            what = ", ".join(st["subtypes"]) or "no hemorrhage"
            print(f"study {st['index']}: {st['kind']:<28} {what:<40} accession {st['accession']}  "
                  f"{len(results) - len(bad)}/{len(results)} instances stored ({', '.join(st['series'])})")
            log.info("demo_sent", study_uid=st["study_uid"], kind=st["kind"], sent=len(results), failed=len(bad))
    print(f"\nSent to {dest}. Open the worklist: http://localhost:{settings.web_port}/")
    print("Positive studies should rise to the top within a minute or so (series quiet period + inference).")
    return 0 if failed == 0 else 1
