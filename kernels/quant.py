"""Quantization pre-pass: Q and K to e4m3 with their group scales, V to e4m3 per channel, in the kernel's layout.

The numerics are the reference's (fps/fp8.py in the training framework), bit for bit: scale = max(amax,
AMAX_FLOOR) / 448 in fp32, then round-to-nearest-even of x / scale (an IEEE division) to the e4m3 grid with
saturation at ±448. The rounding is done in fp32 arithmetic (`round_e4m3`) and the result, exactly representable, is
then cast to float8: Triton's interpreter (the CPU test path) rounds some values across a binade wrongly in a direct
cast, and the spelled-out rounding is cheap in a memory-bound pass.

Which tokens share a Q/K scale comes in as tables (`QuantGroups`: the tokens sorted by group and each group's
offsets, or one scale per token), so the pass knows nothing of grids or tiles; the framework builds them from its
token layout and quantization granularity once per layout.

Outputs (the forward kernel's inputs), for q, k, v (B, H, L, D), any strides with a contiguous last dimension:
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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fpsa_kernels.numerics import AMAX_FLOOR, E4M3_MAX, round_e4m3

QK_BLOCK_T = 32
"""Tokens per step of the Q/K programs. No sweep is recorded for the pre-pass block sizes: the pass is
memory-bound and costs 3.3% of the dense forward at Wan 1.3B-480p (docs/benchmarks.md)."""
V_BLOCK_T = 64
"""Tokens per V program (amax partials and the transposed write); as QK_BLOCK_T, not swept."""


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
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), E4M3_MAX)
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
    """One scale per token (row); one program per (block of rows, batch·head)."""
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    x = x.to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR), E4M3_MAX)
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


@dataclass(frozen=True, eq=False)
class QuantGroups:
    """Which tokens share a Q/K scale, as the pre-pass reads it: group g holds the tokens
    `tokens[offsets[g]:offsets[g + 1]]`; with no tables every token is its own group (one scale per row)."""

    seq_len: int
    """L: the tokens the tables cover (q and k must have exactly these)."""
    tokens: torch.Tensor | None = None
    """int32 (L,): every token index once, sorted by group; None: one scale per token."""
    offsets: torch.Tensor | None = None
    """int32 (G+1,): where each group starts in `tokens` (offsets[0] = 0, offsets[G] = L)."""

    def __post_init__(self) -> None:
        if (self.tokens is None) != (self.offsets is None):
            raise ValueError("QuantGroups: give both tokens and offsets, or neither (one scale per token)")
        if self.tokens is not None and self.tokens.shape != (self.seq_len,):
            raise ValueError(f"QuantGroups: tokens must be ({self.seq_len},), got {tuple(self.tokens.shape)}")

    @classmethod
    def from_ids(cls, ids: torch.Tensor, n_groups: int) -> QuantGroups:
        """The tables of a group id per token (int64 (L,), ids in [0, n_groups)), on ids' device. Reads the ids'
        counts on the host: build it once per layout and keep it."""
        tokens = torch.argsort(ids, stable=True).to(torch.int32)
        offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=ids.device)
        offsets[1:] = torch.bincount(ids, minlength=n_groups).cumsum(0)
        return cls(ids.numel(), tokens, offsets.to(torch.int32))


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


def _check(x: torch.Tensor, name: str, shape: tuple | None = None) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected (B, H, L, D) with a contiguous last dimension, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, q has {shape}")


def quantize_qk(x: torch.Tensor, groups: QuantGroups, mult: float = 1.0,
                name: str = "q/k") -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 e4m3 (B·H, L, D), per-token scale·mult fp32 (B·H, L)) for Q or K (B, H, L, D) with scale `groups`."""
    _check(x, name)
    b, h, seq, d = x.shape
    if seq != groups.seq_len:
        raise ValueError(f"{name} has {seq} tokens, its quantization groups cover {groups.seq_len}")
    x8 = torch.empty(b * h, seq, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(b * h, seq, dtype=torch.float32, device=x.device)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    if groups.tokens is None:
        _qk_token_kernel[(triton.cdiv(seq, QK_BLOCK_T), b * h)](x, x8, scale, h, seq, *strides, mult,
                                                                FLOOR=AMAX_FLOOR, BLOCK_T=QK_BLOCK_T, D=d)
        return x8, scale
    _qk_group_kernel[(groups.offsets.numel() - 1, b * h)](x, x8, scale, groups.tokens, groups.offsets, h, seq,
                                                          *strides, mult, FLOOR=AMAX_FLOOR, BLOCK_T=QK_BLOCK_T, D=d)
    return x8, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vt8 e4m3 (B·H, D, L_pad) transposed, per-channel scale fp32 (B·H, D)) for V (B, H, L, D)."""
    _check(v, "v")
    b, h, seq, d = v.shape
    n_blocks = triton.cdiv(seq, V_BLOCK_T)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    part = torch.empty(b * h, n_blocks, d, dtype=torch.float32, device=v.device)
    _v_amax_kernel[(n_blocks, b * h)](v, part, h, seq, *strides, BLOCK_T=V_BLOCK_T, D=d)
    scale = part.amax(1).clamp_min(AMAX_FLOOR) / E4M3_MAX.value  # (B·H, D), as the reference computes it
    seq_pad = triton.cdiv(seq, 16) * 16
    vt8 = torch.empty(b * h, d, seq_pad, dtype=torch.float8_e4m3fn, device=v.device)
    _v_quant_kernel[(triton.cdiv(seq_pad, V_BLOCK_T), b * h)](v, vt8, scale, h, seq, seq_pad, *strides,
                                                              BLOCK_T=V_BLOCK_T, D=d)
    return vt8, scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: QuantGroups,
                 q_mult: float = 1.0) -> QuantizedQKV:
    """The pre-pass: Q and K with the scale groups `groups`, V per channel. See the module docstring for the
    layouts."""
    _check(q, "q")
    _check(k, "k", tuple(q.shape))
    _check(v, "v", tuple(q.shape))
    q8, sq = quantize_qk(q, groups, q_mult, "q")
    k8, sk = quantize_qk(k, groups, 1.0, "k")
    vt8, sv = quantize_v(v)
    return QuantizedQKV(q8, k8, vt8, sq, sk, sv, q.shape[0], q.shape[1])


def rows_desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of a contiguous (B·H, L, D) tensor (q8, k8, or dO), loading blocks of `rows` rows."""
    bh, seq, d = x.shape
    return TensorDescriptor(x, shape=[bh, seq, d], strides=[seq * d, d, 1], block_shape=[1, rows, d])


def vt_desc(vt8: torch.Tensor, seq: int, cols: int) -> TensorDescriptor:
    """TMA descriptor of V transposed (B·H, D, L_pad), loading blocks of `cols` tokens."""
    bh, d, seq_pad = vt8.shape
    return TensorDescriptor(vt8, shape=[bh, d, seq], strides=[d * seq_pad, seq_pad, 1], block_shape=[1, d, cols])
