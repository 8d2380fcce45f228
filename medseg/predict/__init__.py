"""`medseg predict`: new scans in; NIfTI, DICOM-SEG and QC pictures per series out."""
