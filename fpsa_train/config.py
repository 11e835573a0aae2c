"""The training config schema: typed dataclasses, one docstring per field, checks in `__post_init__`.

`TrainConfig` is registered with Hydra's ConfigStore as `train_schema` and is the first entry of
configs/train.yaml's defaults, so every group file and every command-line override is merged into a typed,
struct-mode config: an unknown key or a value of the wrong type fails at compose time with the key's full name.
Value checks (`__post_init__`) run when `resolve(cfg)` turns the composed config into these dataclasses, which
`train(cfg)` does before anything is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from fpsa_train.errors import ConfigError
from fpsa_train.fps.schedule import FPSConfig, fps_enabled
from fpsa_train.models.config import WanConfig

log = logging.getLogger(__name__)

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
TEACHERS = ("none", "dense")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")


@dataclass
class ModelConfig(WanConfig):
    name: str = "wan1_3b"
    """Short name for logs and run folders."""
    checkpoint: Optional[str] = MISSING
    """Wan2.1 weights: a folder (original or diffusers layout, single or sharded safetensors) or a file; mandatory
    unless a model config sets it to null, which trains from the original random initialisation (`tiny`)."""
    key_format: str = "auto"
    """Key format of `checkpoint`: `auto`, `original` or `diffusers`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_format not in ("auto", "original", "diffusers"):
            raise ConfigError(f"model.key_format={self.key_format!r}: expected auto, original or diffusers")


@dataclass
class ObjectiveConfig:
    timestep_sampling: str = "logit_normal"
    """How σ is drawn per sample: `logit_normal` (σ = sigmoid(N(mean, std))) or `uniform` on (0, 1)."""
    logit_mean: float = 0.0
    """Mean of the normal under the sigmoid (logit_normal only)."""
    logit_std: float = 1.0
    """Std of the normal under the sigmoid (logit_normal only)."""
    shift: float = 3.0
    """Flow shift σ' = s·σ / (1 + (s−1)·σ) applied after sampling; 1 disables it. Wan: ~2–3 at 480p, 5 at 720p."""
    num_train_timesteps: int = 1000
    """The model's timestep is num_train_timesteps·σ."""
    teacher: str = "none"
    """`none`: the flow-matching target ε − x0. `dense`: distil from the starting weights: a frozen copy of the
    model as loaded from model.checkpoint, with dense attention, predicts the velocity for the same noisy input, and
    that prediction is the target (self-distillation, for fine-tuning with FPS attention in the loop). Its target
    carries no sampling noise (ε − x0 does), so a short fine-tune recovers what FP8 + sparsity cost the starting
    model with far fewer steps; it can only reach the teacher, not improve on it. Validation loss stays the
    flow-matching loss. Costs one more forward per step and one more copy of the weights (not with ZeRO-3)."""
    distill_weight: float = 1.0
    """With a teacher: the loss is distill_weight·MSE(prediction, teacher) + (1 − distill_weight)·MSE(prediction,
    ε − x0)."""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ConfigError(f"objective.teacher={self.teacher!r}: expected one of {TEACHERS}")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"objective.distill_weight={self.distill_weight} must be in [0, 1]")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"objective.timestep_sampling={self.timestep_sampling!r}: expected one of "
                              f"{TIMESTEP_SAMPLINGS}")
        if self.shift <= 0:
            raise ConfigError(f"objective.shift={self.shift} must be > 0 (1 = no shift)")
        if self.logit_std <= 0:
            raise ConfigError(f"objective.logit_std={self.logit_std} must be > 0")


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


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """`videos`: a folder of videos + captions, preprocessed once into a cache of latents and text embeddings;
    `synthetic`: structured latents and text embeddings generated in-process (fast tests)."""
    num_samples: int = 512
    """synthetic: training samples per epoch."""
    val_samples: int = 32
    """Validation samples (fixed noise and σ). videos: the last `val_samples` cached clips are held out."""
    num_prompts: int = 8
    """synthetic: distinct captions; each one fixes the colour and motion of its clips."""
    latent_channels: int = 16
    """Latent channels (Wan VAE: 16)."""
    latent_frames: int = 5
    """synthetic: latent frames T (pixel frames 4·(T−1)+1)."""
    latent_height: int = 16
    """synthetic: latent height (pixel height / 8)."""
    latent_width: int = 16
    """synthetic: latent width (pixel width / 8)."""
    text_tokens: int = 16
    """synthetic: longest caption in tokens (unpadded; the collate zero-pads to model.text_len)."""
    text_dim: int = 4096
    """Width of the text embeddings (must equal model.text_dim)."""
    batch_size: int = 4
    """Samples per batch per device (one latent shape per batch)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 1234
    """Seed of the data (generation, shuffling, caption dropout), independent of the training seed."""
    metadata: Optional[str] = None
    """videos: CSV / JSONL / JSON with video and caption columns (paths relative to the file or absolute)."""
    components: Optional[str] = None
    """videos: a Wan2.1 diffusers-format folder with vae/, text_encoder/, tokenizer/ (local)."""
    cache_dir: Optional[str] = None
    """videos: where the preprocessed cache lives (built on first use, then reused)."""
    num_frames: int = 81
    """videos: frames per clip, 4n+1."""
    fps: float = 16.0
    """videos: target frame rate (source frames are resampled)."""
    start: str = "head"
    """videos: clip start: head, uniform or random."""
    buckets: list[list[int]] = field(default_factory=lambda: [[480, 832], [832, 480], [512, 512]])
    """videos: (height, width) buckets, multiples of 16."""
    caption_dropout: float = 0.1
    """videos: probability that a training caption is replaced by the empty prompt (for classifier-free guidance)."""
    latent_dtype: str = "bfloat16"
    """videos: dtype of the cached latents and text embeddings."""
    preprocess_batch_size: int = 4
    """videos: clips per encoder batch when building the cache."""
    preprocess_workers: int = 2
    """videos: decoding processes when building the cache."""
    generate_clips: int = 0
    """videos: write this many synthetic captioned clips to the metadata's folder first (the tiny default)."""
    generate_frames: int = 25
    """videos, generate_clips > 0: frames per generated clip (resampled from generate_fps to `fps` when cached)."""
    generate_fps: float = 24.0
    """videos, generate_clips > 0: frame rate of the generated clips."""
    generate_size: list[int] = field(default_factory=lambda: [128, 128])
    """videos, generate_clips > 0: (height, width) of the generated clips, even numbers."""
    generate_workers: int = 1
    """videos, generate_clips > 0: processes rendering and encoding the clips (the files do not depend on it)."""
    build_tiny_components: bool = False
    """videos: build the tiny VAE / UMT5 / tokenizer into `components` first (the tiny default)."""
    tiny_vae_steps: int = 300
    """videos: training steps of the tiny VAE on the clips (0 = untrained, for fast tests)."""

    def clip_size(self) -> tuple[int, int, int]:
        """(height, width, frames) in pixels of the training clips: the first bucket for videos; for synthetic
        latents the pixel size they stand for (Wan's VAE: 8× in space, 4× in time)."""
        if self.kind == "videos":
            (height, width), frames = self.buckets[0], self.num_frames
        else:
            height, width, frames = 8 * self.latent_height, 8 * self.latent_width, 4 * (self.latent_frames - 1) + 1
        return int(height), int(width), int(frames)

    def latent_grids(self) -> list[tuple[int, int, int]]:
        """Latent (frames, height, width) of every clip shape training can see: one per bucket for videos (Wan's
        VAE: 4× in time, 8× in space), the configured one for synthetic latents."""
        if self.kind != "videos":
            return [(self.latent_frames, self.latent_height, self.latent_width)]
        return [((self.num_frames - 1) // 4 + 1, int(h) // 8, int(w) // 8) for h, w in self.buckets]

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "videos"):
            raise ConfigError(f"data.kind={self.kind!r}: expected synthetic or videos")
        for name in ("num_samples", "val_samples", "num_prompts", "latent_channels", "latent_frames",
                     "latent_height", "latent_width", "text_tokens", "text_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.kind == "videos":
            for key in ("metadata", "components", "cache_dir"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key} is required for video data: data.metadata=<CSV/JSONL of videos and "
                                      "captions>, data.components=<Wan2.1 diffusers folder>, data.cache_dir=<cache>")
        if (self.num_frames - 1) % 4:
            raise ConfigError(f"data.num_frames={self.num_frames} must be 4n+1 (e.g. 17, 49, 81)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.start not in ("head", "uniform", "random"):
            raise ConfigError(f"data.start={self.start!r}: expected head, uniform or random")
        for b in self.buckets:
            if len(b) != 2 or any(int(x) % 16 or int(x) < 16 for x in b):
                raise ConfigError(f"data.buckets entry {list(b)}: expected [height, width], multiples of 16")
        if len(self.generate_size) != 2 or any(int(x) % 2 or int(x) < 16 for x in self.generate_size):
            raise ConfigError(f"data.generate_size={list(self.generate_size)}: expected [height, width], even, >= 16")
        if self.generate_frames < 1 or self.generate_fps <= 0:
            raise ConfigError(f"data.generate_frames={self.generate_frames} must be >= 1 and "
                              f"data.generate_fps={self.generate_fps} > 0")


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
    weights: str = "ema"
    """Which weights sample: "ema" (the EMA, as export ships by default; the live weights when optim.ema_decay=0
    or when ZeRO-3 partitions the EMA, with a warning) or "live" (the weights being trained)."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.steps < 1:
            raise ConfigError(f"val_video.every_n_steps={self.every_n_steps} must be >= 0 and "
                              f"val_video.steps={self.steps} >= 1")
        if self.frames and (self.frames - 1) % 4:
            raise ConfigError(f"val_video.frames={self.frames} must be 4n+1 (or 0 for the training clips')")
        if self.height % 16 or self.width % 16:
            raise ConfigError(f"val_video.height={self.height}, val_video.width={self.width}: multiples of 16 "
                              "(or 0 for the training clips')")
        if self.weights not in ("ema", "live"):
            raise ConfigError(f"val_video.weights={self.weights!r}: expected 'ema' or 'live'")


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
        self._check_teacher()

    def _check_teacher(self) -> None:
        if self.objective.teacher == "none":
            return
        if not self.model.checkpoint:
            raise ConfigError("objective.teacher=dense distils from the starting weights, but model.checkpoint is "
                              "empty (a randomly initialised teacher teaches nothing): give model.checkpoint, or "
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
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = ""
        if key == "model.checkpoint":
            hint = (" Real Wan2.1 runs start from the published weights: pass model.checkpoint=/path/to/"
                    "Wan2.1-T2V-1.3B (a folder with diffusion_pytorch_model*.safetensors, original or diffusers "
                    "layout). Nothing is downloaded.")
        raise ConfigError(f"missing mandatory config value `{key}`.{hint}")
    return OmegaConf.to_object(cfg)


register_configs()
