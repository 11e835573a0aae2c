"""Build a Wan DiT from its architecture (`WanConfig`) and a weights path: random init, or on the meta device and
filled from the weights, in fp32 or in the dtype the trainer keeps the weights in (`dtype`, see train.weight_dtype).

`build_wan` is the builder and knows nothing of the training schema; `build_model` and `architecture_of` adapt a
`model:` config (`config.ModelConfig`, read by attribute, not imported) to it, for the CLIs and the tests."""

from __future__ import annotations

import contextlib
import os

import torch

from fpsa_train.errors import ConfigError
from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel


def architecture_of(cfg: WanConfig) -> WanConfig:
    """The WanConfig part of a ModelConfig, or of any WanConfig subclass (drops loading options)."""
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


def build_wan(arch: WanConfig, weights: str | os.PathLike | None = None, key_format: str = "auto",
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WanModel:
    """A WanModel of architecture `arch`. With `weights` (a folder or file of Wan2.1 weights in `key_format`: auto,
    original or diffusers) it is built on the meta device and the weights are assigned (one copy in memory, even
    for 14B); without, it is randomly initialised (on the meta device, `device="meta"`: only the skeleton).
    `dtype` (default fp32) is the parameters' dtype: the weights are cast to it, or the random initialisation is
    drawn in it, so no fp32 copy of the model is ever made."""
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"weights={str(weights)!r} do not exist: give the local folder or file of the "
                                    "Wan2.1 weights (nothing is downloaded)")
        from fpsa_train.models.checkpoint import load_wan_weights

        with torch.device("meta"):
            model = WanModel(arch)
        load_wan_weights(model, weights, key_format=key_format, dtype=dtype or torch.float32)
        return model.to(device) if device is not None else model
    with default_dtype(dtype), torch.device(device) if device is not None else contextlib.nullcontext():
        return WanModel(arch)


def build_model(cfg: WanConfig, device: torch.device | str | None = None, load_weights: bool = True,
                dtype: torch.dtype | None = None) -> WanModel:
    """`build_wan` for a `model:` config (`config.ModelConfig`: a WanConfig with `weights` and `key_format`):
    the weights are `cfg.weights` unless `load_weights=False` or it is null (random init). Weights that are not
    there are a ConfigError naming `model.weights`."""
    weights = cfg.weights if load_weights else None
    if weights and not os.path.exists(weights):
        raise ConfigError(f"model.weights={weights!r} does not exist: give the local folder of the "
                          "Wan2.1 weights (nothing is downloaded)")
    return build_wan(architecture_of(cfg), weights or None, cfg.key_format, device=device, dtype=dtype)
