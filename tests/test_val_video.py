"""Validation videos during training: written at the right steps, playable, logged, and invisible to training's
randomness and the model's modes."""

from __future__ import annotations

import copy
import random

import decord
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from fpsa_train.config import ConfigError, DataConfig, LoggerConfig, ValVideoConfig
from fpsa_train.lit.loggers import build_loggers
from fpsa_train.lit.val_video import ValidationVideo, clip_size, latent_preview
from tests.test_logging import offline_wandb, read_csv, tiny_fit_parts  # noqa: F401  (offline_wandb: fixture)


def _probes():
    """(before, after): `before` records, `after` compares, on every training batch."""
    state: dict = {}

    def snapshot(pl_module):
        return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(),
                [m.training for m in pl_module.modules()])

    class Before(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["before"] = snapshot(pl_module)

    class After(Callback):
        checked = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rng, np_rng, py_rng, modes = snapshot(pl_module)
            b_rng, b_np, b_py, b_modes = state["before"]
            assert torch.equal(rng, b_rng) and np.array_equal(np_rng, b_np) and py_rng == b_py
            assert modes == b_modes and all(modes)
            self.checked += 1

    return Before(), After()


def fit(tmp_path, cb: ValidationVideo, module, data, max_steps: int, accumulate: int = 1, loggers=None):
    before, after = _probes()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=1,
                        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[before, cb, after],
                        logger=loggers or CSVLogger(tmp_path, name="logs", version=""))
    trainer.fit(module, datamodule=data)
    assert after.checked == max_steps * accumulate
    return trainer


def test_latent_preview_videos_at_every_n_steps_leave_training_untouched(tmp_path):
    conf, module, data = tiny_fit_parts(tmp_path)
    cfg = ValVideoConfig(every_n_steps=2, steps=2, guidance=3.0, seed=7)
    cb = ValidationVideo(cfg, conf.data, str(tmp_path), conf.objective.num_train_timesteps, conf.model.text_len)
    assert cb.preview and (cb.height, cb.width, cb.frames) == (64, 64, 9)  # 8·latent size, 4·(T−1)+1 frames
    fit(tmp_path, cb, module, data, max_steps=4, accumulate=2)

    out = tmp_path / "val_videos"
    assert sorted(p.name for p in out.iterdir()) == [
        "step0000002_latent_preview.mp4", "step0000002_latent_preview.png",
        "step0000004_latent_preview.mp4", "step0000004_latent_preview.png"]
    video = decord.VideoReader(str(out / "step0000004_latent_preview.mp4"))
    assert len(video) == conf.data.latent_frames and video[0].shape == (64, 64, 3)  # one frame per latent frame
    assert Image.open(out / "step0000004_latent_preview.png").size == (3 * 64, 64)  # 3 frames on one row
    seconds = [r["val_video/seconds"] for r in read_csv(tmp_path / "logs" / "metrics.csv") if "val_video/seconds" in r]
    assert len(seconds) == 2 and all(s > 0 for s in seconds)

    # the same seed and prompt give the same latents (the global RNG plays no part)
    torch.manual_seed(123)
    a, _ = cb.sample(module.model, module.schedule, module.device)
    torch.manual_seed(456)
    b, _ = cb.sample(module.model, module.schedule, module.device)
    assert torch.equal(a, b) and a.shape == (1, 16, 3, 8, 8)


def test_latent_preview_normalises_each_channel():
    x = torch.stack([torch.linspace(-3, 5, 2 * 2 * 2).view(2, 2, 2) * (c + 1) for c in range(4)])[None]  # (1,4,2,2,2)
    frames = latent_preview(x, upsample=8)
    assert frames.shape == (2, 16, 16, 3) and frames.dtype == np.uint8
    assert frames.min() == 0 and frames.max() == 255
    assert (frames[..., 0] == frames[..., 2]).all()  # channels 0 and 2 differ only by scale: same picture


def test_clip_size_defaults_to_the_training_clips():
    videos = DataConfig(kind="videos", metadata="m.csv", components="c", cache_dir="d", buckets=[[128, 96]],
                        num_frames=17)
    assert clip_size(ValVideoConfig(), videos) == (128, 96, 17)
    assert clip_size(ValVideoConfig(height=64, width=32, frames=9), videos) == (64, 32, 9)
    assert clip_size(ValVideoConfig(), DataConfig(latent_frames=3, latent_height=4, latent_width=6)) == (32, 48, 9)


def test_components_video_is_decoded_and_logged_to_wandb_and_tensorboard(tmp_path, tiny_components,
                                                                         offline_wandb):  # noqa: F811
    conf, module, data = tiny_fit_parts(tmp_path)
    videos = DataConfig(kind="videos", metadata="unused.csv", components=str(tiny_components), cache_dir="unused",
                        buckets=[[64, 64]], num_frames=9, text_dim=conf.model.text_dim)
    cfg = ValVideoConfig(every_n_steps=1, steps=2, prompt="a red circle moving left quickly on a dark blue background")
    cb = ValidationVideo(cfg, videos, str(tmp_path), conf.objective.num_train_timesteps, conf.model.text_len)
    assert not cb.preview
    loggers = build_loggers(LoggerConfig(), str(tmp_path), "tiny")
    fit(tmp_path, cb, module, data, max_steps=1, loggers=loggers)
    assert cb._vae is not None and cb._vae[0].device.type == "cpu"  # the VAE waits on the CPU; UMT5 is gone
    # the prompt and the negative one (the components' own)
    assert [t.shape[1] for t in cb._texts] == [conf.model.text_dim] * 2

    video = decord.VideoReader(str(tmp_path / "val_videos" / "step0000001.mp4"))
    assert len(video) == 9 and video[0].shape == (64, 64, 3)  # decoded pixels, not a preview
    assert Image.open(tmp_path / "val_videos" / "step0000001.png").size == (4 * 64, 2 * 64)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    import wandb

    wandb.finish()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/*/val_video/*"))
    assert {p.suffix for p in media} >= {".mp4", ".png"}, media


def test_videos_sample_with_the_ema_weights_and_give_the_live_ones_back(tmp_path, caplog):
    conf, module, _ = tiny_fit_parts(tmp_path)
    module.ema.attach(module.model)
    with torch.no_grad():  # an average that differs from the live weights everywhere
        for shadow in module.ema.shadow.values():
            shadow.mul_(0.5).add_(0.01)
    live = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    averaged = copy.deepcopy(module.model)
    module.ema.copy_to(averaged)

    def callback(weights: str = "ema") -> ValidationVideo:
        cb = ValidationVideo(ValVideoConfig(every_n_steps=1, steps=2, weights=weights), conf.data, str(tmp_path),
                             conf.objective.num_train_timesteps, conf.model.text_len)
        cb._texts = cb._synthetic_texts()
        return cb

    def clip(cb: ValidationVideo) -> tuple[torch.Tensor, str]:
        with cb.weights(module) as which:
            return cb.sample(module.model, module.schedule, module.device)[0], which

    ema_clip, which = clip(callback("ema"))
    assert which == "ema"
    assert torch.equal(ema_clip, callback().sample(averaged, module.schedule, module.device)[0])
    live_clip, which = clip(callback("live"))
    assert which == "live" and not torch.equal(live_clip, ema_clip)
    assert all(torch.equal(p, live[n]) for n, p in module.model.named_parameters())  # bit for bit

    with pytest.raises(RuntimeError, match="inside"), module.ema.applied(module.model):
        raise RuntimeError("inside")
    assert all(torch.equal(p, live[n]) for n, p in module.model.named_parameters())
    with pytest.raises(KeyError, match="not the averaged ones"), module.ema.applied(module):  # not the model
        pass

    module.ema.partitioned = True  # as under ZeRO-3: the live weights, with one warning
    cb = callback("ema")
    with caplog.at_level("WARNING"):
        assert clip(cb)[1] == "live" and torch.equal(clip(cb)[0], live_clip)
    assert caplog.text.count("slice of the EMA") == 1
    with pytest.raises(ConfigError, match="val_video.weights='best'"):
        ValVideoConfig(weights="best")
