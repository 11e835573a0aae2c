"""The schemas of the training loop's parts: optimizer, trainer (strategy, precision, checkpoints, resume),
loggers and validation videos (`optim.*`, `trainer.*`, `logger.*`, `val_video.*` in the training config).

They live here, beside the Lightning code that reads them, so lit/ never imports the training schema
(fpsa_train/config.py), which composes them with the model, data and FPS groups and registers the result with Hydra.
Nothing here imports Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from fpsa_train.deprecation import renamed_value
from fpsa_train.errors import ConfigError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
WEIGHT_CHOICES = ("auto", "ema", "live")
"""Which weights of a run to use, one vocabulary for every key that chooses (`weights` of export and calibrate,
`val_video.weights`): `auto` the EMA when there is one, else the live weights; `ema` the EMA (the exponential
moving average training keeps, optim.ema_decay > 0); `live` the weights being trained, as the optimizer left them."""


def weight_choice(value: str, key: str = "weights") -> str:
    """`value`, one of WEIGHT_CHOICES; the deprecated `model` is taken as `live` with a warning; else a ConfigError
    naming `key`."""
    value = renamed_value(key, value, "model", "live")
    if value not in WEIGHT_CHOICES:
        raise ConfigError(f"{key}={value!r}: expected one of {WEIGHT_CHOICES}")
    return value


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak AdamW learning rate (Wan full fine-tunes use 1e-6..2e-5)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr` over this many optimizer steps, then constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights (kept in fp32, saved in checkpoints); 0 disables."""
    ema_warmup: bool = True
    """Ramp the EMA's decay as min(ema_decay, (1 + t) / (10 + t)) at optimizer step t, so the average forgets the
    starting weights within a short run (without it, decay 0.999 after 1,000 steps still holds 37% of the initial
    weights: a model trained from scratch for that long exports mostly its random init). False: ema_decay from the
    first step, the average starting at the initial (e.g. pretrained) weights."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: expected two values in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay={self.ema_decay} must be in [0, 1) (0 disables EMA)")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} and optim.grad_clip={self.grad_clip} "
                              "must be >= 0")



STRATEGIES = ("auto", "ddp", "deepspeed")
RESUME_AUTO, RESUME_NEVER = "auto", "never"


@dataclass
class DeepSpeedConfig:
    stage: int = 2
    """ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters (needed for 14B)."""
    offload_optimizer: bool = False
    """Keep the optimizer state (fp32 master weights, Adam moments) in CPU memory and step on the CPU."""
    offload_params: bool = False
    """ZeRO-3 only: keep the parameters in CPU memory between uses."""
    bucket_size: int = 200_000_000
    """Elements per reduce / all-gather bucket (smaller buckets save memory, larger ones overlap better)."""

    def __post_init__(self) -> None:
        if self.stage not in (2, 3):
            raise ConfigError(f"trainer.deepspeed.stage={self.stage}: expected 2 or 3")
        if self.offload_params and self.stage != 3:
            raise ConfigError("trainer.deepspeed.offload_params=true needs trainer.deepspeed.stage=3 "
                              "(ZeRO-2 does not partition parameters)")
        if self.bucket_size < 1:
            raise ConfigError(f"trainer.deepspeed.bucket_size={self.bucket_size} must be >= 1")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps to train."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: Any = "auto"
    """Devices (processes) per node: an int, a list of GPU indices, or auto (all GPUs, else 1 CPU process)."""
    num_nodes: int = 1
    """Number of nodes; under torchrun/srun the launcher's environment (MASTER_ADDR, NODE_RANK, ...) places them."""
    strategy: str = "auto"
    """How ranks share the work: `auto` (one process: none; several: DDP), `ddp`, or `deepspeed` (ZeRO, see
    `trainer.deepspeed`). The trainer group files ddp, zero2, zero3 and zero3_offload set it."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO settings, used when strategy=deepspeed."""
    sp_size: int = 1
    """Ulysses sequence parallelism: ranks that split one sample's tokens (and, inside attention, its heads).
    Consecutive ranks form a group; the data-parallel size is world_size / sp_size. model.num_heads must be
    divisible by it, and so must the token count."""
    precision: str = "auto"
    """`auto` = bf16-mixed on CUDA, 32-true on CPU; or any of 32-true, bf16-mixed, bf16-true, 16-mixed."""
    log_every_n_steps: int = 10
    """How often metrics are logged."""
    val_every_n_steps: int = 200
    """Run validation every this many training steps (and once before and after training)."""
    checkpoint_every_n_steps: int = 500
    """Save a checkpoint every this many steps (plus `last.ckpt`)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep besides `last.ckpt` (the newest; older ones are deleted)."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU)."""
    resume: str = RESUME_AUTO
    """`auto`: continue from the newest readable checkpoint in `<run_dir>/checkpoints` if there is one (a corrupt
    one is skipped with a warning); `never`: always start fresh; or the path of a checkpoint to resume from."""
    verify_checksums: bool = True
    """Before resuming, recompute the CRC-32 of every record of the checkpoint (torch stores one per tensor), so a
    checkpoint damaged after it was written is skipped instead of loaded. It reads the checkpoint once per
    process (~1.7 GB/s per core): at 14B under ZeRO-3 that is the whole ~290 GB folder on every rank, so turn it
    off for such jobs on slow shared storage (the zip structure is still checked)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy={self.strategy!r}: expected one of {STRATEGIES}")
        for name in ("max_steps", "log_every_n_steps", "val_every_n_steps", "checkpoint_every_n_steps",
                     "accumulate_grad_batches", "num_nodes", "sp_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LoggerConfig:
    csv: bool = True
    """Metrics to `<run_dir>/logs/metrics.csv`."""
    tensorboard: bool = True
    """TensorBoard event files under `<run_dir>/tensorboard`."""
    wandb: bool = True
    """Weights & Biases; offline (files under `<run_dir>/wandb`, `wandb sync` later) unless project and entity are
    set."""
    wandb_project: Optional[str] = None
    """W&B project; with `wandb_entity` set, logging goes online (mode auto)."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team)."""
    wandb_mode: str = "auto"
    """auto (online when project and entity are set, else offline), online, offline or disabled."""
    per_layer: bool = True
    """Log realised density and the FP8 saturation rate per layer (else per regime only)."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logger.wandb_mode={self.wandb_mode!r}: expected one of {WANDB_MODES}")
        if self.wandb_mode == "online" and not self.wandb_project:
            raise ConfigError("logger.wandb_mode=online needs logger.wandb_project (and logger.wandb_entity)")


@dataclass
class ValVideoConfig:
    every_n_steps: int = 0
    """Sample a validation clip every this many training steps (0 = never)."""
    prompt: str = "a red ball bouncing on a wooden floor"
    """The fixed prompt (encoded with data.components' UMT5). Without components (synthetic data) the first
    validation sample's caption embedding is used instead and the latents are shown as a channel preview."""
    seed: int = 0
    """Seed of the initial noise (fixed, so clips from different steps are comparable)."""
    steps: int = 20
    """Denoising steps (flow UniPC)."""
    guidance: float = 5.0
    """Classifier-free guidance scale (1 = no guidance, half the cost)."""
    shift: float = 5.0
    """Flow shift of the sampling schedule."""
    height: int = 0
    """Pixel height; 0 = the training clips'."""
    width: int = 0
    """Pixel width; 0 = the training clips'."""
    frames: int = 0
    """Pixel frames (4n+1); 0 = the training clips'."""
    fps: float = 16.0
    """Frame rate of the written mp4."""
    weights: str = "auto"
    """Which weights sample (WEIGHT_CHOICES): `auto` (the EMA, as export ships by default, or the live weights when
    the run keeps none, optim.ema_decay=0), `ema` (the EMA; refused when optim.ema_decay=0) or `live` (the weights
    being trained). Under ZeRO-3, where each rank holds only a slice of the EMA, auto and ema sample with the live
    weights and say so in a warning. `model`, the old spelling of live, is accepted with a warning."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.steps < 1:
            raise ConfigError(f"val_video.every_n_steps={self.every_n_steps} must be >= 0 and "
                              f"val_video.steps={self.steps} >= 1")
        if self.frames and (self.frames - 1) % 4:
            raise ConfigError(f"val_video.frames={self.frames} must be 4n+1 (or 0 for the training clips')")
        if self.height % 16 or self.width % 16:
            raise ConfigError(f"val_video.height={self.height}, val_video.width={self.width}: multiples of 16 "
                              "(or 0 for the training clips')")
        self.weights = weight_choice(self.weights, "val_video.weights")

