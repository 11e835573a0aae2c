"""`TrainingMonitor`: throughput, GPU memory, DeepSpeed's grad norm and per-layer FPS statistics, logged on the
trainer's logging steps (every `log_every_n_steps` optimizer steps, the steps Lightning writes `self.log` values).

Keys, written directly to every logger at the step Lightning uses for the same batch (`loggers.logging_step`),
so in metrics.csv they are rows of their own beside the `train/loss` row of that step. Not through `self.log`:
its values linger into later rows, and a regime absent from a step would show its old density there.

    train/step_time_s            wall seconds per optimizer step (all micro-batches), mean since the last log
    train/samples_per_s          samples per second, all ranks
    train/tokens_per_s           latent tokens per second, all ranks
    train/tokens_per_s_per_gpu   latent tokens per second per GPU (a sample's tokens are split over sp_size GPUs)
    gpu/mem_allocated_gib        CUDA only: memory held by tensors now (GiB)
    gpu/mem_max_allocated_gib    CUDA only: peak since the previous log (the peak is reset after each log)
    gpu/mem_reserved_gib         CUDA only: memory held by the caching allocator
    train/grad_norm              DeepSpeed only: the engine's global gradient norm of the last step (elsewhere
                                 the LightningModule logs it from the gradients themselves)
    density/<regime>             realised density of each regime (fraction of tile pairs computed), mean over
                                 layers, ranks and the step's micro-batches (the LightningModule's
                                 `train/density/<regime>` is rank 0's last micro-batch)
    fp8/saturated, fp8/underflow fraction of FP8 values that saturated / underflowed, mean over layers (when the
                                 attention cores report them: FPSAttention.collect_stats)
    density/<regime>/layer<NN>   per_layer: realised density of each regime in block NN
    fp8/saturated/layer<NN>      per_layer: FP8 statistics of block NN
    fp8/underflow/layer<NN>

Tokens of a sample are its latent tokens after patchify, (F/pt)(H/ph)(W/pw). Step time is wall time between
optimizer steps, measured over the whole logging interval (CUDA is synchronised only at its ends, so the queue
of asynchronous kernels never skews it) and divided by the optimizer steps in it; time outside training (validation,
checkpoint writes, validation videos: anything from `pause()` to the next training batch) is left out. Counts
and per-layer statistics are summed over all ranks with one all-reduce per logging step, so they cover every rank
(under sequence parallelism each rank's cores see its share of the heads). Memory is the logging rank's.

FP8 statistics cost extra reductions in every attention call, so `collect_stats` is switched on in the FPS cores
only for the micro-batches of logging steps and off again afterwards. Statistics are read right after each
forward (`on_before_backward`), before any other callback can run the model again.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from fpsa_train.fps.transform import fps_cores
from fpsa_train.lit.loggers import log_metrics, logging_step

GIB = 2**30
FP8_STATS = ("saturated", "underflow")


def latent_tokens(latents_shape, patch_size) -> int:
    """Tokens per sample of latents (B, C, F, H, W) after patchify with patch_size (pt, ph, pw)."""
    _, _, f, h, w = latents_shape
    pt, ph, pw = patch_size
    return (f // pt) * (h // ph) * (w // pw)


class TrainingMonitor(Callback):
    clock = staticmethod(time.perf_counter)
    """Wall-clock source in seconds (an instance attribute may replace it, e.g. a test's fake clock)."""

    def __init__(self, log_every_n_steps: int, sp_size: int = 1, per_layer: bool = True):
        if log_every_n_steps < 1 or sp_size < 1:
            raise ValueError(f"TrainingMonitor: log_every_n_steps={log_every_n_steps} and sp_size={sp_size} "
                             "must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.sp_size = sp_size
        self.per_layer = per_layer
        self._interval_start: float | None = None  # synchronised time the current interval began
        self._interval_step = 0  # global step at that time
        self._paused_at: float | None = None  # synchronised time of a pause not yet ended
        self._paused = 0.0  # paused seconds in the current interval
        self._tokens = self._samples = 0.0  # this rank's share, since the interval began
        self._collecting = False
        self._stats: dict[tuple[str, int, str], list[float]] = {}  # (kind, layer, name) → [sum, count]
        self._keys: list[tuple[str, int, str]] | None = None  # the same order on every rank

    # ------------------------------------------------------------------------------------------- timing

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return self.clock()

    def pause(self, pl_module: L.LightningModule) -> None:
        """Leave the time from now until the next training batch out of the step time."""
        if self._interval_start is not None and self._paused_at is None:
            self._paused_at = self._now(pl_module)

    def _resume(self, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:
            self._paused += self._now(pl_module) - self._paused_at
            self._paused_at = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pause(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.pause(pl_module)

    def _is_logging_step(self, step: int) -> bool:
        return step % self.log_every_n_steps == 0

    # -------------------------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.log_every_n_steps != self.log_every_n_steps:
            raise ValueError(f"TrainingMonitor(log_every_n_steps={self.log_every_n_steps}) differs from the "
                             f"Trainer's log_every_n_steps={trainer.log_every_n_steps}: build both from "
                             "trainer.log_every_n_steps")
        self._interval_start, self._paused_at, self._paused = None, None, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._interval_start is None:  # the first batch of this fit
            self._interval_start, self._interval_step = self._now(pl_module), trainer.global_step
            self._tokens = self._samples = 0.0
        self._resume(pl_module)
        shape = batch["latents"].shape  # (B, C, F, H, W): metadata only, no device sync
        self._samples += shape[0] / self.sp_size
        self._tokens += shape[0] * latent_tokens(shape, pl_module.model.cfg.patch_size) / self.sp_size
        if self._is_logging_step(trainer.global_step + 1) and not self._collecting:  # the step this batch is part of
            self._collecting = True
            self._stats = {}
            self._set_collect_stats(pl_module, True)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self._collecting:
            return
        for core in fps_cores(pl_module.model):
            for regime, density in core.last_density.items():
                self._add(("density", core.layer, regime), density)
            for name in FP8_STATS:
                value = (getattr(core, "last_fp8_stats", None) or {}).get(name)
                if value is not None:
                    self._add(("fp8", core.layer, name), value)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._interval_step or not self._is_logging_step(step):
            return  # still accumulating, or an optimizer step that is not logged
        self._resume(pl_module)  # a pause from a callback that ran before this one at this batch
        now = self._now(pl_module)
        seconds = max(now - self._interval_start - self._paused, 1e-9)
        steps = step - self._interval_step
        totals = self._all_reduce(trainer, pl_module)
        tokens, samples = totals.pop("tokens"), totals.pop("samples")
        metrics = {"train/step_time_s": seconds / steps, "train/samples_per_s": samples / seconds,
                   "train/tokens_per_s": tokens / seconds,
                   "train/tokens_per_s_per_gpu": tokens / seconds / trainer.world_size}
        metrics.update(self._memory(pl_module))
        metrics.update(self._grad_norm(trainer))
        metrics.update(totals)
        log_metrics(trainer, metrics, logging_step(trainer))

        self._set_collect_stats(pl_module, False)
        self._collecting = False
        self._interval_start, self._interval_step, self._paused = self._now(pl_module), step, 0.0
        self._tokens = self._samples = 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_collect_stats(pl_module, False)
        self._collecting = False

    # ------------------------------------------------------------------------------------------ metrics

    def _set_collect_stats(self, pl_module: L.LightningModule, on: bool) -> None:
        for core in fps_cores(pl_module.model):
            if hasattr(core, "collect_stats"):  # FPSAttention without it reports no FP8 statistics
                core.collect_stats = on

    def _add(self, key: tuple[str, int, str], value: float) -> None:
        acc = self._stats.setdefault(key, [0.0, 0.0])
        acc[0] += float(value)
        acc[1] += 1.0

    def _stat_keys(self, pl_module: L.LightningModule) -> list[tuple[str, int, str]]:
        """Every statistic any rank may report, in one order (a regime may be absent from one rank's batch)."""
        if self._keys is None:
            keys = []
            for core in sorted(fps_cores(pl_module.model), key=lambda c: c.layer):
                keys += [("density", core.layer, r.name) for r in core.schedule.regimes]
                keys += [("fp8", core.layer, name) for name in FP8_STATS]
            self._keys = keys
        return self._keys

    def _all_reduce(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Tokens and samples summed over ranks, and the statistics' means over ranks and micro-batches."""
        keys = self._stat_keys(pl_module)
        values = [self._tokens, self._samples]
        for key in keys:
            values += self._stats.get(key, [0.0, 0.0])
        # float64: token counts of long runs stay exact
        vec = torch.tensor(values, dtype=torch.float64, device=pl_module.device)  # (2 + 2·len(keys),)
        if trainer.world_size > 1:
            vec = trainer.strategy.reduce(vec, reduce_op="sum")
        vec = vec.cpu().tolist()
        out = {"tokens": vec[0], "samples": vec[1]}
        per_layer: dict[tuple[str, int, str], float] = {}
        for i, key in enumerate(keys):
            total, count = vec[2 + 2 * i], vec[3 + 2 * i]
            if count > 0:
                per_layer[key] = total / count
        over_layers: dict[str, list[float]] = {}
        for (kind, layer, name), value in per_layer.items():
            over_layers.setdefault(f"{kind}/{name}", []).append(value)
            if self.per_layer:
                out[f"{kind}/{name}/layer{layer:02d}"] = value
        out.update({key: sum(values) / len(values) for key, values in over_layers.items()})
        return out

    @staticmethod
    def _memory(pl_module: L.LightningModule) -> dict[str, float]:
        device = pl_module.device
        if device.type != "cuda":
            return {}
        out = {"gpu/mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
               "gpu/mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
               "gpu/mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return out

    @staticmethod
    def _grad_norm(trainer: L.Trainer) -> dict[str, float]:
        """DeepSpeed keeps gradients in its own buffers; its engine knows the global norm of the step just taken."""
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None:
            return {}
        norm = engine.get_global_grad_norm()
        if norm is None:
            return {}
        return {"train/grad_norm": float(norm)}
