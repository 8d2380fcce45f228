"""The `ingest` stage: DICOM and NIfTI in, canonical RAS NIfTI, sidecars, a manifest and a failures report out."""
