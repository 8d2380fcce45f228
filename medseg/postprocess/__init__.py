"""The `postprocess` stage: connected-component clean-up of predicted labels."""
