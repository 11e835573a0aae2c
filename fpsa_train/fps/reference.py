"""FPS attention, the PyTorch reference: the specification every kernel is tested against (DESIGN.md).

For one regime, on q, k, v (B, H, L, D) whose tokens are in tile-major order:
1. Q, K → e4m3 with one scale per quantization group, V → e4m3 per head-dim channel (fps/fp8.py);
2. query tile u attends the key tiles of the regime's mask M(u) only (fps/masks.py);
3. S = Q̂ K̂ᵀ / √D in fp32; P = exp(S − rowmax) over the kept keys; ℓ = Σ P (fp32, unquantized);
4. P̂ = e4m3(P·448)/448; O = P̂ V̂ / ℓ, returned in fp32 (the kernels write bf16).
Quantization (regime.quant = None) and masking (pattern dense) can each be off, for ablations.

The row max and ℓ are those of the exact softmax over the kept keys; a kernel's online softmax quantizes P against
a running max instead, which is its own rounding: kernel tests derive their tolerance from that difference.

Two evaluations of the same definition: `attention_tiles` loops over query tiles and computes only the kept
tile pairs (so it runs at a few thousand tokens on CPU and its cost falls with density), and
`attention_materialized` builds the full (L, L) score matrix with a token mask (tiny shapes, tests). Both are
differentiable: straight-through estimators through every rounding, and the learned selector's gate (forward value
1) multiplies each kept tile pair's P so its scores receive gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpsa_train.fps.fp8 import check_finite, quantize_p, quantize_qk, quantize_v
from fpsa_train.fps.masks import (LearnedSelector, TileMask, dense_mask, pooled_tile_scores, select_keep,
                                  token_ranges, token_tiles, window_mask)
from fpsa_train.fps.schedule import Regime
from fpsa_train.models.token_order import TokenLayout


@dataclass
class RegimeMask:
    """The mask a regime selects for one batch, with what training needs from it."""

    mask: TileMask
    gate: torch.Tensor | None  # (B, H, N, N) forward value 1 (learned selector only)
    reg_loss: torch.Tensor | None  # the selector's density regulariser


def select_tiles(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, regime: Regime,
                 selector: LearnedSelector | None = None, heads: slice | None = None) -> RegimeMask:
    """The key tiles each query tile attends under `regime` (q, k unquantized, tile-major).

    `heads`: which of the selector's heads q and k hold (a slice; None = all), under sequence parallelism."""
    n, dev = len(layout.tile_sizes()), q.device
    if regime.pattern in ("topk", "window_topk"):  # the kernel's own selection (masks.select_keep), as a TileMask
        keep = select_keep(q, k, layout, regime.topk_of(n), regime.window).keep
        return RegimeMask(TileMask.from_dense(keep), None, None)
    static = window_mask(layout.tile_grid, regime.window, device=dev) if regime.window is not None else None
    if regime.pattern == "dense":
        return RegimeMask(dense_mask(n, device=dev), None, None)
    if regime.pattern == "window":
        return RegimeMask(static, None, None)
    if selector is None:
        raise ValueError(f"regime {regime.name!r} is `learned` but no LearnedSelector was given")
    mask, gate, reg = selector(pooled_tile_scores(q, k, layout), static, heads)
    return RegimeMask(mask, gate, reg)


def quantize_inputs(q, k, v, layout: TokenLayout, regime: Regime):
    """(q̂, k̂, v̂) in fp32: fake-quantized per the regime, or the fp32 inputs when it does not quantize."""
    q, k, v = q.float(), k.float(), v.float()
    if regime.quant is None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite(x, name)
        return q, k, v
    return quantize_qk(q, layout, regime.quant)[0], quantize_qk(k, layout, regime.quant)[0], quantize_v(v)[0]


def softmax_pv(s: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, quantized: bool) -> torch.Tensor:
    """O = e4m3(P·448)/448 · V / ℓ with P = exp(S − rowmax) (masked scores are −inf → P = 0)."""
    p = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())  # (..., Lq, Lk), in [0, 1]
    if gate is not None:
        p = p * gate
    denom = p.sum(dim=-1, keepdim=True)  # ℓ, fp32, from the unquantized P
    p_hat = quantize_p(p) if quantized else p
    return (p_hat @ v) / denom


def attention_tiles(q, k, v, layout: TokenLayout, regime: Regime, selector: LearnedSelector | None = None,
                    mask: TileMask | None = None, heads: slice | None = None) -> tuple[torch.Tensor, RegimeMask]:
    """FPS attention computing only the kept tile pairs: (out (B, H, L, D) fp32, the mask used).

    `mask` overrides the regime's selection (to evaluate a kernel and the reference on the same tile mask);
    `heads` is the selector's head range that q, k, v hold (select_tiles).

    One step per query tile u: the kept key tiles of every (b, h) are gathered side by side, each padded to the
    largest tile size (pads and unused mask slots score −inf), so the work is the kept pairs plus edge padding.
    """
    _require_tile_order(layout)
    sel = select_tiles(q, k, layout, regime, selector, heads) if mask is None else RegimeMask(mask, None, None)
    qh, kh, vh = quantize_inputs(q, k, v, layout, regime)
    b, h, _, d = qh.shape
    mask = sel.mask.expand(b, h)
    off = token_ranges(layout).to(qh.device)  # (N+1,)
    sizes = off[1:] - off[:-1]  # (N,)
    span = torch.arange(int(sizes.max()), device=qh.device)  # (T,) offsets inside a tile
    scale = 1.0 / math.sqrt(d)
    outputs = []
    for u in range(len(sizes)):
        kmax = int(mask.counts[:, :, u].max())
        kv = mask.indices[:, :, u, :kmax].long()  # (B, H, K) kept key tiles, −1 = unused slot
        tile = kv.clamp(min=0)
        tok = off[tile].unsqueeze(-1) + span  # (B, H, K, T) key tokens
        valid = (kv >= 0).unsqueeze(-1) & (span < sizes[tile].unsqueeze(-1))  # (B, H, K, T)
        tok = torch.where(valid, tok, torch.zeros_like(tok)).flatten(2)  # (B, H, K·T)
        idx = tok.unsqueeze(-1).expand(-1, -1, -1, d)  # (B, H, K·T, D)
        qu = qh[:, :, int(off[u]): int(off[u + 1])]  # (B, H, Lu, D)
        s = (qu @ kh.gather(2, idx).transpose(-1, -2)) * scale  # (B, H, Lu, K·T)
        check_scores(s, qh, kh)
        s = s.masked_fill(~valid.flatten(2).unsqueeze(-2), float("-inf"))
        gate = None
        if sel.gate is not None:
            gate = sel.gate[:, :, u].gather(-1, tile)  # (B, H, K) one gate per kept tile pair
            gate = gate.unsqueeze(-1).expand(-1, -1, -1, span.numel()).flatten(2).unsqueeze(-2)  # (B, H, 1, K·T)
        outputs.append(softmax_pv(s, vh.gather(2, idx), gate, regime.quantized))  # (B, H, Lu, D)
    return torch.cat(outputs, dim=2), sel


def attention_materialized(q, k, v, layout: TokenLayout, regime: Regime, selector: LearnedSelector | None = None,
                           mask: TileMask | None = None, heads: slice | None = None) -> tuple[torch.Tensor, RegimeMask]:
    """The same definition on the full (L, L) score matrix with a token-level mask (tiny shapes only)."""
    _require_tile_order(layout)
    sel = select_tiles(q, k, layout, regime, selector, heads) if mask is None else RegimeMask(mask, None, None)
    qh, kh, vh = quantize_inputs(q, k, v, layout, regime)
    tile_of = token_tiles(layout, q.device)  # (L,)
    keep = sel.mask.to_dense()[..., tile_of, :][..., tile_of]  # (B|1, H|1, L, L)
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    check_scores(s, qh, kh)
    s = s.masked_fill(~keep, float("-inf"))
    gate = None if sel.gate is None else sel.gate[..., tile_of, :][..., tile_of]
    return softmax_pv(s, vh, gate, regime.quantized), sel


def check_scores(s: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise if a score overflowed fp32 (before masking, so every value must be finite): finite but huge q and k
    (|q|·|k| beyond ~3e38) would otherwise give inf − inf = NaN in the softmax, silently."""
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"FPS attention scores overflow fp32: q and k reach |q| = {float(q.abs().max()):.3g} and "
                         f"|k| = {float(k.abs().max()):.3g} (head_dim {q.shape[-1]}), so q·kᵀ exceeds 3.4e38. "
                         "Attention inputs this large mean the activations diverged upstream (check the learning "
                         "rate and the inputs); the scores cannot be computed in fp32")


def _require_tile_order(layout: TokenLayout) -> None:
    if layout.order != "tile":
        raise ValueError("FPS attention needs tokens in tile-major order: set model.token_order=tile")
