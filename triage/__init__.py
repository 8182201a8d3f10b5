"""ICH triage node: DICOM node, series assembly, models, worker and CLI."""

__version__ = "0.1.0"
