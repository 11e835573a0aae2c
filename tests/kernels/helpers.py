"""Inputs and error budgets shared by the kernel tests (CPU under TRITON_INTERPRET=1, and the GPU tests), and the
runner of their sm_90 compile checks.

Error budget. The kernel computes the reference's numerics except for one thing that is not rounding noise at fp32
level: it quantizes P against the running row max, the reference against the exact one, so a P element may round
differently once (by at most an e4m3 step). The reference's own P rounding is the same size of error, so the budget
for ‖kernel − reference‖ is twice ‖reference − (reference with P unquantized)‖ on the same quantized Q, K, V and the
same mask, plus the bf16 rounding of the output (one bf16 ulp, relative 2^-7 per element: Triton's interpreter
truncates when it casts to bf16, the GPU rounds to nearest, half that), plus what the reduced-precision accumulation
of FP8 Q·Kᵀ on Hopper can do (`score_error_term`; it matters only for huge logits, where near-ties of the row max
can flip). Per element the
worst case is |ΔO| ≤ Σ_j (2^-3 P_j + 2^-9/448) |v̂_j| / ℓ (two roundings of at most half an e4m3 step, relative
2^-4 for normal values, 2^-10/448 absolute for subnormals), checked at small shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from fpsa_train.fps.masks import token_tiles
from fpsa_train.fps.reference import attention_tiles, quantize_inputs
from fpsa_train.models.token_order import TokenLayout

BF16_ULP = 2.0 ** -7
"""Relative size of one bf16 step: the most the output cast can change a value (truncation included)."""
KINDS = ("normal", "peaked", "outliers", "zero_tiles", "near_max", "large", "rising")


def make_inputs(kind: str, batch: int, heads: int, layout: TokenLayout, head_dim: int, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """q, k, v (B, H, L, D) in tile-major order, drawn to stress one property of the kernel."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, heads, layout.seq_len, head_dim)

    def randn(*s):
        return torch.randn(*s, generator=g)

    q, k, v = randn(*shape), randn(*shape), randn(*shape)
    if kind == "peaked":  # video-like: a smooth feature field over the (t, h, w) grid, so neighbours attend each other
        t, h, w = layout.grid
        pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        pos = pos.reshape(-1, 3).float()  # (L, 3) raster order
        feats = torch.cos(pos @ (randn(3, head_dim) * 0.5) + randn(head_dim) * math.pi)  # (L, D)
        perm = layout.permutation()
        feats = feats if perm is None else feats[perm]
        q = 4.0 * feats + 0.3 * q
        k = 4.0 * feats + 0.3 * k
    elif kind == "outliers":  # a few channels 30× larger, as in real q/k/v
        for x in (q, k, v):
            x[..., [3, head_dim // 2 + 1]] *= 30.0
    elif kind == "zero_tiles":
        sizes = layout.tile_sizes().tolist()
        for tile in (0, len(sizes) // 2):
            lo = sum(sizes[:tile])
            for x in (q, k, v):
                x[:, :, lo: lo + sizes[tile]] = 0.0
    elif kind == "near_max":
        q, k, v = (x.sign() * (400.0 + 48.0 * torch.rand(*shape, generator=g)) for x in (q, k, v))
    elif kind == "large":
        q, k, v = q * 1e4, k * 1e4, v * 1e4
    elif kind == "rising":  # scores grow with the key's position: every key chunk raises the running row max, so a
        # P computed against a stale max (FA4's FP8 port, flash-attention#2694) would exceed 448 and clip
        u = randn(head_dim)
        u = u / u.norm()
        ramp = torch.linspace(0.0, 1.0, layout.seq_len)[:, None]  # key position, in tile-major order
        q = 0.3 * q + 4.0 * u
        k = 0.3 * k + 12.0 * ramp * u
    elif kind != "normal":
        raise ValueError(f"unknown input kind {kind!r}; expected one of {KINDS}")
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def reference_and_budget(q, k, v, layout: TokenLayout, regime, mask) -> tuple[torch.Tensor, float]:
    """(reference output fp32, the L2 error budget for a kernel) on `mask` (see the module docstring)."""
    ref, _ = attention_tiles(q, k, v, layout, regime, mask=mask)
    qh, kh, vh = quantize_inputs(q, k, v, layout, regime)
    unquantized_p = dataclasses.replace(regime, quant=None)  # same mask, Q/K/V already quantized: only P differs
    ref_p, _ = attention_tiles(qh, kh, vh, layout, unquantized_p, mask=mask)
    budget = 2.0 * torch.linalg.vector_norm(ref - ref_p).item() + BF16_ULP * torch.linalg.vector_norm(ref).item()
    return ref, budget + score_error_term(qh, kh, vh, layout, unquantized_p, mask)


def score_error_term(qh, kh, vh, layout: TokenLayout, regime, mask) -> float:
    """L2 bound of what the error of Q·Kᵀ's accumulation can do to the output.

    A dot of D products accumulated with relative precision ε is off by at most ε·Σ_d |q_d k_d| <= ε·|q|·k_max,
    with k_max the per-channel max of |k| over all keys: logit error δ_i per row. Perturbing every logit of a row by
    at most δ moves each softmax weight by a factor within e^(±2δ), so |ΔO| <= (e^(2δ) − 1)·(softmax·|v̂|), and never
    more than the spread of v̂ (both outputs are, up to P's rounding, averages of v̂'s rows). ε: Hopper's FP8 tensor
    cores keep about 14 bits while accumulating (Triton's default for FP8 dots on sm_90); we allow 2^-12. The CPU
    interpreter accumulates in fp32 (2^-22 allowed).
    """
    eps = 2.0 ** -12 if qh.is_cuda else 2.0 ** -22
    k_max = kh.abs().amax(dim=-2, keepdim=True)  # (B, H, 1, D)
    delta = eps * (qh.abs() * k_max).sum(-1, keepdim=True) / math.sqrt(qh.shape[-1])  # (B, H, L, 1)
    delta = delta.clamp(max=30.0)  # e^60 already exceeds any spread; keeps inf · 0 = NaN out
    spread = 2.2 * vh.abs().amax(dim=-2, keepdim=True)  # (B, H, 1, D)
    weighted, _ = attention_tiles(qh, kh, vh.abs(), layout, regime, mask=mask)  # softmax · |v̂|
    return torch.linalg.vector_norm(torch.minimum(torch.expm1(2 * delta) * weighted, spread)).item()


def elementwise_bound(q, k, v, layout: TokenLayout, regime, keep_tokens: torch.Tensor) -> torch.Tensor:
    """Worst-case |kernel − reference| per output element (materialised; small shapes). keep_tokens: bool
    (B|1, H|1, L, L)."""
    qh, kh, vh = quantize_inputs(q, k, v, layout, regime)
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep_tokens, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    ell = p.sum(-1, keepdim=True)
    slack = torch.where(keep_tokens, 2.0 ** -9 / 448, 0.0)
    return ((2.0 ** -3 * p + slack) @ vh.abs()) / ell


def token_mask(mask, layout: TokenLayout) -> torch.Tensor:
    """A TileMask as a bool (B|1, H|1, L, L) token mask."""
    tile_of = token_tiles(layout, mask.counts.device)
    return mask.to_dense()[..., tile_of, :][..., tile_of]


REPO = Path(__file__).resolve().parents[2]


def compile_check_lines(script: Path | str, *args: str, timeout: float = 600) -> tuple[list[dict], int, str]:
    """Run `python script args...` from the repository root in a process without TRITON_INTERPRET (tests/conftest.py
    sets it on CPU hosts before Triton is imported, and an interpreter-mode Triton cannot compile for sm_90): the JSON
    lines it prints, its exit status, and a failed check's message (the status and the tail of its stderr)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=REPO)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return lines, r.returncode, f"exit {r.returncode}: {r.stderr[-3000:]}"
