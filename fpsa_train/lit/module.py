"""The LightningModule that trains a Wan DiT with the rectified-flow objective (fpsa_train/flow.py).

Training draws σ and the noise per sample from a generator seeded by (seed, data-parallel rank, step,
micro-batch), not from the global RNG: a run resumed from a checkpoint draws exactly what the uninterrupted run
would have drawn, the ranks of a data-parallel job draw different noise, and the ranks of one
sequence-parallel group (which share a sample) draw the same. Validation uses a fixed σ grid and fixed noise per
batch (seeded by the batch index), so `val/loss` is a deterministic measure that can be compared before and after
training and across runs.

The optimiser is AdamW with linear warmup (DeepSpeed's CPU Adam when ZeRO offloads the optimizer on GPUs);
gradient clipping is the Trainer's; the EMA of the weights is updated after every optimizer step and saved in
checkpoints, together with `run_config` (the architecture, token order, schedule and data shape of the run; plain
data) so that `python -m fpsa_train.export` needs nothing but the checkpoint.

With a teacher (`objective.teacher=dense`), the training target is a frozen dense copy of the starting weights'
prediction for the same noisy input (self-distillation; ObjectiveConfig says when it helps). The teacher is held
outside the module's registered children, so it is neither trained, nor saved in checkpoints (it is rebuilt from
model.weights on resume), nor seen by DDP.

Sequence parallelism (`sp_size` > 1) is applied in `setup`, once the process group exists: the ranks of a group
split each sample's tokens, every one of them computes the same loss on the gathered output, and each holds the
gradient of its own tokens only; the loss is multiplied by `sp_size` before the backward so that the strategy's
average over all ranks (DDP or ZeRO) is the exact data-parallel gradient.
"""

from __future__ import annotations

import contextlib

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from torch import nn

from fpsa_train.flow import ObjectiveConfig, noisy_input, sample_sigma
from fpsa_train.fps.schedule import Schedule
from fpsa_train.fps.transform import fps_cores, realised_density, selector_loss
from fpsa_train.lit.config import OptimConfig
from fpsa_train.lit.ema import EMA
from fpsa_train.lit.training_checkpoint import EMA_KEY, EMA_PARTITIONED_KEY, RUN_CONFIG_KEY
from fpsa_train.sequence_parallel import apply_sequence_parallel, dp_coordinates, init_sp_groups


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class FlowMatchingModule(L.LightningModule):
    def __init__(self, model: nn.Module, objective: ObjectiveConfig, optim: OptimConfig,
                 schedule: Schedule | None = None, selector_reg_weight: float = 0.0, run_config: dict | None = None,
                 seed: int = 0, sp_size: int = 1, cpu_adam: bool = False, teacher: nn.Module | None = None):
        super().__init__()
        self._teacher = (teacher.requires_grad_(False).eval(),) if teacher is not None else ()  # a tuple: unregistered
        self.run_config = run_config
        self.model = model
        self.objective = objective
        self.optim = optim
        self.schedule = schedule
        self.selector_reg_weight = selector_reg_weight
        self.seed = seed
        self.sp_size = sp_size
        self.cpu_adam = cpu_adam
        self.ema = EMA(optim.ema_decay, optim.ema_warmup) if optim.ema_decay > 0 else None

    def setup(self, stage: str) -> None:
        if self.sp_size > 1 and not getattr(self.model, "sequence_parallel", None):

            apply_sequence_parallel(self.model, init_sp_groups(self.sp_size))

    def _generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        """The σ/noise generator of this micro-batch (see the module docstring)."""
        accumulate = self.trainer.accumulate_grad_batches
        dp_rank, _, _ = dp_coordinates(self.trainer.global_rank, self.trainer.world_size, self.sp_size)
        seed = step_seed(self.seed, dp_rank, self.trainer.global_step, batch_idx % accumulate)
        return torch.Generator(device=device).manual_seed(seed)

    def per_sample_loss(self, batch: dict, sigma: torch.Tensor, noise: torch.Tensor,
                        distill: bool = False) -> torch.Tensor:
        """MSE to the velocity target, one value per sample (B,); σ also picks each sample's FPS regime. With
        `distill` and a teacher, the target mixes in the teacher's prediction (objective.distill_weight)."""
        x0 = batch["latents"].float()  # (B, C, F, H, W)
        x_sigma, target = noisy_input(x0, noise, sigma)
        timestep = sigma * self.objective.num_train_timesteps
        teacher = self._teacher[0] if distill and self._teacher else None
        with self._low_precision(x0.device):
            pred = self.model(x_sigma, timestep, batch["context"], attn_kwargs={"sigma": sigma}).float()
            if teacher is not None:
                with torch.no_grad():
                    taught = teacher(x_sigma, timestep, batch["context"]).float()
        losses = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
        if teacher is None:
            return losses
        w = self.objective.distill_weight
        return w * F.mse_loss(pred, taught, reduction="none").flatten(1).mean(1) + (1 - w) * losses

    def _low_precision(self, device: torch.device):
        """Autocast to the parameters' dtype when they are bf16/fp16 and nothing autocasts yet: DeepSpeed keeps
        bf16 parameters and feeds them without autocast, while the model computes its fp32 parts (models/wan.py) in fp32
        and expects autocast for the rest (as Lightning's bf16-mixed gives under DDP)."""
        dtype = next(self.model.parameters()).dtype  # a ZeRO-3 partitioned parameter keeps its dtype
        if dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _log_losses(self, stage: str, losses: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        loss = losses.mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(losses))
        if self.schedule is not None:  # the loss of each regime's samples, and each regime's realised density
            which = self.schedule.regime_index(sigma)
            for i, regime in enumerate(self.schedule.regimes):
                picked = which == i
                if picked.any():
                    self.log(f"{stage}/loss/{regime.name}", losses[picked].mean(), batch_size=int(picked.sum()))
            for name, density in realised_density(self.model).items():
                self.log(f"{stage}/density/{name}", density, batch_size=len(losses))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]
        g = self._generator(batch_idx, x0.device)
        sigma = sample_sigma(x0.shape[0], self.objective, device=x0.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32)
        loss = self._log_losses("train", self.per_sample_loss(batch, sigma, noise, distill=True), sigma)
        reg = selector_loss(self.model)
        if reg is not None and self.selector_reg_weight > 0:
            self.log("train/selector_reg", reg, batch_size=x0.shape[0])
            loss = loss + self.selector_reg_weight * reg
        # Selectors of regimes that no sample of this batch visited took no part in the forward; a zero-valued
        # term keeps every parameter in the graph, which DDP requires (else: "parameters that were not used").
        # ZeRO-3's partitioned parameters are empty here, and DeepSpeed does not need it.
        idle = [p.sum() for core in fps_cores(self.model) for p in core.selectors.parameters()
                if p.requires_grad and not hasattr(p, "ds_tensor")]
        if idle:
            loss = loss + 0.0 * torch.stack(idle).sum()
        return loss * self.sp_size

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]
        g = torch.Generator().manual_seed(10_000 + batch_idx)
        sigma = torch.rand(x0.shape[0], generator=g).to(x0.device)  # uniform grid of σ, fixed per batch
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        return self._log_losses("val", self.per_sample_loss(batch, sigma, noise), sigma)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)  # empty under DeepSpeed, which keeps gradients in its own buffers
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The EMA follows every optimizer step here, before any callback's on_train_batch_end: a checkpoint
        # written there (StepCheckpoint) must already hold this step's average, or a resumed run misses one update.
        if self.ema is not None:  # step: this update's 0-based index (global_step counts completed steps)
            self.ema.update(self.model, self.trainer.global_step)

    def on_fit_start(self) -> None:
        if self._teacher:  # beside the model, in the dtype the strategy gave the model
            self._teacher[0].to(device=self.device, dtype=next(self.model.parameters()).dtype)
        if self.ema is not None:  # after the strategy placed (and under ZeRO-3 partitioned) the parameters
            self.ema.attach(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint[RUN_CONFIG_KEY] = self.run_config
        if self.ema is not None and self.ema.shadow is not None:
            checkpoint[EMA_KEY] = self.ema.state_dict()
            checkpoint[EMA_PARTITIONED_KEY] = self.ema.partitioned

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            if EMA_KEY not in checkpoint:
                raise KeyError("checkpoint has no `ema` state but optim.ema_decay > 0; resume with optim.ema_decay=0 "
                               "or from a checkpoint written with EMA")
            self.ema.load_state_dict(checkpoint[EMA_KEY])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        hyper = dict(lr=self.optim.lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay,
                     eps=self.optim.eps)
        if self.cpu_adam:  # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
        else:
            opt = torch.optim.AdamW(params, **hyper)
        warmup = max(1, self.optim.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
