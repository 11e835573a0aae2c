"""Rectified-flow (flow-matching) objective of Wan2.1 (reference/wan.md §4).

σ = 1 is pure noise: x_σ = (1−σ)·x0 + σ·ε, the model predicts the velocity ε − x0 at timestep 1000·σ, and the
loss is the MSE to it. σ is drawn per sample, logit-normal (the Wan team's choice) or uniform, then shifted by
σ' = s·σ / (1 + (s−1)·σ), which moves mass to high noise for large latents.

`ObjectiveConfig` (`objective.*` in the training config) lives here, with the math it configures, so the library
code that trains (lit/module.py) never imports the training schema (fpsa_train/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpsa_train.errors import ConfigError

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
TEACHERS = ("none", "dense")


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
    model as loaded from model.weights, with dense attention, predicts the velocity for the same noisy input, and
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


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_sigmas(steps: int = 50, shift: float = 5.0) -> list[float]:
    """σ of each step of Wan's sampler (flow UniPC): t from 1 towards 0 in `steps` equal steps, shifted as above.
    With Wan's 50 steps and shift 5, 36% of the steps have σ ≥ 0.9 and 10% have σ < 0.4."""
    return [float(shift_sigma(torch.tensor(1.0 - i / steps), shift)) for i in range(steps)]


def sample_sigma(n: int, cfg: ObjectiveConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """n noise levels in (0, 1) (fp32), drawn as `cfg.timestep_sampling` says, then shifted."""
    if cfg.timestep_sampling == "logit_normal":
        z = torch.randn(n, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        sigma = torch.sigmoid(z)
    else:
        sigma = torch.rand(n, generator=generator, device=device)
    return shift_sigma(sigma, cfg.shift)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, velocity target) for latents x0 (B, C, F, H, W) and per-sample σ (B,)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, noise - x0
