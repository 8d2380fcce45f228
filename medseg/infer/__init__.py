"""The `infer` stage: sliding-window prediction on the resampled grid, mapped back to the scan's original grid."""
