"""`train(cfg)`: compose → validate → build model, data, Lightning Trainer → fit → metrics.

The Hydra entry point (`python -m fpsa_train`) only calls this; tests call it directly with a composed config.
Validation runs once before training and once after, on fixed noise and σ, so the returned metrics say whether
the run learned anything (`val/loss_start` vs `val/loss_end`; a resumed session starts from its checkpoint's
weights). Under DeepSpeed those two extra passes are skipped (a second engine on the same ZeRO-3 model is not
safe); validation then runs inside fit every `trainer.val_every_n_steps` and `val/loss_end` is the last of those.

Rerunning the same command continues the run (`trainer.resume=auto`): the newest readable checkpoint in
`<run_dir>/checkpoints` is restored with the step, optimizer, LR schedule, EMA and data position; the noise draws
depend only on (seed, rank, step), so the continued run is the uninterrupted one (lit/resume.py, lit/module.py).
A checkpoint of a different architecture or schedule is refused rather than silently trained on.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from omegaconf import DictConfig

from fpsa_train.config import TrainConfig, TrainerConfig, resolve
from fpsa_train.fps.schedule import Schedule, fps_enabled
from fpsa_train.fps.transform import apply_fps_attention
from fpsa_train.lit.checkpoint_io import AtomicCheckpointIO
from fpsa_train.lit.checkpointing import StepCheckpoint
from fpsa_train.lit.datamodule import LatentDataModule
from fpsa_train.lit.loggers import build_loggers
from fpsa_train.lit.module import FlowMatchingModule
from fpsa_train.lit.monitor import TrainingMonitor
from fpsa_train.lit.resume import check_same_run, resume_checkpoint
from fpsa_train.lit.strategy import build_strategy
from fpsa_train.lit.training_checkpoint import STATE_DICT, client_state
from fpsa_train.lit.val_video import ValidationVideo
from fpsa_train.models.build import architecture_of, build_model

log = logging.getLogger(__name__)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def weight_dtype(cfg: TrainerConfig) -> torch.dtype | None:
    """The dtype the trainer will keep the weights in when it is not fp32, else None: DeepSpeed with bf16/fp16
    precision casts every parameter to it (and makes its fp32 master copy from the cast values), and "-true"
    precisions convert the module. Building the model in it directly never holds an fp32 copy in host memory
    (29 GB per process at 14B instead of 57). Weights loaded from `model.weights` are exactly the fp32 build's
    cast; a random initialisation is drawn in that dtype, a different draw than an fp32 build with the same
    seed."""
    precision = resolve_precision(cfg.precision)
    low = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    if low is not None and (cfg.strategy == "deepspeed" or precision.endswith("-true")):
        return low
    return None


def build_trainer(conf: TrainConfig) -> L.Trainer:
    cfg, run_dir = conf.trainer, conf.run_dir
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    callbacks = [
        StepCheckpoint(os.path.join(run_dir, "checkpoints"), cfg.checkpoint_every_n_steps, cfg.keep_checkpoints),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, cfg.log_every_n_steps // 2)),
        TrainingMonitor(cfg.log_every_n_steps, sp_size=cfg.sp_size, per_layer=conf.logger.per_layer),
    ]
    if conf.val_video.every_n_steps:
        callbacks.append(ValidationVideo(conf.val_video, conf.data, run_dir, conf.objective.num_train_timesteps,
                                         conf.model.text_len))
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg, on_cpu, conf.data.batch_size),
        precision=resolve_precision(cfg.precision),
        max_steps=cfg.max_steps,
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_n_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=conf.optim.grad_clip or None,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=build_loggers(conf.logger, run_dir, conf.name),
        plugins=None if cfg.strategy == "deepspeed" else [AtomicCheckpointIO()],  # DeepSpeed saves folders itself
        use_distributed_sampler=False,  # the DataModule shards by data-parallel rank and resumes mid-epoch
        default_root_dir=run_dir,
        enable_model_summary=True,
        enable_checkpointing=False,  # StepCheckpoint writes them (lit/checkpointing.py says why not ModelCheckpoint)
    )


def run_config(conf: TrainConfig, schedule: Schedule | None) -> dict:
    """What a checkpoint must carry for export and sampling (plain data): the architecture with its token order and
    tile shape, the schedule, the objective's timestep scale, and the clip size and encoders it was trained on."""
    data = conf.data
    height, width, frames = data.clip_size()
    return {"version": 1, "name": conf.name, "model": asdict(architecture_of(conf.model)),
            "schedule": schedule.to_dict() if schedule is not None else None,
            "num_train_timesteps": conf.objective.num_train_timesteps, "train_shift": conf.objective.shift,
            "video": {"height": height, "width": width, "frames": frames},
            "components": os.path.abspath(data.components) if data.components else None}


def write_config_record(cfg: DictConfig, run_dir: str) -> None:
    """`<run_dir>/.hydra/`: the composed config and, under `python -m fpsa_train`, the overrides and Hydra's own
    config, as Hydra would write them. configs/train.yaml turns Hydra's writing off (`hydra.output_subdir: null`)
    because Hydra writes before the task runs, so a run refused for a config mismatch overwrote the record of the
    run whose checkpoints are there; train() writes it once the checks passed. Global rank 0 only."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    from fpsa_train.atomic import write_text_atomic

    if rank_zero_only.rank != 0:
        return
    folder = os.path.join(run_dir, ".hydra")
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, "config.yaml"), OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        write_text_atomic(os.path.join(folder, "overrides.yaml"),
                          OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
        write_text_atomic(os.path.join(folder, "hydra.yaml"), OmegaConf.to_yaml({"hydra": hydra_cfg}))


def train(cfg: DictConfig | TrainConfig) -> dict:
    conf = cfg if isinstance(cfg, TrainConfig) else resolve(cfg)
    L.seed_everything(conf.seed, workers=True)
    started = time.perf_counter()

    model = build_model(conf.model, dtype=weight_dtype(conf.trainer))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.3f M parameters (%s), token order %s", conf.model.name, n_params / 1e6,
             str(next(model.parameters()).dtype).removeprefix("torch."), conf.model.token_order)
    teacher = copy.deepcopy(model) if conf.objective.teacher == "dense" else None  # before FPS: dense attention
    schedule = None
    if fps_enabled(conf.fps):
        schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
        apply_fps_attention(model, schedule, materialize=conf.fps.materialize, backend=conf.fps.backend)
    else:
        log.info("FPS attention off (fps.enabled=false, or its schedule_file says enabled: false): dense SDPA "
                 "self-attention")
    ds = conf.trainer.deepspeed if conf.trainer.strategy == "deepspeed" else None
    cpu_adam = bool(ds and ds.offload_optimizer and torch.cuda.is_available())
    module = FlowMatchingModule(model, conf.objective, conf.optim, schedule, conf.fps.selector_reg_weight,
                                run_config=run_config(conf, schedule), seed=conf.seed, sp_size=conf.trainer.sp_size,
                                cpu_adam=cpu_adam, teacher=teacher)
    data = LatentDataModule(conf.data, text_len=conf.model.text_len, sp_size=conf.trainer.sp_size)
    trainer = build_trainer(conf)
    ckpt_path = resume_checkpoint(conf.trainer.resume, os.path.join(conf.run_dir, "checkpoints"),
                                  conf.trainer.verify_checksums)
    state = client_state(ckpt_path) if ckpt_path is not None else None  # memory-mapped: tensors read on use
    done = check_same_run(ckpt_path, module.run_config, state) if state is not None else 0  # the checkpoint's step
    if isinstance(cfg, DictConfig):
        write_config_record(cfg, conf.run_dir)  # only now: a refused run must not overwrite the record of the run
    if ckpt_path is not None and done >= conf.trainer.max_steps:
        log.warning("nothing to do: this run already finished (%s is at step %d, trainer.max_steps=%d); raise "
                    "trainer.max_steps to train further, or pass trainer.resume=never or another hydra.run.dir to "
                    "start over", ckpt_path, done, conf.trainer.max_steps)
        metrics = {"val/loss_start": float("nan"), "val/loss_end": float("nan"), "train/loss": float("nan"),
                   "steps": float(done), "resumed_from": ckpt_path, "params": float(n_params), "finished": True,
                   "wall_s": time.perf_counter() - started}
        write_summary(conf.run_dir, metrics)
        return metrics

    # Lightning cannot see that our DataModule restores the data position (lit/datamodule.py); its warning would
    # tell the user the opposite of what happens.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    val = ds is None  # see the module docstring
    if val and state is not None:  # a resumed session starts from the checkpoint: measure that, not the init
        module.load_state_dict(state[STATE_DICT])
    del state  # fit restores from the file itself
    val_start = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"] if val else float("nan")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
    if checkpoints.preempted is not None:
        raise checkpoints.preempted
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    if val:
        val_end = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    else:
        val_end = float(trainer.callback_metrics.get("val/loss", float("nan")))

    metrics = {
        "val/loss_start": float(val_start),
        "val/loss_end": float(val_end),
        "train/loss": train_loss,
        "steps": float(trainer.global_step),
        "resumed_from": ckpt_path,
        "params": float(n_params),
        "finished": trainer.global_step >= conf.trainer.max_steps,
        "wall_s": time.perf_counter() - started,
    }
    log.info("done: %s; checkpoints in %s", metrics, os.path.join(conf.run_dir, "checkpoints"))
    write_summary(conf.run_dir, metrics)
    return metrics


def write_summary(run_dir: str, metrics: dict) -> None:
    """`<run_dir>/summary.json`: what train() returned (global rank 0), for scripts that drive runs."""
    import json

    from lightning.pytorch.utilities import rank_zero_only

    from fpsa_train.atomic import write_text_atomic

    if rank_zero_only.rank == 0:
        write_text_atomic(os.path.join(run_dir, "summary.json"), json.dumps(metrics, indent=1) + "\n")
