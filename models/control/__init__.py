"""The control plane: the registry of models and apps on the compacted control topic, model
artifacts, and which specs are valid."""
