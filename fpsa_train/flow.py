"""Rectified-flow (flow-matching) objective of Wan2.1 (reference/wan.md §4).

σ = 1 is pure noise: x_σ = (1−σ)·x0 + σ·ε, the model predicts the velocity ε − x0 at timestep 1000·σ, and the
loss is the MSE to it. σ is drawn per sample, logit-normal (the Wan team's choice) or uniform, then shifted by
σ' = s·σ / (1 + (s−1)·σ), which moves mass to high noise for large latents.
"""

from __future__ import annotations

import torch

from fpsa_train.config import ObjectiveConfig


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
