"""Image volumes: assembly from DICOM instances and the in-memory volume type."""
