"""The `evaluate` stage: overlap and boundary metrics per patient and class."""
