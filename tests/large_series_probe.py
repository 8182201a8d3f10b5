"""Child process for the large-series memory test: read a series folder, run a bundle and build the
result objects as the ``infer`` job does, then print peak RSS (MiB) and the analysed shape as JSON.

Usage: python -m tests.large_series_probe SERIES_DIR BUNDLE MAX_SLICES (0: no bound)
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main() -> None:
    series, bundle_path, max_slices = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    from reports.dicom.seg import build_seg
    from reports.dicom.sr import build_sr
    from triage.dicom.assembly import load_volume
    from triage.models.inference import load_bundle

    bundle = load_bundle(bundle_path)
    volume, headers = load_volume(sorted(series.glob("*.dcm")), max_slices=max_slices or None)
    prediction = bundle.predict(volume)
    seg = build_seg(headers, prediction, bundle.identity)
    build_sr(headers, prediction, bundle.identity, seg=seg)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    span = float(volume.positions[-1][2] - volume.positions[0][2])
    print(json.dumps({"peak_mib": round(peak_mib, 1), "shape": list(volume.hu.shape),
                      "slab": volume.meta.get("slab"), "span_mm": span}))


if __name__ == "__main__":
    main()
