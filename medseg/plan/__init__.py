"""The plan stage: fingerprint the training data, derive the recipe every later stage follows."""
