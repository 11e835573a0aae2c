"""3D rotary position embedding of Wan2.1 (reference/wan.md §2).

head_dim d is split into three independent axes: t gets d − 4·⌊d/6⌋ real dims, h and w get 2·⌊d/6⌋ each
(44/42/42 at d=128). Each axis uses theta 1e4 and integer positions on the patched grid starting at 0. Pairs are
*interleaved* (x[2i], x[2i+1]) and rotated as complex numbers, not rotate-half.

The angle table is computed in float64 (as the original does) and applied in float32: the rotation of an fp32
or bf16 q/k loses nothing measurable at fp32 compared with the original's float64 multiply.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis (t, h, w); they sum to head_dim."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                max_len: int = 1024) -> torch.Tensor:
    """Rotation angles for every token of a raster-ordered grid: (T·H·W, head_dim/2) float64."""
    if any(g > max_len for g in grid):
        raise ValueError(f"token grid {tuple(grid)} exceeds the RoPE table of {max_len} positions per axis")
    per_axis = []
    for n, d in zip(grid, axis_dims(head_dim)):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        per_axis.append(torch.outer(torch.arange(n, dtype=torch.float64), inv_freq))  # (n, d/2)
    t, h, w = grid
    at, ah, aw = per_axis
    angles = torch.cat([
        at[:, None, None, :].expand(t, h, w, -1),
        ah[None, :, None, :].expand(t, h, w, -1),
        aw[None, None, :, :].expand(t, h, w, -1),
    ], dim=-1)  # (T, H, W, head_dim/2)
    return angles.reshape(t * h * w, head_dim // 2)


def rope_cos_sin(angles: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each (L, head_dim/2), on the device."""
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x: (B, L, H, D) with cos/sin (L, D/2); computed in fp32, returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, D/2)
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1)  # (B, L, H, D/2, 2)
    return out.flatten(-2).type_as(x)
