"""`ValidationVideo`: every `val_video.every_n_steps` optimizer steps, sample one short clip with the model being
trained, and write and log it, so a run shows how its videos evolve instead of only a loss curve.

The clip is sampled as `python -m fpsa_train.sample` samples an exported model (`sampling.denoise_loop`: flow UniPC,
classifier-free guidance with both branches in one batch, the FPS regime picked per step from σ), with the model
in eval mode and under no_grad (bf16 autocast on CUDA), from a fixed seed and prompt so clips from different
steps are comparable. Then the model's train/eval modes are restored exactly. The weights are the EMA's
(`val_video.weights=auto`, the default, or `ema`: what export ships), swapped in for the clip and swapped back bit
for bit; the live weights when EMA is off, when `val_video.weights=live`, or under ZeRO-3, where each rank holds
only its slice of the EMA (a warning says so once).

Text and pixels:
- with `data.components` (a Wan2.1 diffusers folder), global rank 0 encodes the prompt and Wan's negative prompt
  once, at setup, with UMT5, frees the text encoder and sends the embeddings to the other ranks; it keeps the VAE
  on the CPU and decodes each clip on the GPU, as sample.py does;
- without (synthetic latents), the prompt is the first validation sample's caption embedding and the negative one
  a zero context, and there is nothing to decode: the video is a *latent preview*, the first three latent channels
  (each normalised to its range over the clip), one frame per latent frame (at fps/4, so it lasts as long as the
  video would), 8× nearest-upsampled to the pixel size; the log line and file names say so.

Training is not disturbed: the noise comes from its own generator, and the global RNG states (torch CPU and
CUDA, numpy, random) are restored afterwards, so a run's loss curve is the same with or without videos. The time
taken is left out of the TrainingMonitor's step time.

Distributed: every rank runs the denoising (under ZeRO-3 each forward gathers parameters from all ranks, under
sequence parallelism each rank holds a slice of the tokens); only global rank 0 decodes, writes
`<run_dir>/val_videos/step<NNNNNNN>.mp4` and `.png` (a contact sheet; both written to a temporary name, then
renamed) and logs: to W&B the video and the sheet, to TensorBoard the sheet (TensorBoard videos need moviepy), and
to every logger `val_video/seconds`.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fpsa_train.atomic import write_atomic
from fpsa_train.data.config import DataConfig
from fpsa_train.fps.transform import fps_cores
from fpsa_train.lit.config import ValVideoConfig
from fpsa_train.lit.loggers import log_metrics, logging_step
from fpsa_train.lit.monitor import TrainingMonitor

log = logging.getLogger(__name__)

SHEET_FRAMES = 8
WAN_SCALES = (4, 8)  # Wan VAE: 4× in time, 8× in space (the synthetic latents' pixel size follows it)


@contextmanager
def preserved_rng(device: torch.device):
    """Restore the global RNG states (torch CPU and `device`'s CUDA, numpy, random) on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def clip_size(cfg: ValVideoConfig, data: DataConfig) -> tuple[int, int, int]:
    """(height, width, frames) of the clip: the config's, 0 meaning the training clips'."""
    height, width, frames = data.clip_size()
    return cfg.height or height, cfg.width or width, cfg.frames or frames


def latent_preview(x: torch.Tensor, upsample: int) -> np.ndarray:
    """Latents (1, C, T, H, W) → (T, upsample·H, upsample·W, 3) uint8: channels 0..2, each min-max normalised."""
    rgb = x[0, :3].float()  # (3, T, H, W)
    lo = rgb.amin(dim=(1, 2, 3), keepdim=True)
    hi = rgb.amax(dim=(1, 2, 3), keepdim=True)
    rgb = (rgb - lo) / (hi - lo).clamp_min(1e-8)
    rgb = rgb.repeat_interleave(upsample, dim=2).repeat_interleave(upsample, dim=3)  # (3, T, uH, uW)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()  # (T, uH, uW, 3)


class ValidationVideo(Callback):
    def __init__(self, cfg: ValVideoConfig, data: DataConfig, run_dir: str, num_train_timesteps: int,
                 text_len: int):
        self.cfg, self.data = cfg, data
        self.out_dir = Path(run_dir) / "val_videos"
        self.num_train_timesteps, self.text_len = num_train_timesteps, text_len
        self.preview = not data.components
        self.height, self.width, self.frames = clip_size(cfg, data)
        self._texts: list[torch.Tensor] | None = None  # [prompt, negative] (or [prompt]) embeddings (L_i, D), CPU
        self._scales = WAN_SCALES  # (time, space) downsampling of the VAE
        self._vae = None  # rank 0 with components: (vae, mean, std), kept on the CPU between clips
        self._step_at_batch_start = -1
        self._warned = False  # the ZeRO-3 "live weights" warning was given

    # ------------------------------------------------------------------------------------------- setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.cfg.every_n_steps or self._texts is not None:
            return
        with preserved_rng(trainer.strategy.root_device):  # loading encoders initialises modules randomly
            if self.preview:
                self._texts = self._synthetic_texts()
                log.info("validation video every %d steps: latent preview (no data.components to decode with)",
                         self.cfg.every_n_steps)
                return
            texts = self._encode(trainer.strategy.root_device) if trainer.is_global_zero else None
            self._texts, self._scales = trainer.strategy.broadcast((texts, self._scales), src=0)

    def _synthetic_texts(self) -> list[torch.Tensor]:
        from fpsa_train.data.synthetic import SyntheticLatents

        context = SyntheticLatents(self.data, "val")[0]["context"].float()  # (L, D)
        return [context, torch.zeros_like(context)] if self.cfg.guidance > 1 else [context]

    def _encode(self, device: torch.device) -> list[torch.Tensor]:
        """Rank 0: the prompt embeddings from data.components' UMT5; keeps only the VAE (on the CPU)."""
        from fpsa_train.encoders import Encoders, negative_prompt

        enc = Encoders(self.data.components, device, self.text_len)
        prompts = [self.cfg.prompt] + ([negative_prompt(None, self.data.components, enc.tokenizer)]
                                       if self.cfg.guidance > 1 else [])
        texts = [t.float().cpu() for t in enc.text(prompts)]
        downsample = list(enc.vae.config.temperal_downsample)
        self._scales = (2 ** sum(downsample), 2 ** len(downsample))
        self._vae = (enc.vae.cpu(), enc.mean.cpu(), enc.std.cpu())
        del enc  # the text encoder (UMT5-XXL is 11 GB in bf16)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("validation video every %d steps: %r, %dx%d, %d frames, %d steps, guidance %.1f",
                 self.cfg.every_n_steps, self.cfg.prompt, self.height, self.width, self.frames, self.cfg.steps,
                 self.cfg.guidance)
        return texts

    # -------------------------------------------------------------------------------------------- hooks

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.cfg.every_n_steps or step == self._step_at_batch_start or step % self.cfg.every_n_steps:
            return  # no optimizer step in this batch (accumulating), or not a video step
        for callback in trainer.callbacks:
            if isinstance(callback, TrainingMonitor):
                callback.pause(pl_module)
        self.render(trainer, pl_module, step)

    # ------------------------------------------------------------------------------------------ sampling

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict | None:
        """Sample on every rank; on global rank 0 write and log the clip and return {mp4, png, seconds}."""
        if self._texts is None:
            self.setup(trainer, pl_module, "fit")
        started = time.perf_counter()
        with self.weights(pl_module) as which:
            latents, regimes = self.sample(pl_module.model, pl_module.schedule, pl_module.device)
        if not trainer.is_global_zero:
            return None
        video, fps = self._to_video(latents, pl_module.device)
        mp4, png, sheet = self._write(video, fps, step)
        seconds = time.perf_counter() - started
        log.info("validation video at step %d%s: %s (%s weights, %.1f s; denoising steps per regime %s)", step,
                 " (latent preview: channels 0-2 of the latents, not decoded)" if self.preview else "", mp4,
                 which, seconds, regimes)
        self._log(trainer, mp4, png, sheet, seconds)
        return {"mp4": str(mp4), "png": str(png), "seconds": seconds}

    @contextmanager
    def weights(self, pl_module: L.LightningModule):
        """The model with the weights that sample (see the module docstring) swapped in; yields "ema" or "live"
        (WEIGHT_CHOICES' words)."""
        ema = getattr(pl_module, "ema", None)
        if self.cfg.weights == "live" or ema is None or ema.shadow is None:
            yield "live"
            return
        if ema.partitioned:
            if not self._warned and pl_module.global_rank == 0:
                log.warning("validation videos sample with the live weights: under ZeRO-3 each rank holds only its "
                            "slice of the EMA (val_video.weights=live silences this)")
                self._warned = True
            yield "live"
            return
        with ema.applied(pl_module.model):
            yield "ema"

    def sample(self, model: torch.nn.Module, schedule, device: torch.device) -> tuple[torch.Tensor, dict]:
        """Latents (1, C, T, H, W) fp32 of the fixed seed and prompt, with the model's current weights; its modes, FP8
        statistics switches and the global RNG are as they were afterwards."""
        from fpsa_train.sampling import Denoiser, denoise_loop

        t_scale, s_scale = self._scales
        shape = (1, model.cfg.in_dim, (self.frames - 1) // t_scale + 1, self.height // s_scale,
                 self.width // s_scale)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.cfg.seed)).to(device)
        live = Denoiser(model, schedule, self.num_train_timesteps)
        texts = [t.to(device) for t in self._texts]
        modes = {m: m.training for m in model.modules()}
        stats = {c: c.collect_stats for c in fps_cores(model) if hasattr(c, "collect_stats")}
        try:
            model.eval()
            for core in stats:
                core.collect_stats = False
            with preserved_rng(device), torch.no_grad():
                return denoise_loop(live, noise, texts, self.cfg.steps, self.cfg.shift, self.cfg.guidance)
        finally:
            for m, training in modes.items():
                m.training = training
            for core, on in stats.items():
                core.collect_stats = on

    def _to_video(self, latents: torch.Tensor, device: torch.device) -> tuple[np.ndarray, float]:
        """(T, H, W, 3) uint8 frames and their frame rate."""
        if self.preview:
            return latent_preview(latents, self._scales[1]), self.cfg.fps / self._scales[0]
        vae, mean, std = self._vae
        vae.to(device)
        try:
            with torch.no_grad():
                pixels = vae.decode(latents * std.to(device) + mean.to(device)).sample  # (1, 3, F, H, W), [-1, 1]
        finally:
            vae.cpu()
        video = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        return video, self.cfg.fps

    def _write(self, video: np.ndarray, fps: float, step: int):
        from fpsa_train.media import contact_sheet, write_mp4

        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"step{step:07d}" + ("_latent_preview" if self.preview else "")
        mp4, png = self.out_dir / f"{stem}.mp4", self.out_dir / f"{stem}.png"
        write_mp4(mp4, video, fps)  # atomic
        sheet = contact_sheet(video, SHEET_FRAMES)
        write_atomic(png, lambda f: sheet.save(f, format="PNG"))
        return mp4, png, sheet

    def _log(self, trainer: L.Trainer, mp4: Path, png: Path, sheet, seconds: float) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = logging_step(trainer)
        prompt = "the caption of validation sample 0" if self.preview else repr(self.cfg.prompt)
        caption = f"{'latent preview, ' if self.preview else ''}{prompt}, seed {self.cfg.seed}"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"val_video/video": wandb.Video(str(mp4), caption=caption, format="mp4"),
                                       "val_video/sheet": wandb.Image(str(png), caption=caption),
                                       "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val_video/sheet", np.asarray(sheet), step, dataformats="HWC")
        log_metrics(trainer, {"val_video/seconds": seconds}, step)
