"""The `resample` stage: to the target spacing (images linear, labels nearest), intensities normalised, with the
original grid recorded so a prediction can be put back on it exactly."""
