"""`ConfigError`, in a module that imports nothing, so that every floor can raise it.

Why a leaf: models/, data/, fps/ and lit/ check values that come from a config and name the key in the message,
but must not import `fpsa_train.config` (the training schema, which imports the FPS schedule and the model config)
to do so. `fpsa_train.config` re-exports it, so `from fpsa_train.config import ConfigError` still works.
"""


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key and the fix."""
