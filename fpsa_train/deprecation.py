"""Old config spellings that still work: each is mapped to its replacement, with a warning that names it.

A renamed key stays in its schema (Hydra's struct mode refuses a key the schema does not declare, so an old command
line or a user's YAML would otherwise fail to compose) and its value moves to the new key; a renamed value is
replaced by the new one. Giving the old and the new key different values is a ConfigError naming both: which one
was meant cannot be guessed. A leaf module (logging and ConfigError only), so that every floor can use it.

The renames (issue 20: "checkpoint" means a training checkpoint only; one vocabulary for EMA or live weights):
- `model.checkpoint` → `model.weights` (the pretrained weights a model is built from);
- calibrate: `weights=<training checkpoint>` → `checkpoint=`, `use_ema=true|false` → `weights=auto|live`,
  `reference_checkpoint` → `reference_weights`;
- the weight choice `model` → `live` (export, calibrate, validation videos: `weights: auto|ema|live`).
"""

from __future__ import annotations

import logging

from fpsa_train.errors import ConfigError

log = logging.getLogger(__name__)


def renamed_key(old: str, old_value, new: str, value, new_value, new_is_set: bool):
    """`value`, what the deprecated `old=old_value` means for the key `new`, with a warning naming `new`; a
    ConfigError naming both keys when `new` is set as well (`new_is_set`, to `new_value`) to something else."""
    if new_is_set and new_value != value:
        raise ConfigError(f"{old}={old_value!r} and {new}={new_value!r} are both given: `{old}` is the deprecated "
                          f"spelling of {new}={value!r}; give only {new}")
    log.warning("config key `%s` is deprecated: %s=%r means %s=%r; use `%s`", old, old, old_value, new, value, new)
    return value


def renamed_value(key: str, value, old, new):
    """`new` (with a warning) when `key` holds the deprecated value `old`, else `value` unchanged."""
    if value != old:
        return value
    log.warning("%s=%s is deprecated: use %s=%s", key, old, key, new)
    return new
