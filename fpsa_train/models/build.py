"""Build a Wan DiT from its config: random init, or on the meta device and filled from a checkpoint, in fp32 or in
the dtype the trainer keeps the weights in (`dtype`, see train.weight_dtype)."""

from __future__ import annotations

import contextlib
import os

import torch

from fpsa_train.config import ConfigError, ModelConfig
from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel


def architecture_of(cfg: ModelConfig) -> WanConfig:
    """The WanConfig part of a ModelConfig (drops loading options)."""
    fields = WanConfig.__dataclass_fields__
    return WanConfig(**{k: getattr(cfg, k) for k in fields})


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    """Parameters created inside take `dtype` (None: unchanged); the previous default is restored on exit."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, load_weights: bool = True,
                dtype: torch.dtype | None = None) -> WanModel:
    """A WanModel for `cfg`. With `cfg.checkpoint` it is built on the meta device and the weights are assigned
    from the checkpoint (one copy in memory, even for 14B); with `device="meta"` and `load_weights=False` only
    the skeleton is built. `dtype` (default fp32) is the parameters' dtype: the checkpoint is cast to it, or the
    random initialisation is drawn in it, so no fp32 copy of the model is ever made."""
    arch = architecture_of(cfg)
    if cfg.checkpoint and load_weights:
        if not os.path.exists(cfg.checkpoint):
            raise ConfigError(f"model.checkpoint={cfg.checkpoint!r} does not exist: give the local folder of the "
                              "Wan2.1 weights (nothing is downloaded)")
        from fpsa_train.models.checkpoint import load_wan_weights

        with torch.device("meta"):
            model = WanModel(arch)
        load_wan_weights(model, cfg.checkpoint, key_format=cfg.key_format, dtype=dtype or torch.float32)
        return model.to(device) if device is not None else model
    with default_dtype(dtype), torch.device(device) if device is not None else contextlib.nullcontext():
        return WanModel(arch)
