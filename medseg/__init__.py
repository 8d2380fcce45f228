"""medseg: a medical image segmentation pipeline, from PACS export to evaluated predictions.

Array convention, used everywhere: a volume is channel-first ``(C, X, Y, Z)`` with a 4x4 affine that
maps voxel indices to RAS millimetres (the NIfTI convention). Labels are integer maps with 0 as background.
"""

__version__ = "0.1.0"
