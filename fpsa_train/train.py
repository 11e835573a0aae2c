"""`train(cfg)`: compose → validate → build model, data, Lightning Trainer → fit → metrics.

The Hydra entry point (`python -m fpsa_train`) only calls this; tests call it directly with a composed config.
Validation runs once before training and once after, on fixed noise and σ, so the returned metrics say whether
the run learned anything (`val/loss_start` vs `val/loss_end`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from fpsa_train.config import TrainConfig, TrainerConfig, resolve
from fpsa_train.fps.schedule import Schedule
from fpsa_train.fps.transform import apply_fps_attention
from fpsa_train.lit.checkpoint_io import AtomicCheckpointIO
from fpsa_train.lit.datamodule import LatentDataModule
from fpsa_train.lit.module import FlowMatchingModule
from fpsa_train.models.build import architecture_of, build_model

log = logging.getLogger(__name__)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def build_trainer(cfg: TrainerConfig, run_dir: str, grad_clip: float, own_sampler: bool = False) -> L.Trainer:
    """`own_sampler`: the data shards batches across ranks itself (bucketed video cache)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True, save_top_k=2,
                        monitor="step", mode="max"),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, cfg.log_every_n_steps // 2)),
    ]
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=resolve_precision(cfg.precision),
        max_steps=cfg.max_steps,
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_n_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=grad_clip or None,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=CSVLogger(run_dir, name="logs", version=""),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=not own_sampler,
        default_root_dir=run_dir,
        enable_model_summary=True,
    )


def run_config(conf: TrainConfig, schedule: Schedule | None) -> dict:
    """What a checkpoint must carry for export and sampling (plain data): the architecture with its token order and
    tile shape, the schedule, the objective's timestep scale, and the clip size and encoders it was trained on."""
    data = conf.data
    if data.kind == "videos":
        (height, width), frames = data.buckets[0], data.num_frames
    else:
        height, width, frames = 8 * data.latent_height, 8 * data.latent_width, 4 * (data.latent_frames - 1) + 1
    return {"version": 1, "name": conf.name, "model": asdict(architecture_of(conf.model)),
            "schedule": schedule.to_dict() if schedule is not None else None,
            "num_train_timesteps": conf.objective.num_train_timesteps, "train_shift": conf.objective.shift,
            "video": {"height": int(height), "width": int(width), "frames": int(frames)},
            "components": os.path.abspath(data.components) if data.components else None}


def train(cfg: DictConfig | TrainConfig) -> dict[str, float]:
    conf = cfg if isinstance(cfg, TrainConfig) else resolve(cfg)
    L.seed_everything(conf.seed, workers=True)
    started = time.perf_counter()

    model = build_model(conf.model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.3f M parameters, token order %s", conf.model.name, n_params / 1e6, conf.model.token_order)
    schedule = None
    if conf.fps.enabled:
        schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
        apply_fps_attention(model, schedule, materialize=conf.fps.materialize, backend=conf.fps.backend)
    else:
        log.info("FPS attention off (fps.enabled=false): dense SDPA self-attention")
    module = FlowMatchingModule(model, conf.objective, conf.optim, schedule, conf.fps.selector_reg_weight,
                                run_config=run_config(conf, schedule))
    data = LatentDataModule(conf.data, text_len=conf.model.text_len)
    trainer = build_trainer(conf.trainer, conf.run_dir, conf.optim.grad_clip, own_sampler=conf.data.kind == "videos")

    val_start = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data, ckpt_path=conf.trainer.resume_from)
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    val_end = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]

    metrics = {
        "val/loss_start": float(val_start),
        "val/loss_end": float(val_end),
        "train/loss": train_loss,
        "steps": float(trainer.global_step),
        "params": float(n_params),
        "wall_s": time.perf_counter() - started,
    }
    log.info("done: %s; checkpoints in %s", metrics, os.path.join(conf.run_dir, "checkpoints"))
    return metrics
