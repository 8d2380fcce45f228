"""The `train` stage: a MONAI U-Net on the resampled training patients, validated with sliding windows."""
