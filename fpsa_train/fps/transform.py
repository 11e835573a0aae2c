"""`apply_fps_attention(model, schedule)`: put FPS attention into a built Wan DiT (a module swap).

Every block's `self_attn.core` (dense SDPA by default, models/attention.py) is replaced by `FPSAttention`, which
reads each sample's noise level from `attn_kwargs["sigma"]` and runs the sample through the regime that owns it.
A batch whose samples fall into different regimes is split by regime and reassembled in order, so every sample
is computed exactly as it would be alone. Cross-attention stays dense, as in the paper. The model file never
imports this module.

Each core keeps what training logs and optimises: the realised density per regime from its last forward, and the
learned selectors' density regulariser (`aux_loss`). Selectors are per layer (one module per core), with a
per-head bias each.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fpsa_train.fps.masks import LearnedSelector
from fpsa_train.fps.reference import attention_materialized, attention_tiles
from fpsa_train.fps.schedule import Schedule, ScheduleError
from fpsa_train.models.token_order import TokenLayout

log = logging.getLogger(__name__)


class FPSAttention(nn.Module):
    """Self-attention core running the regime that each sample's σ selects (PyTorch reference)."""

    def __init__(self, schedule: Schedule, num_heads: int, layer: int, materialize: bool = False):
        super().__init__()
        self.schedule = schedule
        self.layer = layer
        self.materialize = materialize
        self.selectors = nn.ModuleDict({
            r.name: LearnedSelector(num_heads, r.target_density, r.temperature)
            for r in schedule.regimes if r.pattern == "learned"})
        self.last_density: dict[str, float] = {}
        self.aux_loss: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                sigma: torch.Tensor | float | None = None, **attn_kwargs) -> torch.Tensor:
        # q, k, v: (B, H, L, D), tokens in tile-major order
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
        attend = attention_materialized if self.materialize else attention_tiles
        outputs, order, aux = [], [], []
        self.last_density = {}
        for r in torch.unique(which).tolist():
            regime = self.schedule.regimes[r]
            idx = (which == r).nonzero().flatten()  # the samples in this regime
            out, sel = attend(q[idx], k[idx], v[idx], layout, regime, self.selectors[regime.name]
                              if regime.name in self.selectors else None)
            outputs.append(out)
            order.append(idx)
            self.last_density[regime.name] = float(sel.mask.density().mean())
            if sel.reg_loss is not None:
                aux.append(sel.reg_loss)
        self.aux_loss = torch.stack(aux).sum() if aux else None
        out = torch.cat(outputs) if len(outputs) == 1 else torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return out.to(v.dtype)  # (B, H, L, D)


def apply_fps_attention(model: nn.Module, schedule: Schedule, materialize: bool = False) -> nn.Module:
    """Swap every block's self-attention core for FPS attention (in place; returns the model)."""
    cfg = model.cfg
    if cfg.token_order != "tile":
        raise ScheduleError(f"FPS attention needs tile-major tokens: model.token_order={cfg.token_order!r}, "
                            "set model.token_order=tile")
    for regime in schedule.regimes:
        if regime.quant is not None:
            regime.quant.group_shape(tuple(cfg.tile_shape))  # raises naming the axis if it does not fit the tile
    for i, block in enumerate(model.blocks):
        block.self_attn.core = FPSAttention(schedule, cfg.num_heads, i, materialize)
    log.info("FPS attention (PyTorch reference%s) in %d blocks:\n  %s", ", materialised" if materialize else "",
             len(model.blocks), "\n  ".join(r.describe() for r in schedule.regimes))
    return model


def fps_cores(model: nn.Module) -> list[FPSAttention]:
    return [m for m in model.modules() if isinstance(m, FPSAttention)]


def selector_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the learned selectors' density regularisers from the last forward (None when there are none)."""
    losses = [c.aux_loss for c in fps_cores(model) if c.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def realised_density(model: nn.Module) -> dict[str, float]:
    """Mean realised density per regime over the layers, from the last forward."""
    per_regime: dict[str, list[float]] = {}
    for core in fps_cores(model):
        for name, d in core.last_density.items():
            per_regime.setdefault(name, []).append(d)
    return {name: sum(ds) / len(ds) for name, ds in per_regime.items()}
