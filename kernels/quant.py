"""Quantization pre-pass: Q and K to e4m3 with their group scales, V to e4m3 per channel, in the kernel's layout.

The numerics are fps/fp8.py's (the spec), bit for bit: scale = max(amax, AMAX_FLOOR) / 448 in fp32, then
round-to-nearest-even of x / scale (an IEEE division) to the e4m3 grid with saturation at ±448. The rounding is
done in fp32 arithmetic (`round_e4m3`) and the result, exactly representable, is then cast to float8: Triton's
interpreter (the CPU test path) rounds some values across a binade wrongly in a direct cast, and the spelled-out
rounding is cheap in a memory-bound pass.

Outputs (the forward kernel's inputs), for q, k, v (B, H, L, D) in tile-major token order, any strides:
- q8, k8: float8_e4m3fn (B·H, L, D) contiguous (K-major operands of both FP8 products);
- vt8: float8_e4m3fn (B·H, D, L_pad), V transposed so P·V also reads a K-major operand; L_pad = L rounded up to
  16 (TMA needs 16-byte row strides), the pad columns are 0;
- sq, sk: fp32 (B·H, L) per-token scales (each token's group scale); sq is multiplied by `q_mult` (the kernel folds
  the softmax scale and log2(e) in);
- sv: fp32 (B·H, D) per-channel V scales.
Q and K are read twice by their group's program (amax, then quantize): the second read hits L2, a group is at most a
few thousand tokens. V's amax spans the whole sequence, so V is read twice from memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fpsa_train.fps.fp8 import AMAX_FLOOR, E4M3_MAX, QuantGranularity, token_group_ids
from fpsa_train.models.token_order import TokenLayout

_RNE_MAGIC = 12582912.0  # 1.5 · 2^23: (v + M) − M rounds |v| < 2^22 to an integer, ties to even, in fp32


@triton.jit
def round_e4m3(x):
    """fp32 → the nearest e4m3 value (ties to even, subnormals, saturating at ±448), still fp32."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # binade [2^exp, 2^(exp+1))
    shift = tl.maximum(exp, -6) - 3  # e4m3 spacing there is 2^shift; subnormals keep 2^-9
    up = ((127 - shift) << 23).to(tl.float32, bitcast=True)  # 2^-shift, exact
    down = ((127 + shift) << 23).to(tl.float32, bitcast=True)  # 2^shift
    v = x * up  # |v| <= 16: the rounding below is the only inexact step
    v = (v + 12582912.0) - 12582912.0
    return v * down


@triton.jit
def _qk_group_kernel(x_ptr, x8_ptr, s_ptr, order_ptr, goff_ptr, H, L, stride_b, stride_h, stride_l, mult,
                     FLOOR: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr):
    """One program per (quantization group, batch·head): amax over the group's tokens, then quantize them."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(goff_ptr + g)
    hi = tl.load(goff_ptr + g + 1)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    d = tl.arange(0, D)
    amax = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = tl.load(order_ptr + t, mask=t < hi, other=0)
        x = tl.load(src + tok[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < hi)[:, None], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), 448.0)
    dst = x8_ptr + bh.to(tl.int64) * L * D
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = tl.load(order_ptr + t, mask=t < hi, other=0)
        x = tl.load(src + tok[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < hi)[:, None], other=0.0)
        y = round_e4m3(tl.div_rn(x.to(tl.float32), scale))
        tl.store(dst + tok[:, None].to(tl.int64) * D + d[None, :], y.to(tl.float8e4nv), mask=(t < hi)[:, None])
        tl.store(s_ptr + bh.to(tl.int64) * L + tok, tl.zeros([BLOCK_T], tl.float32) + scale * mult, mask=t < hi)


@triton.jit
def _qk_token_kernel(x_ptr, x8_ptr, s_ptr, H, L, stride_b, stride_h, stride_l, mult,
                     FLOOR: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr):
    """`token` granularity: one scale per row; one program per (block of rows, batch·head)."""
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    x = x.to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR), 448.0)
    y = round_e4m3(tl.div_rn(x, scale[:, None]))
    tl.store(x8_ptr + bh.to(tl.int64) * L * D + t[:, None] * D + d[None, :], y.to(tl.float8e4nv),
             mask=(t < L)[:, None])
    tl.store(s_ptr + bh.to(tl.int64) * L + t, scale * mult, mask=t < L)


@triton.jit
def _v_amax_kernel(x_ptr, part_ptr, H, L, stride_b, stride_h, stride_l, BLOCK_T: tl.constexpr, D: tl.constexpr):
    """Partial per-channel amax of V over one block of rows: part (B·H, n_blocks, D)."""
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    amax = tl.max(tl.abs(x.to(tl.float32)), axis=0)
    tl.store(part_ptr + (bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * D + d, amax)


@triton.jit
def _v_quant_kernel(x_ptr, vt_ptr, sv_ptr, H, L, L_pad, stride_b, stride_h, stride_l,
                    BLOCK_T: tl.constexpr, D: tl.constexpr):
    """V → e4m3 with its channel scales, written transposed: vt (B·H, D, L_pad); pad columns get 0."""
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    scale = tl.load(sv_ptr + bh * D + d)
    y = round_e4m3(tl.div_rn(x.to(tl.float32), scale[None, :])).to(tl.float8e4nv)  # (BLOCK_T, D)
    tl.store(vt_ptr + bh.to(tl.int64) * D * L_pad + d[:, None] * L_pad + t[None, :], tl.trans(y),
             mask=(t < L_pad)[None, :])


@dataclass
class QuantizedQKV:
    q8: torch.Tensor
    k8: torch.Tensor
    vt8: torch.Tensor
    sq: torch.Tensor
    sk: torch.Tensor
    sv: torch.Tensor
    batch: int
    heads: int


@functools.lru_cache(maxsize=64)
def _group_order(grid, order, tile_shape, group_shape, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by quantization group (int32 (L,)) and each group's offsets into that list (int32 (G+1,))."""
    ids, n_groups = token_group_ids(TokenLayout(grid, order, tile_shape), group_shape, device)
    tokens = torch.argsort(ids, stable=True).to(torch.int32)
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.bincount(ids, minlength=n_groups).cumsum(0)
    return tokens, offsets.to(torch.int32)


def _check(x: torch.Tensor, name: str, shape: tuple | None = None) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected (B, H, L, D) with a contiguous last dimension, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, q has {shape}")


def quantize_qk(x: torch.Tensor, layout: TokenLayout, granularity: QuantGranularity, mult: float = 1.0,
                name: str = "q/k") -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 e4m3 (B·H, L, D), per-token scale·mult fp32 (B·H, L)) for Q or K (B, H, L, D) in tile-major order."""
    _check(x, name)
    b, h, seq, d = x.shape
    if seq != layout.seq_len:
        raise ValueError(f"{name} has {seq} tokens, the layout grid {layout.grid} has {layout.seq_len}")
    x8 = torch.empty(b * h, seq, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(b * h, seq, dtype=torch.float32, device=x.device)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    if granularity.group == "token":
        block = 32
        _qk_token_kernel[(triton.cdiv(seq, block), b * h)](x, x8, scale, h, seq, *strides, mult, FLOOR=AMAX_FLOOR,
                                                           BLOCK_T=block, D=d)
        return x8, scale
    group_shape = tuple(int(g) for g in granularity.group_shape(tuple(layout.tile_shape)))
    tokens, offsets = _group_order(tuple(layout.grid), layout.order, tuple(layout.tile_shape), group_shape,
                                   str(x.device))
    _qk_group_kernel[(offsets.numel() - 1, b * h)](x, x8, scale, tokens, offsets, h, seq, *strides, mult,
                                                   FLOOR=AMAX_FLOOR, BLOCK_T=32, D=d)
    return x8, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vt8 e4m3 (B·H, D, L_pad) transposed, per-channel scale fp32 (B·H, D)) for V (B, H, L, D)."""
    _check(v, "v")
    b, h, seq, d = v.shape
    block = 64
    n_blocks = triton.cdiv(seq, block)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    part = torch.empty(b * h, n_blocks, d, dtype=torch.float32, device=v.device)
    _v_amax_kernel[(n_blocks, b * h)](v, part, h, seq, *strides, BLOCK_T=block, D=d)
    scale = part.amax(1).clamp_min(AMAX_FLOOR) / E4M3_MAX  # (B·H, D), as fps/fp8.py computes it
    seq_pad = triton.cdiv(seq, 16) * 16
    vt8 = torch.empty(b * h, d, seq_pad, dtype=torch.float8_e4m3fn, device=v.device)
    _v_quant_kernel[(triton.cdiv(seq_pad, block), b * h)](v, vt8, scale, h, seq, seq_pad, *strides, BLOCK_T=block,
                                                          D=d)
    return vt8, scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                 granularity: QuantGranularity, q_mult: float = 1.0) -> QuantizedQKV:
    """The pre-pass for one regime: see the module docstring for the layouts."""
    _check(q, "q")
    _check(k, "k", tuple(q.shape))
    _check(v, "v", tuple(q.shape))
    q8, sq = quantize_qk(q, layout, granularity, q_mult, "q")
    k8, sk = quantize_qk(k, layout, granularity, 1.0, "k")
    vt8, sv = quantize_v(v)
    return QuantizedQKV(q8, k8, vt8, sq, sk, sv, q.shape[0], q.shape[1])
