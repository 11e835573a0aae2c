"""The training config schema: typed dataclasses, one docstring per field, checks in `__post_init__`.

`TrainConfig` is registered with Hydra's ConfigStore as `train_schema` and is the first entry of
configs/train.yaml's defaults, so every group file and every command-line override is merged into a typed,
struct-mode config: an unknown key or a value of the wrong type fails at compose time with the key's full name.
Value checks (`__post_init__`) run when `resolve(cfg)` turns the composed config into these dataclasses, which
`train(cfg)` does before anything is built.

Each group's dataclass lives beside the code that reads it, so that no lower floor (models/, data/, fps/, lit/)
imports this module or Hydra: `models/config.py` WanConfig, `data/config.py` DataConfig, `flow.py` ObjectiveConfig,
`fps/schedule.py` FPSConfig, `lit/config.py` the optimizer, trainer, logger and validation-video groups. This module
composes them into `TrainConfig`, adds the checks that span groups, and registers the result with Hydra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from fpsa_train.data.config import DataConfig
from fpsa_train.deprecation import renamed_key
from fpsa_train.errors import ConfigError
from fpsa_train.flow import TEACHERS, TIMESTEP_SAMPLINGS, ObjectiveConfig
from fpsa_train.fps.schedule import FPSConfig, fps_enabled
from fpsa_train.lit.config import (PRECISIONS, RESUME_AUTO, RESUME_NEVER, STRATEGIES, WANDB_MODES, DeepSpeedConfig,
                                   LoggerConfig, OptimConfig, TrainerConfig, ValVideoConfig)
from fpsa_train.models.config import WanConfig

log = logging.getLogger(__name__)

# Each group's schema lives beside the code that reads it (so no lower floor imports this module); they are
# re-exported here, their old home, so `from fpsa_train.config import DataConfig` keeps working.
__all__ = ["ConfigError", "DataConfig", "DeepSpeedConfig", "FPSConfig", "LoggerConfig", "ModelConfig",
           "ObjectiveConfig", "OptimConfig", "PRECISIONS", "RESUME_AUTO", "RESUME_NEVER", "STRATEGIES", "TEACHERS",
           "TIMESTEP_SAMPLINGS", "TrainConfig", "TrainerConfig", "ValVideoConfig", "WANDB_MODES", "WanConfig",
           "register_configs", "resolve", "unknown_keys"]


@dataclass
class ModelConfig(WanConfig):
    name: str = "wan1_3b"
    """Short name for logs and run folders."""
    weights: Optional[str] = MISSING
    """Pretrained Wan2.1 weights: a folder (original or diffusers layout, single or sharded safetensors) or a file;
    mandatory unless a model config sets it to null, which trains from the original random initialisation
    (`tiny`). Not a training checkpoint: `trainer.resume` continues a run, `python -m fpsa_train.export` turns its
    checkpoint into weights."""
    key_format: str = "auto"
    """Key format of `weights`: `auto`, `original` or `diffusers`."""
    checkpoint: Optional[str] = MISSING
    """Deprecated: the old name of `weights` (a "checkpoint" is a training checkpoint now). Still accepted:
    resolve() moves its value to `weights` with a warning; giving both, different, is an error. Its default is
    `???` (not given), so that `model.checkpoint=null` (random initialisation) still means what it meant."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint not in (MISSING, None):  # built in Python, not through resolve()
            self.weights = renamed_key("model.checkpoint", self.checkpoint, "model.weights", self.checkpoint,
                                       self.weights, self.weights not in (MISSING, None))
            self.checkpoint = None
        if self.key_format not in ("auto", "original", "diffusers"):
            raise ConfigError(f"model.key_format={self.key_format!r}: expected auto, original or diffusers")


@dataclass
class TrainConfig:
    name: str = "tiny"
    """Run name (used for the run folder)."""
    seed: int = 0
    """Global seed (model init, σ and noise draws)."""
    run_dir: str = "outputs/run"
    """Where checkpoints and logs go; under Hydra this is the run directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fps: FPSConfig = field(default_factory=FPSConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    val_video: ValVideoConfig = field(default_factory=ValVideoConfig)

    def __post_init__(self) -> None:
        if self.data.text_dim != self.model.text_dim:
            raise ConfigError(f"data.text_dim={self.data.text_dim} differs from model.text_dim={self.model.text_dim}")
        if self.data.latent_channels != self.model.in_dim:
            raise ConfigError(f"data.latent_channels={self.data.latent_channels} differs from "
                              f"model.in_dim={self.model.in_dim}")
        if fps_enabled(self.fps):
            self._check_schedule_fits_the_clips()
        from fpsa_train.fps.schedule import BACKENDS

        if self.fps.backend not in BACKENDS:
            raise ConfigError(f"fps.backend={self.fps.backend!r}: expected one of {BACKENDS}")
        if fps_enabled(self.fps) and self.model.token_order != "tile":
            raise ConfigError(f"fps.enabled needs tile-major tokens but model.token_order={self.model.token_order!r}: "
                              "set model.token_order=tile (or fps=dense)")
        sp = self.trainer.sp_size
        if sp > 1 and self.model.num_heads % sp:
            raise ConfigError(f"trainer.sp_size={sp} must divide model.num_heads={self.model.num_heads} (Ulysses "
                              "splits the heads across the sequence-parallel ranks)")
        if self.data.text_tokens > self.model.text_len:
            raise ConfigError(f"data.text_tokens={self.data.text_tokens} exceeds model.text_len={self.model.text_len}")
        if self.val_video.every_n_steps and self.val_video.weights == "ema" and not self.optim.ema_decay:
            raise ConfigError("val_video.weights=ema, but optim.ema_decay=0 keeps no EMA: use val_video.weights=auto "
                              "(the EMA when there is one) or live")
        self._check_teacher()

    def _check_teacher(self) -> None:
        if self.objective.teacher == "none":
            return
        if not self.model.weights:
            raise ConfigError("objective.teacher=dense distils from the starting weights, but model.weights is "
                              "empty (a randomly initialised teacher teaches nothing): give model.weights, or "
                              "objective.teacher=none")
        if self.trainer.sp_size > 1:
            raise ConfigError(f"objective.teacher=dense with trainer.sp_size={self.trainer.sp_size}: the teacher "
                              "does not split its sequence across ranks yet; use trainer.sp_size=1 or "
                              "objective.teacher=none")
        if self.trainer.strategy == "deepspeed" and self.trainer.deepspeed.stage == 3:
            raise ConfigError("objective.teacher=dense keeps a full copy of the weights on every rank, which ZeRO-3 "
                              "(trainer.deepspeed.stage=3) exists to avoid: use trainer=zero2 or ddp, or "
                              "objective.teacher=none")


    def _check_schedule_fits_the_clips(self) -> None:
        """Every regime is valid (Schedule.from_config names the bad field), and a top-k above a training clip's
        tile count is said out loud: such a regime keeps every tile of those clips, so it trains dense under a
        sparse name (the diffusers path refuses it at run time). A warning rather than an error, because one
        schedule serves several resolutions (and the tiny test grids have fewer tiles than the default top-k)."""
        from fpsa_train.fps.schedule import Schedule, ScheduleError
        from fpsa_train.models.token_order import TokenLayout

        schedule = Schedule.from_config(self.fps, tuple(self.model.tile_shape))
        for latent in self.data.latent_grids():
            grid = tuple(n // p for n, p in zip(latent, self.model.patch_size))
            try:
                schedule.validate_grid(TokenLayout(grid, "tile", tuple(self.model.tile_shape)).tile_grid, grid)
            except ScheduleError as err:
                source = "data.buckets / data.num_frames" if self.data.kind == "videos" else "data.latent_*"
                log.warning(
                    "fps: %s of the training clips (latent %s from %s, model.patch_size=%s, model.tile_shape=%s): "
                    "that regime keeps every tile of these clips, i.e. trains dense; lower its sparsity.topk to "
                    "make it sparse", err, latent, source, list(self.model.patch_size), list(self.model.tile_shape))


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of `cfg` that its schema does not declare, as (full key, the schema's fields), depth first.

    A plain `model.dimm=3` already fails at compose time (struct mode), but Hydra's `+model.dimm=3` and
    `++model.dimm=3`, the form its own error message suggests, add the key anyway, and `to_object` then sets it
    as a stray attribute that nothing reads: the typo would train silently with the default."""
    from dataclasses import fields, is_dataclass

    out = []
    schema = OmegaConf.get_type(cfg)
    declared = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) else None
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if declared is not None and key not in declared:
            out.append((name, declared))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            out += unknown_keys(node, f"{name}.")
        elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
            for i, item in enumerate(node):
                if isinstance(item, DictConfig):
                    out += unknown_keys(item, f"{name}.{i}.")
    return out


def _rename_model_checkpoint(cfg: DictConfig) -> None:
    """`model.checkpoint`, the deprecated name of `model.weights`, moved there in place (a warning names the new key;
    both set, to different values, is a ConfigError). Before `???` is checked: `model.weights` is mandatory for the
    real models, and `+experiment=wan1_3b model.checkpoint=<folder>` must still give it."""
    model = cfg._get_node("model") if "model" in cfg.keys() else None
    if not isinstance(model, DictConfig) or model._is_none() or "checkpoint" not in model.keys():  # `in`: not ???
        return
    if not OmegaConf.is_missing(model, "checkpoint"):
        given = not OmegaConf.is_missing(model, "weights") and model.weights is not None
        model.weights = renamed_key("model.checkpoint", model.checkpoint, "model.weights", model.checkpoint,
                                    model.weights if given else None, given)
    model.checkpoint = None


def resolve(cfg: DictConfig):
    """Composed config → validated dataclasses. Missing mandatory values (`???`) and keys the schema does not
    declare (added with Hydra's `+key=`) name their key and the fix."""
    import difflib

    unknown = unknown_keys(cfg)
    if unknown:
        key, declared = unknown[0]
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], declared, n=1)
        hint = f"did you mean `{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}`? " if close else ""
        more = f" (and {len(unknown) - 1} more: {', '.join(k for k, _ in unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown config key `{key}`{more}: the schema has no such field ({hint}known here: "
                          f"{', '.join(declared)}). Keys cannot be added with `+key=`; fix the name")
    _rename_model_checkpoint(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = ""
        if key == "model.weights":
            hint = (" Real Wan2.1 runs start from the published weights: pass model.weights=/path/to/"
                    "Wan2.1-T2V-1.3B (a folder with diffusion_pytorch_model*.safetensors, original or diffusers "
                    "layout). Nothing is downloaded.")
        raise ConfigError(f"missing mandatory config value `{key}`.{hint}")
    return OmegaConf.to_object(cfg)


register_configs()
