"""FP8 e4m3 fake quantization: the PyTorch reference (the spec) of FPS attention's numerics.

Why: DESIGN.md asks for *one numerics definition*. Everything here is plain fp32 arithmetic, so it runs (and
differentiates) on CPU, and the Triton kernels are tested against it bit for bit where they can be.

- `round_e4m3` emulates a cast to `torch.float8_e4m3fn` and back with exponent arithmetic: round to nearest,
  ties to even, subnormals (spacing 2^-9 below 2^-6), and SATURATION to ±448 for anything larger (our contract;
  some torch versions/devices cast out-of-range values to NaN instead). -0.0 keeps its sign; NaN stays NaN.
- Scales: one per quantization group, `scale = amax/448`, so the group's largest |value| maps to 448 and nothing
  saturates in normal operation. amax is floored at `AMAX_FLOOR` (= 448 · smallest normal fp32), so an all-zero
  group gets a finite, *normal* scale (safe under GPU flush-to-zero) and quantizes to exact zeros.
- Granularity of the Q/K scales (`QuantGranularity`), from coarse to fine: `tiles` (a 3D block of factor tiles),
  `tile` (one 3D tile, DESIGN's default), `subtile` (the tile split by factor per axis), `token` (one per token).
  Groups are 3D blocks of the token grid aligned at its origin; edge groups are partial, like edge tiles.
  V gets one scale per head-dim channel (outlier channels are common in V); P (softmax numerators in [0, 1]) the
  fixed scale 1/448, i.e. round_e4m3(P·448)/448.
- Gradients: straight-through. d x_hat / d x = 1 where the clamp at ±448 had no effect, i.e. |x/scale| <= 464
  (the rounding boundary above 448: up to 464 plain round-to-nearest already gives 448; this keeps the gradient
  of the group max, whose x/scale may land an fp32 ulp above 448), and 0 where the value saturated — it does not
  move with x in the forward, as with clamp. Scales are constants (computed from detached amax): no gradient.
- Range statistics for logging (`e4m3_range_stats`, `qkv_range_stats`): how many elements saturate (beyond the
  same 464) and how many nonzero ones underflow to zero, with exactly the scales above.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fpsa_train.models.token_order import TokenLayout

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value (1.75 · 2^8)."""
E4M3_SAT_GRAD_LIMIT = 464.0
"""|x/scale| above this saturates (gets zero gradient); up to it, round-to-nearest gives at most 448 anyway."""
AMAX_FLOOR = E4M3_MAX * torch.finfo(torch.float32).tiny
"""amax floor: scale = max(amax, floor)/448 is never below the smallest normal fp32, never 0, NaN or Inf."""
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXP = -6  # smallest normal is 2^-6; below it the spacing stays 2^-9 (subnormals)

GROUPS = ("tiles", "tile", "subtile", "token")


def divide(x: Tensor, divisor: float) -> Tensor:
    """x / divisor rounded once (IEEE division) on every device. PyTorch's CUDA kernel divides by a Python number as
    a multiply by its reciprocal, which can be one bit off; the CPU and the kernels' pre-pass divide, so without
    this the reference's scales on a GPU were not the kernels' bit for bit (scripts/experiments/bench_prepass.py)."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def round_e4m3(x: Tensor) -> Tensor:
    """Round to e4m3 and back (fp32): nearest, ties to even, subnormals, saturating at ±448.

    Runs as the clamped `torch.float8_e4m3fn` cast, which is fast; `round_e4m3_emulated` spells out the same
    rounding in fp32 arithmetic and the tests hold the two bit-identical.
    """
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_e4m3_emulated(x: Tensor) -> Tensor:
    """fp32 emulation of `x.clamp(-448, 448).to(torch.float8_e4m3fn).float()` (see module docstring)."""
    x = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    _, exp = torch.frexp(x)  # x = m · 2^exp with |m| in [0.5, 1): the binade is [2^(exp-1), 2^exp)
    # spacing of representable values in x's binade is 2^(exp - 1 - 3), never finer than the subnormal 2^-9
    shift = (exp - 1).clamp_min(_E4M3_MIN_NORMAL_EXP) - _E4M3_MANTISSA_BITS
    # scaling by a power of two is exact, so the only rounding is torch.round (half to even) on the quotient
    return torch.ldexp(torch.round(torch.ldexp(x, -shift)), shift)


def check_finite(x: Tensor, name: str) -> None:
    """Raise ValueError if `x` holds NaN or Inf, so they never spread silently through the fake quantization."""
    n_bad = int((~torch.isfinite(x)).sum())
    if n_bad:
        raise ValueError(
            f"{name} has {n_bad} non-finite values (NaN/Inf) out of {x.numel()} (shape {tuple(x.shape)}); "
            "FP8 fake quantization needs finite inputs"
        )


class FakeQuantE4M3(torch.autograd.Function):
    """x ↦ round_e4m3(x / scale) · scale in fp32, with the straight-through gradient of the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        y = x.float() / scale
        ctx.save_for_backward(y.abs() <= E4M3_SAT_GRAD_LIMIT)
        ctx.x_dtype = x.dtype
        return round_e4m3(y) * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (not_saturated,) = ctx.saved_tensors
        return (grad_out * not_saturated).to(ctx.x_dtype), None


class _FakeQuantP(FakeQuantE4M3):
    """round_e4m3(p · 448) / 448: multiplying by 448 matches the kernels exactly (p / fl(1/448) does not)."""

    @staticmethod
    def forward(ctx, p: Tensor, p_scale: float) -> Tensor:
        y = p.float() * p_scale
        ctx.save_for_backward(y.abs() <= E4M3_SAT_GRAD_LIMIT)
        ctx.x_dtype = p.dtype
        return divide(round_e4m3(y), p_scale)


def fake_quant_e4m3(x: Tensor, scale: Tensor | float, name: str = "x") -> Tensor:
    """Fake-quantize `x` with a broadcastable `scale`; returns fp32 whatever x's dtype (the reference stays fp32)."""
    scale = torch.as_tensor(scale, device=x.device).detach().float()
    check_finite(x, name)
    check_finite(scale, f"{name} scale")
    return FakeQuantE4M3.apply(x, scale)


@dataclass(frozen=True)
class QuantGranularity:
    """Which tokens share one Q/K scale."""

    group: str = "tile"
    """`tiles` (factor tiles per axis), `tile`, `subtile` (tile split by factor per axis) or `token`."""
    factor: tuple[int, int, int] = (1, 1, 1)
    """(t, h, w) multiplier for `tiles`, divisor for `subtile`; ignored by `tile` and `token`."""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"quant.group={self.group!r}: expected one of {GROUPS}")
        factor = tuple(self.factor)
        if len(factor) != 3 or not all(isinstance(f, int) and f > 0 for f in factor):
            raise ValueError(f"quant.factor={self.factor!r}: expected three positive ints (t, h, w)")
        object.__setattr__(self, "factor", factor)  # lists from YAML become a hashable tuple

    def group_shape(self, tile_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Group extent in tokens (t, h, w) for a given tile shape."""
        if self.group == "token":
            return (1, 1, 1)
        if self.group == "tile":
            return tuple(tile_shape)
        if self.group == "tiles":
            return tuple(t * f for t, f in zip(tile_shape, self.factor))
        for axis, t, f in zip("thw", tile_shape, self.factor):
            if t % f:
                raise ValueError(f"quant.factor={self.factor}: {f} does not divide the tile {tuple(tile_shape)} "
                                 f"on axis {axis!r} (size {t})")
        return tuple(t // f for t, f in zip(tile_shape, self.factor))


def token_group_ids(layout: TokenLayout, group_shape: tuple[int, int, int],
                    device: torch.device | str = "cpu") -> tuple[Tensor, int]:
    """Quantization group of every token in the layout's order: (ids int64 (L,), n_groups). Cached."""
    key = (tuple(layout.grid), layout.order, tuple(layout.tile_shape), tuple(int(g) for g in group_shape))
    return _group_ids(*key, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _group_ids(grid, order, tile_shape, group_shape, device) -> tuple[Tensor, int]:
    (gt, gh, gw), (st, sh, sw) = grid, group_shape
    n_t, n_h, n_w = -(-gt // st), -(-gh // sh), -(-gw // sw)
    with torch.inference_mode(False):  # cached: must stay usable by autograd when first built under validation
        it = torch.arange(gt) // st  # (T,)
        ih = torch.arange(gh) // sh  # (H,)
        iw = torch.arange(gw) // sw  # (W,)
        ids = ((it[:, None, None] * n_h + ih[None, :, None]) * n_w + iw[None, None, :]).reshape(-1)  # (L,) raster
        perm = TokenLayout(grid, order, tile_shape).permutation()
        if perm is not None:
            ids = ids[perm]  # (L,) in tile-major order
        return ids.to(device), n_t * n_h * n_w


def group_scales(x: Tensor, ids: Tensor, n_groups: int) -> Tensor:
    """Per-token scale (B, H, L, 1) fp32 = max(amax of the token's group over its tokens and D, floor) / 448."""
    B, H, L, _ = x.shape
    token_amax = x.detach().abs().amax(dim=-1).float()  # (B, H, L)
    idx = ids.to(x.device).expand(B, H, L)  # (B, H, L)
    group_amax = token_amax.new_zeros(B, H, n_groups).scatter_reduce(-1, idx, token_amax, "amax")  # (B, H, G)
    amax = group_amax.gather(-1, idx).clamp_min(AMAX_FLOOR)  # (B, H, L)
    return divide(amax, E4M3_MAX).unsqueeze(-1)  # (B, H, L, 1)


def qk_scales(x: Tensor, layout: TokenLayout, granularity: QuantGranularity, name: str = "q/k") -> Tensor:
    """Per-token scale (B, H, L, 1) of Q or K (B, H, L, D) in the layout's token order, for the granularity."""
    if x.shape[-2] != layout.seq_len:
        raise ValueError(f"{name} has {x.shape[-2]} tokens, layout grid {layout.grid} has {layout.seq_len}")
    ids, n_groups = token_group_ids(layout, granularity.group_shape(layout.tile_shape), x.device)
    return group_scales(x, ids, n_groups)  # (B, H, L, 1)


def v_scales(v: Tensor) -> Tensor:
    """Per-channel scale (B, H, 1, D) of V (B, H, L, D): max(amax over L, floor)/448."""
    return divide(v.detach().abs().amax(dim=-2, keepdim=True).float().clamp_min(AMAX_FLOOR), E4M3_MAX)  # (B, H, 1, D)


def quantize_qk(x: Tensor, layout: TokenLayout, granularity: QuantGranularity,
                name: str = "q/k") -> tuple[Tensor, Tensor]:
    """Q or K (B, H, L, D) in the layout's token order → (x_hat fp32 with STE, per-token scale (B, H, L, 1))."""
    check_finite(x, name)
    scale = qk_scales(x, layout, granularity, name)  # (B, H, L, 1)
    return FakeQuantE4M3.apply(x, scale), scale


def quantize_v(v: Tensor, name: str = "v") -> tuple[Tensor, Tensor]:
    """V (B, H, L, D) → (v_hat fp32 with STE, per-channel scale (B, H, 1, D) = max(amax over L, floor)/448)."""
    check_finite(v, name)
    scale = v_scales(v)  # (B, H, 1, D)
    return FakeQuantE4M3.apply(v, scale), scale


class RangeStats(NamedTuple):
    """Counts of how FP8 e4m3 quantization treated a tensor's elements (add them up over tensors and layers)."""

    saturated: int
    """Elements with |x/scale| > 464, where the clamp to ±448 changes the value (fake_quant_e4m3's saturation)."""
    underflow: int
    """Nonzero elements that round to zero."""
    nonzero: int
    """Nonzero elements (the denominator of the underflow rate)."""
    total: int
    """All elements (the denominator of the saturation rate)."""

    def __add__(self, other: RangeStats) -> RangeStats:  # element-wise, not tuple concatenation
        return RangeStats(*(a + b for a, b in zip(self, other)))

    def rates(self) -> dict[str, float]:
        """{"saturated": fraction of all elements, "underflow": fraction of the nonzero elements}."""
        return {"saturated": self.saturated / max(self.total, 1), "underflow": self.underflow / max(self.nonzero, 1)}


@torch.no_grad()
def e4m3_range_stats(x: Tensor, scale: Tensor) -> RangeStats:
    """How many elements of x saturate or underflow when x/scale (scale broadcastable) is cast to e4m3.

    Saturated: |x/scale| > 464; between 448 and 464 round-to-nearest gives 448 anyway (the group max itself may land
    an fp32 ulp above 448), so only beyond 464 does the clamp lose anything. With the contract's per-group amax
    scales (`qk_scales`, `v_scales`) nothing saturates by construction: a nonzero rate flags a broken scale.
    Underflow: nonzero elements whose x/scale rounds to zero (|x/scale| up to half the smallest subnormal, 2^-10);
    small entries of a group with a large outlier are lost this way, so this is the informative number.
    """
    y = x.float() / scale.float()
    nonzero = x != 0
    return RangeStats(int((y.abs() > E4M3_SAT_GRAD_LIMIT).sum()), int((nonzero & (round_e4m3(y) == 0)).sum()),
                      int(nonzero.sum()), x.numel())


def qkv_range_stats(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout,
                    granularity: QuantGranularity) -> RangeStats:
    """`e4m3_range_stats` of Q, K and V together, with exactly the scales quantize_qk and quantize_v use."""
    with torch.no_grad():
        return (e4m3_range_stats(q, qk_scales(q, layout, granularity, "q"))
                + e4m3_range_stats(k, qk_scales(k, layout, granularity, "k")) + e4m3_range_stats(v, v_scales(v)))


def quantize_p(p: Tensor, name: str = "p") -> Tensor:
    """Softmax numerators in [0, 1] with the fixed scale 1/448: round_e4m3(p · 448) / 448 in fp32, STE."""
    check_finite(p, name)
    return _FakeQuantP.apply(p, E4M3_MAX)


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖ref‖ / ‖ref − out‖) in dB (fp64); inf when equal."""
    ref, out = ref.detach().double(), out.detach().double()
    noise = torch.linalg.vector_norm(ref - out).item()
    if noise == 0.0:
        return float("inf")
    signal = torch.linalg.vector_norm(ref).item()
    return float("-inf") if signal == 0.0 else 20.0 * torch.log10(torch.tensor(signal / noise)).item()
