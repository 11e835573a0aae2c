"""`apply_fps_attention(model, schedule)`: put FPS attention into a built Wan DiT (a module swap).

Every block's `self_attn.core` (dense SDPA by default, models/attention.py) is replaced by `FPSAttention`, which
reads each sample's noise level from `attn_kwargs["sigma"]` and runs the sample through the regime that owns it:
in the Hopper FP8 kernels (fpsa_kernels: forward, and the Triton backward when training) on H100/H200, in the
PyTorch reference otherwise (`backend`, logged once per choice).
A batch whose samples fall into different regimes is split by regime and reassembled in order, so every sample
is computed exactly as it would be alone. Cross-attention stays dense, as in the paper. The model file never
imports this module.

Each core keeps what training logs and optimises: the realised density per regime from its last forward, the
learned selectors' density regulariser (`aux_loss`), and with `collect_stats` on, the FP8 range statistics of its
Q, K and V (`last_fp8_stats`, fps/fp8.py `e4m3_range_stats`). Selectors are per layer (one module per core), with
a per-head bias each. Under sequence parallelism (fpsa_train/sequence_parallel.py) a core sees only a range of
the heads, passed as `heads=slice(...)`; the selectors use those heads' bias entries, and all three statistics
are over those heads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fpsa_train.fps.fp8 import RangeStats, qkv_range_stats
from fpsa_train.fps.masks import LearnedSelector
from fpsa_train.fps.reference import attention_materialized, attention_tiles, select_tiles
from fpsa_train.fps.schedule import BACKENDS, Schedule, ScheduleError
from fpsa_train.models.token_order import TokenLayout

log = logging.getLogger(__name__)


_announced: set[str] = set()


def _announce(message: str) -> None:
    """Log which implementation runs, once per distinct message (not once per layer and step)."""
    if message not in _announced:
        _announced.add(message)
        log.info(message)


def kernel_unavailable(q: torch.Tensor) -> str | None:
    """Why the FP8 kernel cannot run on q's device (None when it can)."""
    try:
        from fpsa_kernels import unsupported_reason
    except ImportError as err:  # no triton on this platform
        return f"fpsa_kernels cannot be imported ({err})"
    return unsupported_reason(q)


def kernel_fits(head_dim: int, regime) -> bool:
    """Whether the kernel implements this regime at this head dim (FP8 regimes only; its head dims)."""
    try:
        from fpsa_kernels.attention import HEAD_DIMS
    except ImportError:
        return False
    return regime.quantized and head_dim in HEAD_DIMS


def reference_reason(device: torch.device, head_dim: int, regime, backend: str = "auto",
                     materialize: bool = False) -> str | None:
    """Why FPS attention runs `regime` in the PyTorch reference on `device` (None: the kernel runs it).

    The one decision behind both FPSAttention's choice per call and what the deploy runtime reports. Raises
    ScheduleError for backend=kernel on a device where the kernel cannot run."""
    if backend == "reference" or materialize:
        return f"fps.backend={backend}" if backend == "reference" else "materialize=true"
    if not kernel_fits(head_dim, regime):
        return f"the kernel needs FP8 quantization and its head dims; head_dim is {head_dim}"
    reason = kernel_unavailable(torch.empty(0, device=device))
    if backend == "auto" and (reason is not None or device.type != "cuda"):
        return reason or "no CUDA device"
    if reason is not None:
        raise ScheduleError(f"fps.backend=kernel but {reason}; use fps.backend=auto to fall back to the reference")
    return None


class FPSAttention(nn.Module):
    """Self-attention core running the regime that each sample's σ selects (kernel or PyTorch reference)."""

    def __init__(self, schedule: Schedule, num_heads: int, layer: int, materialize: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ScheduleError(f"fps.backend={backend!r}: expected one of {BACKENDS}")
        self.schedule = schedule
        self.layer = layer
        self.materialize = materialize
        self.backend = backend
        self.last_backend: str | None = None  # "kernel" or "reference": what the last forward ran
        self.selectors = nn.ModuleDict({
            r.name: LearnedSelector(num_heads, r.target_density, r.temperature)
            for r in schedule.regimes if r.pattern == "learned"})
        self.last_density: dict[str, float] = {}
        self.aux_loss: torch.Tensor | None = None
        self.collect_stats = False  # record last_fp8_stats on every forward (costs a pass over Q, K, V)
        self.last_fp8_stats: dict[str, float] = {}  # {"saturated", "underflow"} rates; {} when nothing quantized

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                sigma: torch.Tensor | float | None = None, heads: slice | None = None,
                **attn_kwargs) -> torch.Tensor:
        # q, k, v: (B, H, L, D), tokens in tile-major order; H = all heads, or the range `heads` of them
        if sigma is None:
            raise ValueError("FPS attention picks its regime from the noise level: call the model with "
                             "attn_kwargs={'sigma': σ} (a float or one value per sample)")
        b = q.shape[0]
        sigma = torch.as_tensor(sigma, device=q.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        elif sigma.numel() != b:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {b}")
        which = self.schedule.regime_index(sigma)  # (B,)
        outputs, order, aux, stats = [], [], [], []
        self.last_density = {}
        for r in torch.unique(which).tolist():
            regime = self.schedule.regimes[r]
            idx = (which == r).nonzero().flatten()  # the samples in this regime
            selector = self.selectors[regime.name] if regime.name in self.selectors else None
            out, sel = self._attend(q[idx], k[idx], v[idx], layout, regime, selector, heads)
            outputs.append(out)
            order.append(idx)
            self.last_density[regime.name] = float(sel.mask.density().mean())
            if sel.reg_loss is not None:
                aux.append(sel.reg_loss)
            if self.collect_stats and regime.quantized:
                stats.append(qkv_range_stats(q[idx], k[idx], v[idx], layout, regime.quant))
        self.aux_loss = torch.stack(aux).sum() if aux else None
        self.last_fp8_stats = sum(stats, RangeStats(0, 0, 0, 0)).rates() if stats else {}
        out = torch.cat(outputs) if len(outputs) == 1 else torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return out.to(v.dtype)  # (B, H, L, D)

    def _use_kernel(self, q: torch.Tensor, regime) -> bool:
        reason = reference_reason(q.device, q.shape[-1], regime, self.backend, self.materialize)
        if reason is not None and self.backend != "reference" and not self.materialize:
            _announce(f"FPS attention: reference for regime {regime.name!r} ({reason})")
        return reason is None

    def _attend(self, q, k, v, layout: TokenLayout, regime, selector, heads: slice | None):
        if not self._use_kernel(q, regime):
            self.last_backend = "reference"
            attend = attention_materialized if self.materialize else attention_tiles
            return attend(q, k, v, layout, regime, selector, heads=heads)
        self.last_backend = "kernel"
        from fpsa_kernels import fps_attention

        training = torch.is_grad_enabled() and q.requires_grad
        _announce(f"FPS attention: Hopper FP8 Triton kernel (fpsa_kernels) on {q.device}, "
                  f"{'forward and backward (training)' if training else 'forward'}")
        sel = select_tiles(q, k, layout, regime, selector, heads)  # also for density logging
        static = regime.pattern in ("dense", "window")  # the kernel reuses its cached plan for these
        out, _ = fps_attention(q, k, v, layout, regime, None if static else sel.mask, sel.gate)
        return out, sel


def apply_fps_attention(model: nn.Module, schedule: Schedule, materialize: bool = False,
                        backend: str = "auto") -> nn.Module:
    """Swap every block's self-attention core for FPS attention (in place; returns the model)."""
    cfg = model.cfg
    if cfg.token_order != "tile":
        raise ScheduleError(f"FPS attention needs tile-major tokens: model.token_order={cfg.token_order!r}, "
                            "set model.token_order=tile")
    for regime in schedule.regimes:
        if regime.quant is not None:
            regime.quant.group_shape(tuple(cfg.tile_shape))  # raises naming the axis if it does not fit the tile
    for i, block in enumerate(model.blocks):
        core = FPSAttention(schedule, cfg.num_heads, i, materialize, backend)
        device = next(block.parameters()).device  # learned selectors live where their block does
        block.self_attn.core = core if device.type == "meta" else core.to(device)
    log.info("FPS attention (backend %s%s) in %d blocks:\n  %s", backend, ", materialised" if materialize else "",
             len(model.blocks), "\n  ".join(r.describe() for r in schedule.regimes))
    return model


def fps_cores(model: nn.Module) -> list[FPSAttention]:
    return [m for m in model.modules() if isinstance(m, FPSAttention)]


def selector_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the learned selectors' density regularisers from the last forward (None when there are none)."""
    losses = [c.aux_loss for c in fps_cores(model) if c.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def fp8_stats(model: nn.Module) -> dict[int, dict[str, float]]:
    """Per layer, the FP8 range statistics of the last forward (layers whose cores collect them and quantized)."""
    return {core.layer: core.last_fp8_stats for core in fps_cores(model) if core.last_fp8_stats}


def realised_density(model: nn.Module) -> dict[str, float]:
    """Mean realised density per regime over the layers, from the last forward."""
    per_regime: dict[str, list[float]] = {}
    for core in fps_cores(model):
        for name, d in core.last_density.items():
            per_regime.setdefault(name, []).append(d)
    return {name: sum(ds) / len(ds) for name, ds in per_regime.items()}
