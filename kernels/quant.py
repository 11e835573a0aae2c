"""Quantization pre-pass: Q and K to e4m3 with their group scales, V to e4m3 per channel, in the kernel's layout.

The numerics are the reference's (fps/fp8.py in the training framework), bit for bit, down to the sign of a zero:
scale = max(amax, AMAX_FLOOR) / 448 in fp32, then round-to-nearest-even of x / scale (the IEEE quotient) to the e4m3
grid with saturation at ±448. On the GPU the quotient comes from the scale's reciprocal and two FMA corrections
(`quotient_rn`: the IEEE quotient, without `div.rn`'s slow path) and the hardware cast rounds (`cvt.rn.satfinite`).
Triton's interpreter (the CPU test path) casts without saturating and rounds some values across a binade wrongly,
so there the quotient is `tl.div_rn` and the rounding is spelled out in fp32 (`round_e4m3`), as the forward does
for P (`EMULATE_CAST`).

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

How the work is split. The pass reads 2 bytes and writes 1 per element, so its floor is the memory traffic of one
read of Q, K and V; what keeps it from that floor is reading from memory twice (a scale needs the amax of its whole
group before anything is quantized), long serial loops in few programs, arithmetic, and launches. So:
- a Q/K group of up to `GROUP_ROWS` tokens (a 48-token subtile; a 384-token tile) is one program: the amax loads
  its sub-blocks of `SUB_ROWS` tokens all at once (unrolled, in flight together), then the quantization reads them
  again, a sub-block at a time, from L1 or L2 (the program's own 100 KB, just read): one read from memory;
- one scale per token: blocks of `TOKEN_ROWS` tokens, each row's amax and quantization from registers;
- a larger group (2×2×2 tiles: ~3,072 tokens) would not stay in the caches: it is cut into chunks of `GROUP_ROWS`
  tokens, the first launch takes each chunk's amax into its group's (an atomic max), the second quantizes the
  chunks. Q and K are read twice, but by thousands of programs instead of a long loop per group;
- V's scales span the whole sequence, so V is read twice whatever the groups: its channel amax in the first launch
  (an atomic max per block of tokens), its quantization (and transposed write) in the second.
Two launches in all, after zeroing the buffer the atomics reduce into; each runs every kind of work on one grid
axis. An amax is exact in any order, so the scales, and so every output byte, do not depend on the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fpsa_kernels._interpreter import interpreted
from fpsa_kernels.numerics import AMAX_FLOOR, quantize_e4m3, scale_of

TOKEN_ROWS = 64
"""Tokens per program with one scale per token (16 KB of bf16 at D = 128). Not yet swept on a GPU."""
GROUP_ROWS = 512
"""Tokens of a group one program takes whole (a 6×8×8 tile, 384 tokens, rounded up to a power of two: 128 KB of
bf16 at D = 128, which its second read finds in L1 or L2); a larger group is cut into chunks of this many. Not yet
swept on a GPU."""
SUB_ROWS = 128
"""Tokens of a group's program loaded at once (32 KB of bf16 at D = 128). Not yet swept on a GPU."""
V_ROWS = 64
"""Tokens per program of V's quantization (each channel's row of vt8 gets 64 contiguous bytes). Not yet swept on
a GPU."""
V_AMAX_BLOCKS = 8
"""Blocks of tokens (the first launch's: SUB_ROWS, or TOKEN_ROWS with one scale per token) per program of V's
channel amax: fewer atomics per channel. Not yet swept on a GPU."""
ELEMENTS_PER_THREAD = 64
"""Elements of a block each thread holds, which sets a launch's warps (rows · D / (32 · this), 4 to 16). At 64
ptxas gives the launches 61 to 168 registers and no spills (bench_prepass.py --compile-only); at 128 the quantization
needs ~160, past the 128 a 16-warp program may have, and spills. Not yet swept on a GPU."""


# ---------------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _abs_bits(x):
    """|x| as the integer of its bits, sign bit cleared: non-negative floats order as these integers do, so their max
    is the amax, exactly. Integer ops keep 16-bit rows in their dtype (two to a register) for the amax pass."""
    if x.dtype.primitive_bitwidth == 16:
        return x.to(tl.int16, bitcast=True) & 0x7FFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _float_of_bits(bits, dtype: tl.constexpr):
    """The fp32 value of `_abs_bits` of a `dtype` value (held in an int32: reductions widen 16-bit integers)."""
    if dtype.primitive_bitwidth == 16:
        return bits.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    else:
        return bits.to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _load_rows(src, stride_l, tok, keep, D: tl.constexpr):
    """Rows `tok` of a (L, D) matrix at `src` with row stride `stride_l`: (rows, D) in its dtype; rows off `keep`
    read as 0."""
    return tl.load(src + tok[:, None].to(tl.int64) * stride_l + tl.arange(0, D)[None, :], mask=keep[:, None],
                   other=0.0)


@triton.jit
def _head(x_ptr, bh, H, stride_b, stride_h):
    """x[b, h] for b, h = divmod(bh, H): the (L, D) matrix of one batch element and head."""
    return x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _store_qk(x, scale, scale_rows, mult, x8_ptr, s_ptr, bh, L, tok, keep, D: tl.constexpr,
              EMULATE_CAST: tl.constexpr):
    """Rows x (rows, D) with their scale (a scalar, or (rows, 1)) → x8[bh, tok] in e4m3, and s[bh, tok] =
    scale_rows · mult (scale_rows: the rows' scales, (rows,))."""
    tl.store(x8_ptr + (bh.to(tl.int64) * L + tok[:, None]) * D + tl.arange(0, D)[None, :],
             quantize_e4m3(x, scale, EMULATE_CAST), mask=keep[:, None])
    tl.store(s_ptr + bh.to(tl.int64) * L + tok, scale_rows * mult, mask=keep)


@triton.jit
def _qk_tokens(x_ptr, stride_b, stride_h, stride_l, x8_ptr, s_ptr, mult, item, bh, H, L, ROWS: tl.constexpr,
               D: tl.constexpr, FLOOR: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """Rows [item · ROWS, (item + 1) · ROWS) of Q or K, each with its own scale."""
    tok = item * ROWS + tl.arange(0, ROWS)
    keep = tok < L
    x = _load_rows(_head(x_ptr, bh, H, stride_b, stride_h), stride_l, tok, keep, D)
    scale = scale_of(_float_of_bits(tl.max(_abs_bits(x), axis=1), x.dtype), FLOOR)  # (ROWS,)
    _store_qk(x, scale[:, None], scale, mult, x8_ptr, s_ptr, bh, L, tok, keep, D, EMULATE_CAST)


@triton.jit
def _qk_group(x_ptr, stride_b, stride_h, stride_l, x8_ptr, s_ptr, mult, order_ptr, goff_ptr, gamax_ptr, item, bh,
              H, L, n_chunks, AMAX: tl.constexpr, QUANTIZE: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
              D: tl.constexpr, FLOOR: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """Chunk `item % n_chunks` (`ROWS` tokens) of group g = item // n_chunks of Q or K, in sub-blocks of `SUB`
    tokens. AMAX and QUANTIZE (a group that is one chunk): its amax (the sub-blocks' loads unrolled, in flight
    together), then its quantization (a loop: the second read of each sub-block hits L1 or L2). AMAX alone: the
    chunk's amax into the group's, gamax[g] (an atomic max). QUANTIZE alone: quantized with the scale of gamax[g]."""
    g = item // n_chunks
    hi = tl.load(goff_ptr + g + 1)
    start = tl.load(goff_ptr + g) + (item % n_chunks) * ROWS
    src = _head(x_ptr, bh, H, stride_b, stride_h)
    if AMAX:
        bits = tl.zeros([SUB], tl.int32)
        for sub in tl.static_range(0, ROWS, SUB):
            t = start + sub + tl.arange(0, SUB)
            keep = t < hi
            x = _load_rows(src, stride_l, tl.load(order_ptr + t, mask=keep, other=0), keep, D)
            bits = tl.maximum(bits, tl.max(_abs_bits(x), axis=1))
        amax = _float_of_bits(tl.max(bits, axis=0), x_ptr.dtype.element_ty)
        if not QUANTIZE:
            tl.atomic_max(gamax_ptr + g, amax, sem="relaxed")  # ordered before the second launch anyway
    else:
        amax = tl.load(gamax_ptr + g)
    if QUANTIZE:
        scale = scale_of(amax, FLOOR)
        scale_rows = tl.zeros([SUB], tl.float32) + scale
        for sub in range(0, tl.minimum(hi - start, ROWS), SUB):  # the chunk's sub-blocks that hold tokens
            t = start + sub + tl.arange(0, SUB)
            keep = t < hi
            tok = tl.load(order_ptr + t, mask=keep, other=0)
            x = _load_rows(src, stride_l, tok, keep, D)
            _store_qk(x, scale, scale_rows, mult, x8_ptr, s_ptr, bh, L, tok, keep, D, EMULATE_CAST)


@triton.jit
def _v_amax(v_ptr, stride_b, stride_h, stride_l, vamax_ptr, item, bh, H, L, ROWS: tl.constexpr,
            BLOCKS: tl.constexpr, D: tl.constexpr):
    """Channel amax of V over `BLOCKS` blocks of `ROWS` tokens, into vamax[bh] (an atomic max: zeroed before)."""
    src = _head(v_ptr, bh, H, stride_b, stride_h)
    amax = tl.zeros([D], tl.float32)
    for block in range(BLOCKS):
        t = (item * BLOCKS + block) * ROWS + tl.arange(0, ROWS)
        x = _load_rows(src, stride_l, t, t < L, D)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    tl.atomic_max(vamax_ptr + bh * D + tl.arange(0, D), amax, sem="relaxed")


@triton.jit
def _v_quant(v_ptr, stride_b, stride_h, stride_l, vt_ptr, sv_ptr, vamax_ptr, item, bh, H, L, L_pad,
             ROWS: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """`ROWS` tokens of V → e4m3 with the channel scales, written transposed into vt (B·H, D, L_pad) (pad columns get
    0); the first block of each b·h also writes the scales."""
    d = tl.arange(0, D)
    scale = scale_of(tl.load(vamax_ptr + bh * D + d), FLOOR)  # (D,)
    t = item * ROWS + tl.arange(0, ROWS)
    x = _load_rows(_head(v_ptr, bh, H, stride_b, stride_h), stride_l, t, t < L, D)
    y = quantize_e4m3(x, scale[None, :], EMULATE_CAST)  # (ROWS, D)
    tl.store(vt_ptr + bh.to(tl.int64) * D * L_pad + d[:, None] * L_pad + t[None, :], tl.trans(y),
             mask=(t < L_pad)[None, :])
    if item == 0:
        tl.store(sv_ptr + bh * D + d, scale)


# ---------------------------------------------------------------------------------------------------- jit kernels
@triton.jit
def _first_kernel(q_ptr, k_ptr, v_ptr, q8_ptr, k8_ptr, sq_ptr, sk_ptr, order_ptr, goff_ptr, gamax_ptr, vamax_ptr,
                  H, L, G, n_chunks, n_qk, n_q, n_v, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, q_mult,
                  GROUPED: tl.constexpr, CHUNKED: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
                  V_BLOCKS: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """Grid (n_v + n_qk, B·H). Items [0, n_v): V's channel amax (`_v_amax`), first: they are the longest loops;
    [n_v, n_v + n_q): Q's items, then K's up to n_v + n_qk: `ROWS` tokens with their own scales (not GROUPED), a
    group quantized whole, or a chunk's amax (CHUNKED) into gamax (2, B·H, G)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    if i < n_v:
        _v_amax(v_ptr, v_sb, v_sh, v_sl, vamax_ptr, i, bh, H, L, SUB, V_BLOCKS, D)
    elif i < n_v + n_q:
        if GROUPED:
            _qk_group(q_ptr, q_sb, q_sh, q_sl, q8_ptr, sq_ptr, q_mult, order_ptr, goff_ptr, gamax_ptr + bh * G,
                      i - n_v, bh, H, L, n_chunks, True, not CHUNKED, ROWS, SUB, D, FLOOR, EMULATE_CAST)
        else:
            _qk_tokens(q_ptr, q_sb, q_sh, q_sl, q8_ptr, sq_ptr, q_mult, i - n_v, bh, H, L, ROWS, D, FLOOR,
                       EMULATE_CAST)
    else:
        if GROUPED:
            _qk_group(k_ptr, k_sb, k_sh, k_sl, k8_ptr, sk_ptr, 1.0, order_ptr, goff_ptr,
                      gamax_ptr + (tl.num_programs(1) + bh) * G, i - n_v - n_q, bh, H, L, n_chunks, True,
                      not CHUNKED, ROWS, SUB, D, FLOOR, EMULATE_CAST)
        else:
            _qk_tokens(k_ptr, k_sb, k_sh, k_sl, k8_ptr, sk_ptr, 1.0, i - n_v - n_q, bh, H, L, ROWS, D, FLOOR,
                       EMULATE_CAST)


@triton.jit
def _second_kernel(q_ptr, k_ptr, v_ptr, q8_ptr, k8_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, order_ptr, goff_ptr,
                   gamax_ptr, vamax_ptr, H, L, L_pad, G, n_chunks, n_qk, n_q, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl,
                   v_sb, v_sh, v_sl, q_mult, CHUNKED: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
                   V_ROWS: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """Grid (n_qk + V's blocks, B·H). Items [0, n_q): Q's chunks of large groups, quantized with their group's scale
    (gamax, from the first launch), then K's up to n_qk (only when CHUNKED); the rest: V's blocks of `V_ROWS` tokens
    (`_v_quant`)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    if CHUNKED:
        if i < n_q:
            _qk_group(q_ptr, q_sb, q_sh, q_sl, q8_ptr, sq_ptr, q_mult, order_ptr, goff_ptr, gamax_ptr + bh * G, i,
                      bh, H, L, n_chunks, False, True, ROWS, SUB, D, FLOOR, EMULATE_CAST)
        elif i < n_qk:
            _qk_group(k_ptr, k_sb, k_sh, k_sl, k8_ptr, sk_ptr, 1.0, order_ptr, goff_ptr,
                      gamax_ptr + (tl.num_programs(1) + bh) * G, i - n_q, bh, H, L, n_chunks, False, True, ROWS,
                      SUB, D, FLOOR, EMULATE_CAST)
        else:
            _v_quant(v_ptr, v_sb, v_sh, v_sl, vt_ptr, sv_ptr, vamax_ptr, i - n_qk, bh, H, L, L_pad, V_ROWS, D, FLOOR,
                     EMULATE_CAST)
    else:
        _v_quant(v_ptr, v_sb, v_sh, v_sl, vt_ptr, sv_ptr, vamax_ptr, i, bh, H, L, L_pad, V_ROWS, D, FLOOR,
                 EMULATE_CAST)


# ------------------------------------------------------------------------------------------------------- launchers
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
    max_size: int = field(init=False, default=1)
    """Tokens in the largest group (1 with no tables): whether a group fits one program of the pre-pass. Read on the
    host once, here: build the tables once per layout and keep them."""

    def __post_init__(self) -> None:
        if (self.tokens is None) != (self.offsets is None):
            raise ValueError("QuantGroups: give both tokens and offsets, or neither (one scale per token)")
        if self.tokens is not None and self.tokens.shape != (self.seq_len,):
            raise ValueError(f"QuantGroups: tokens must be ({self.seq_len},), got {tuple(self.tokens.shape)}")
        if self.offsets is not None:
            sizes = self.offsets[1:] - self.offsets[:-1]  # (G,)
            object.__setattr__(self, "max_size", int(sizes.max()) if sizes.numel() else 0)

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


@dataclass(frozen=True)
class Blocks:
    """The pre-pass's block sizes (defaults: the module constants); a field per constant, for sweeps."""

    token_rows: int = TOKEN_ROWS
    group_rows: int = GROUP_ROWS
    sub_rows: int = SUB_ROWS
    v_rows: int = V_ROWS
    v_amax_blocks: int = V_AMAX_BLOCKS
    elements_per_thread: int = ELEMENTS_PER_THREAD

    def warps(self, rows: int, d: int) -> int:
        """Warps of a launch whose largest block (loaded at once) is rows × d."""
        return max(4, min(16, rows * d // (32 * self.elements_per_thread)))


def _check(x: torch.Tensor, name: str, shape: tuple | None = None) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected (B, H, L, D) with a contiguous last dimension, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, q has {shape}")


def _split(groups: QuantGroups | None, seq: int, blocks: Blocks) -> tuple[int, int, int, int]:
    """(tokens per Q/K item, tokens per load, chunks per group (1: a group is one item; 0: one scale per token),
    Q/K items per tensor and b·h)."""
    if groups is None or groups.tokens is None:
        return blocks.token_rows, blocks.token_rows, 0, triton.cdiv(seq, blocks.token_rows)
    rows = min(triton.next_power_of_2(max(groups.max_size, 16)), blocks.group_rows)
    n_chunks = triton.cdiv(groups.max_size, rows)
    return rows, min(blocks.sub_rows, rows), n_chunks, (groups.offsets.numel() - 1) * n_chunks


@dataclass
class Launch:
    """One kernel launch as the pre-pass makes it (`kernel[grid](*args, **meta)`), kept so that a compile check can
    build exactly what a call runs (scripts/experiments/bench_prepass.py)."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, int]
    args: tuple
    meta: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def plan_prepass(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None,
                 groups: QuantGroups | None, q_mult: float = 1.0,
                 blocks: Blocks = Blocks()) -> tuple[tuple[torch.Tensor | None, ...], list[Launch]]:
    """((q8, sq, k8, sk, vt8, sv), the launches that fill them) for whichever of q, k (with `groups`) and v are
    given (None for the others' outputs): the two launches of the module docstring. Allocates the outputs and the
    zeroed buffer of the atomic maxima; launches nothing. The shapes are checked by the callers."""
    x = next(t for t in (q, k, v) if t is not None)
    b, h, seq, d = x.shape
    bh, dev = b * h, x.device
    qk = [t for t in (q, k) if t is not None]
    x8 = [torch.empty(bh, seq, d, dtype=torch.float8_e4m3fn, device=dev) for _ in qk]
    s = [torch.empty(bh, seq, dtype=torch.float32, device=dev) for _ in qk]
    rows, sub, n_chunks, n_items = _split(groups, seq, blocks)
    chunked = n_chunks > 1
    n_groups = n_items // n_chunks if chunked else 0
    # one zeroed buffer for the atomic maxima: V's per channel (B·H, D), then large groups' (2, B·H, G)
    work = torch.zeros(bh * d * (v is not None) + 2 * bh * n_groups, dtype=torch.float32, device=dev)
    vamax = work[:bh * d * (v is not None)]
    gamax = work[vamax.numel():]
    seq_pad = triton.cdiv(seq, 16) * 16
    vt8 = sv = None
    if v is not None:
        vt8 = torch.empty(bh, d, seq_pad, dtype=torch.float8_e4m3fn, device=dev)
        sv = torch.empty(bh, d, dtype=torch.float32, device=dev)
    # an absent tensor's pointers: a tensor at hand of the same dtype (none of its items is in the grid)
    q_, k_ = (qk + qk)[:2] if qk else (v, v)
    q8_, k8_ = (x8 + x8)[:2] if qk else (vt8, vt8)
    sq_, sk_ = (s + s)[:2] if qk else (sv, sv)
    v_, vt8_, sv_ = (v, vt8, sv) if v is not None else (q_, q8_, sq_)
    grouped = groups is not None and groups.tokens is not None
    order, goff = (groups.tokens, groups.offsets) if grouped else (None, None)
    n_q, n_qk = n_items * (q is not None), n_items * len(qk)
    strides = (*q_.stride()[:3], *k_.stride()[:3], *v_.stride()[:3])
    common = dict(D=d, FLOOR=AMAX_FLOOR, EMULATE_CAST=interpreted())

    n_v = triton.cdiv(seq, sub * blocks.v_amax_blocks) if v is not None else 0
    launches = [Launch(_first_kernel, (n_v + n_qk, bh), (
        q_, k_, v_, q8_, k8_, sq_, sk_, order, goff, gamax, vamax, h, seq, n_groups, max(n_chunks, 1), n_qk, n_q, n_v,
        *strides, q_mult), dict(GROUPED=grouped, CHUNKED=chunked, ROWS=rows, SUB=sub, V_BLOCKS=blocks.v_amax_blocks,
                                num_warps=blocks.warps(sub, d), **common))]
    n_second = (n_qk if chunked else 0) + (triton.cdiv(seq_pad, blocks.v_rows) if v is not None else 0)
    if n_second:
        launches.append(Launch(_second_kernel, (n_second, bh), (
            q_, k_, v_, q8_, k8_, vt8_, sq_, sk_, sv_, order, goff, gamax, vamax, h, seq, seq_pad, n_groups,
            max(n_chunks, 1), n_qk * chunked, n_q * chunked, *strides, q_mult), dict(
            CHUNKED=chunked, ROWS=rows, SUB=sub, V_ROWS=blocks.v_rows,
            num_warps=blocks.warps(max(sub * chunked, blocks.v_rows), d), **common)))
    out_q = (x8[0], s[0]) if q is not None else (None, None)
    out_k = (x8[-1], s[-1]) if k is not None else (None, None)
    return (*out_q, *out_k, vt8, sv), launches


def _prepass(q, k, v, groups: QuantGroups | None, q_mult: float) -> tuple[torch.Tensor | None, ...]:
    """`plan_prepass`'s outputs, filled."""
    outputs, launches = plan_prepass(q, k, v, groups, q_mult)
    for launch in launches:
        launch()
    return outputs


# -------------------------------------------------------------------------------------------------------- public
def quantize_qk(x: torch.Tensor, groups: QuantGroups, mult: float = 1.0,
                name: str = "q/k") -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 e4m3 (B·H, L, D), per-token scale·mult fp32 (B·H, L)) for Q or K (B, H, L, D) with scale `groups`."""
    _check(x, name)
    if x.shape[2] != groups.seq_len:
        raise ValueError(f"{name} has {x.shape[2]} tokens, its quantization groups cover {groups.seq_len}")
    x8, scale, *_ = _prepass(x, None, None, groups, mult)
    return x8, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vt8 e4m3 (B·H, D, L_pad) transposed, per-channel scale fp32 (B·H, D)) for V (B, H, L, D)."""
    _check(v, "v")
    *_, vt8, sv = _prepass(None, None, v, None, 1.0)
    return vt8, sv


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: QuantGroups,
                 q_mult: float = 1.0) -> QuantizedQKV:
    """The pre-pass: Q and K with the scale groups `groups`, V per channel, in two launches. See the module
    docstring for the layouts."""
    _check(q, "q")
    _check(k, "k", tuple(q.shape))
    _check(v, "v", tuple(q.shape))
    if q.shape[2] != groups.seq_len:
        raise ValueError(f"q has {q.shape[2]} tokens, its quantization groups cover {groups.seq_len}")
    q8, sq, k8, sk, vt8, sv = _prepass(q, k, v, groups, q_mult)
    return QuantizedQKV(q8, k8, vt8, sq, sk, sv, q.shape[0], q.shape[1])


def rows_desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of a contiguous (B·H, L, D) tensor (q8, k8, or dO), loading blocks of `rows` rows."""
    bh, seq, d = x.shape
    return TensorDescriptor(x, shape=[bh, seq, d], strides=[seq * d, d, 1], block_shape=[1, rows, d])


def vt_desc(vt8: torch.Tensor, seq: int, cols: int) -> TensorDescriptor:
    """TMA descriptor of V transposed (B·H, D, L_pad), loading blocks of `cols` tokens."""
    bh, d, seq_pad = vt8.shape
    return TensorDescriptor(vt8, shape=[bh, d, seq], strides=[d * seq_pad, seq_pad, 1], block_shape=[1, d, cols])
