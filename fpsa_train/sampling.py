"""Wan's sampler as a library: flow UniPC with classifier-free guidance over a model and its FPS schedule.

`denoise_loop` turns noise into latents with any *denoiser*: an object with `denoise(x, σ, context, timestep)`
(the velocity), `schedule` (the FPS `Schedule`, or None for dense attention), `num_train_timesteps` and, when a
trace is asked for, `realised_density()`. `Denoiser` is that object for a model and a schedule as they are (the
training run's live model, for validation videos); `deploy.Deployed` is it for a loaded deploy folder, and both
run the model through `velocity`, so a validation clip and `python -m fpsa_train.sample` sample one way.

Why here and not in sample.py: lit/ (validation videos) must not import a CLI, and before this module it built a
stand-in `Deployed` to reach the loop.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm


def flow_unipc(steps: int, shift: float, num_train_timesteps: int, device: torch.device):
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
                                        lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def velocity(model: torch.nn.Module, schedule, x: torch.Tensor, sigma: torch.Tensor | float, context,
             timestep: torch.Tensor | float | None = None, num_train_timesteps: int = 1000,
             compiled: bool = False) -> torch.Tensor:
    """The velocity (fp32) for latents x (B, C, F, H, W) at noise level σ (scalar or (B,)); the regime of each
    sample is the one of `schedule` (None: dense attention) that owns its σ. The model's timestep is `timestep`
    when given (a sampler's, which may be rounded to an integer as Wan's are), else num_train_timesteps·σ. bf16
    autocast on CUDA, fp32 on CPU. The regime is chosen here, once per call, from σ on the host (a float costs no
    device read), and handed to every layer by name, so no layer reads σ: no sync per layer, no graph break per
    layer when `compiled` (the model runs under torch.compile)."""
    from fpsa_train.fps.transform import batch_regime

    regime = None if schedule is None else batch_regime(schedule, sigma)  # None: mixed, or dense SDPA
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    sigma = sigma.repeat(x.shape[0]) if sigma.numel() == 1 else sigma  # (B,)
    t = sigma * num_train_timesteps if timestep is None else \
        torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    kwargs = {"sigma": sigma, "regime": regime} if schedule is not None else {}
    stance = nullcontext()
    if compiled and schedule is not None and regime is None:
        stance = torch.compiler.set_stance("force_eager")  # mixed regimes: split by σ in every block, eagerly
    with stance, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x, t, context, attn_kwargs=kwargs).float()


def mean_realised_density(model: torch.nn.Module, schedule) -> float:
    """Fraction of (query tile, key tile) pairs the last forward's self-attention computed, mean over layers
    (and over the regimes of the batch); 1.0 when attention is dense SDPA (`schedule` None)."""
    from fpsa_train.fps.transform import realised_density

    per_regime = realised_density(model) if schedule is not None else {}
    return sum(per_regime.values()) / len(per_regime) if per_regime else 1.0


@dataclass
class Denoiser:
    """A model and its FPS schedule as `denoise_loop` drives them (no deploy folder needed)."""

    model: torch.nn.Module
    schedule: object | None
    """The FPS `Schedule` the model's attention runs (None: dense attention)."""
    num_train_timesteps: int = 1000
    """The model's timestep is num_train_timesteps·σ (when the sampler gives none)."""
    compiled: bool = False
    """Whether the model runs under torch.compile (`velocity`)."""

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, context,
                timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """`velocity` of this model and schedule."""
        return velocity(self.model, self.schedule, x, sigma, context, timestep, self.num_train_timesteps,
                        self.compiled)

    def realised_density(self) -> float:
        """`mean_realised_density` of the last forward."""
        return mean_realised_density(self.model, self.schedule)


def denoise_loop(denoiser, x: torch.Tensor, texts: list, steps: int, shift: float, guidance: float,
                 trace: list | None = None, leave: bool = True):
    """Noise x (N, C, T, H, W) → latents, by flow UniPC with guidance; `texts` = the N prompts' embeddings, then
    (guidance) the N negative ones: [prompt] or [prompt, negative] for one video. One model call per step for all.
    Returns (latents, steps per regime). `denoiser.denoise(x, σ, context, timestep)` gives the velocity (a
    `Denoiser`, a `deploy.Deployed`, or any object with its attributes; see the module docstring).

    With a `trace` list, one record per step is appended: {step, sigma, timestep, regime, density, seconds}, where
    density is the fraction of tile pairs the step's attention computed (`denoiser.realised_density()`) and seconds
    its wall time (the device synchronised, so a CUDA step is not under-counted). `leave`: keep the progress bar."""
    n, branches = x.shape[0], len(texts) // x.shape[0]
    if branches not in (1, 2) or len(texts) != n * branches:
        raise ValueError(f"denoise_loop: {len(texts)} text embeddings for {n} videos (expected {n} or {2 * n})")
    scheduler = flow_unipc(steps, shift, denoiser.num_train_timesteps, x.device)
    regimes: Counter = Counter()
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", unit="step", leave=leave)):
        started = time.perf_counter()
        sigma = float(scheduler.sigmas[i])
        regime = denoiser.schedule.regime_for(sigma).name if denoiser.schedule is not None else None
        if regime is not None:
            regimes[regime] += 1
        v = denoiser.denoise(x.repeat(branches, 1, 1, 1, 1), sigma, texts, timestep=t)  # (n·branches, C, T, H, W)
        if branches == 2:
            v = v[n:] + guidance * (v[:n] - v[n:])  # v_neg + g·(v_pos − v_neg)
        x = scheduler.step(v, t, x).prev_sample
        if trace is not None:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            trace.append({"step": i, "sigma": sigma, "timestep": int(t), "regime": regime,
                          "density": denoiser.realised_density(), "seconds": time.perf_counter() - started})
    return x, dict(regimes)
