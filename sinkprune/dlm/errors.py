"""Errors for models that cannot be loaded; each message names the file, key or tensor."""


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded."""


class ConfigError(ModelLoadError):
    """A config.json that cannot describe a supported model."""


class ArtifactError(ModelLoadError):
    """A corrupted, truncated or inconsistent pruned artifact."""
