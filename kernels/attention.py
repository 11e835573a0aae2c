"""FP8 tile-sparse attention forward (Triton, Hopper): the deployed numerics of fps/reference.py.

One program owns `BLOCK_M` query rows of one query group (kernels/plan.py) for one (batch, head) and loops over the
group's key chunks of `BLOCK_N` keys, each a TMA load of K (B·H, L, D) and of V transposed (B·H, D, L_pad):

    S   = (Q8 · K8ᵀ) · s_k · s_q'                     fp32 accumulation; s_q' = s_q · softmax_scale · log2(e)
    P'  = 2^(S − m + log2 448) = 448 P               online softmax in base 2 against the running row max m
    ℓ'  = ℓ' · 2^(m_old − m) + Σ P'                   fp32, from the unquantized P (ℓ' = 448 ℓ)
    acc = acc · 2^(m_old − m) + e4m3(P') · V8         fp32 accumulation
    O   = acc · s_v / ℓ'  (bf16),  lse = ln 2 · (m + log2 ℓ' − log2 448)

Per score that is two FMAs (s·s_k + bias, then t·s_q' + (log2 448 − m)), a min, exp2 and the FP8 cast. The bias is
−∞ for a chunk's columns outside its valid range [lo, hi) (before or after a run of kept tiles), so masking is free.
The min caps P' at 448: the row max is taken over rounded products and the FMA uses the unrounded one, so without it
an exponent could exceed log2 448 by a rounding error (at logits of 1e8, by several units) and saturate while ℓ'
counted it whole. FP8 Q·Kᵀ on Hopper accumulates in the tensor cores' reduced precision by default (about 14 bits,
Triton's `max_num_imprecise_acc`); `qk_imprecise_acc=32` promotes to fp32 after every 32 products instead.

Differences from the reference, all rounding-level: P is quantized against the running max instead of the exact row
max (so a value may round once more, by at most one e4m3 step, relative 2^-4, after rescaling), scales are applied
after the FP8 product instead of to its operands, and exp2 is the hardware approximation. Tests derive their
tolerance from these (tests/kernels/test_attention.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fpsa_kernels.plan import Plan
from fpsa_kernels.quant import QuantizedQKV, round_e4m3

LOG2E = 1.4426950408889634
LOG2_448 = math.log2(448.0)


@triton.jit
def _program_item(item_group, item_row, item_rows, chunk_count, H, mask_sb, mask_sh, mask_sg, C):
    """This program's plan item: (bh, b, h, group, first row, valid rows, offset of its chunk list, chunk count)."""
    item = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = tl.load(item_group + item)
    mask_base = b * mask_sb + h * mask_sh + g * mask_sg  # chunk lists of this (b, h, group); stride 0 broadcasts
    return bh, b, h, g, tl.load(item_row + item), tl.load(item_rows + item), mask_base, tl.load(
        chunk_count + mask_base // C)


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, sq_ptr, sk_ptr, sv_ptr, o_ptr, lse_ptr, m_ptr, l_ptr,
                item_group, item_row, item_rows, chunks, chunk_count,
                H, L, stride_ob, stride_oh, stride_ol,
                mask_sb, mask_sh, mask_sg, C,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, QK_IMPRECISE: tl.constexpr,
                EMULATE_CAST: tl.constexpr, SAVE_STATS: tl.constexpr):
    bh, b, h, g, row0, nrows, mask_base, count = _program_item(item_group, item_row, item_rows, chunk_count, H,
                                                                mask_sb, mask_sh, mask_sg, C)

    rows = row0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([bh, row0, 0]).reshape(BLOCK_M, D)
    sq = tl.load(sq_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=1.0)  # incl. softmax scale · log2 e
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(count):
        packed = tl.load(chunks + mask_base + i)  # (start / 16) << 16 | lo << 8 | hi
        start = (packed >> 16) * 16
        lo = (packed >> 8) & 0xFF
        hi = packed & 0xFF
        k = k_desc.load([bh, start, 0]).reshape(BLOCK_N, D)
        valid = (cols >= lo) & (cols < hi)
        sk = tl.load(sk_ptr + bh.to(tl.int64) * L + start + cols, mask=valid, other=0.0)
        bias = tl.where(valid, 0.0, float("-inf"))
        s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=QK_IMPRECISE)  # (BLOCK_M, BLOCK_N) fp32
        t = s * sk[None, :] + bias[None, :]  # one FMA; u = t · s_q' in log2 units
        m_new = tl.maximum(m_i, tl.max(t, axis=1) * sq)
        # 448 P = 2^(u − m + log2 448) in one FMA per score; the min keeps it <= 448 whatever the rounding
        x = t * sq[:, None] + (8.807354922057604 - m_new)[:, None]
        p = tl.math.exp2(tl.minimum(x, 8.807354922057604))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EMULATE_CAST:
            p8 = round_e4m3(p).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        v = v_desc.load([bh, 0, start]).reshape(D, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v))
        m_i = m_new

    sv = tl.load(sv_ptr + bh * D + tl.arange(0, D))
    out = acc * sv[None, :] / l_i[:, None]  # acc and ℓ both carry the factor 448
    keep = tl.arange(0, BLOCK_M) < nrows
    dst = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(dst + rows[:, None].to(tl.int64) * stride_ol + tl.arange(0, D)[None, :], out.to(tl.bfloat16),
             mask=keep[:, None])
    lse = (m_i + tl.math.log2(l_i) - 8.807354922057604) * 0.6931471805599453
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=keep)
    if SAVE_STATS:  # for the backward (training.py): the row max (log2 units) and ℓ' = 448 ℓ
        tl.store(m_ptr + bh.to(tl.int64) * L + rows, m_i, mask=keep)
        tl.store(l_ptr + bh.to(tl.int64) * L + rows, l_i, mask=keep)


def rows_desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of a contiguous (B·H, L, D) tensor, loading blocks of `rows` rows."""
    bh, seq, d = x.shape
    return TensorDescriptor(x, shape=[bh, seq, d], strides=[seq * d, d, 1], block_shape=[1, rows, d])


def vt_desc(vt8: torch.Tensor, seq: int, cols: int) -> TensorDescriptor:
    """TMA descriptor of V transposed (B·H, D, L_pad), loading blocks of `cols` tokens."""
    bh, d, seq_pad = vt8.shape
    return TensorDescriptor(vt8, shape=[bh, d, seq], strides=[d * seq_pad, seq_pad, 1], block_shape=[1, d, cols])


def mask_strides(plan: Plan, b: int, h: int) -> tuple[int, int, int]:
    """Element strides of (batch, head, group) into the plan's (B|1, H|1, G, C) chunk arrays, and C (a broadcast
    mask has stride 0; the chunk count array (B|1, H|1, G) is indexed by that offset / C)."""
    mb, mh, ng, c = plan.chunks.shape
    if (mb not in (1, b)) or (mh not in (1, h)):
        raise ValueError(f"the plan's mask is for (B, H) = ({mb}, {mh}); the inputs have ({b}, {h})")
    return (0 if mb == 1 else mh * ng * c), (0 if mh == 1 else ng * c), c


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_forward(qkv: QuantizedQKV, plan: Plan, out: torch.Tensor | None = None, num_warps: int = 4,
                      num_stages: int = 2, qk_imprecise_acc: int | None = None,
                      stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward on quantized inputs and a plan: (out bf16 (B, H, L, D), lse fp32 (B, H, L)).

    `stats`: two fp32 (B·H, L) buffers that receive each row's final max m (log2 units, scores · log2 e) and
    ℓ' = 448 ℓ, which the backward needs to recompute P exactly as the reference quantizes it."""
    bh, seq, d = qkv.q8.shape
    b, h = qkv.batch, qkv.heads
    bm, bn = plan.block_m, plan.block_n
    if out is None:
        out = torch.empty(b, h, seq, d, dtype=torch.bfloat16, device=qkv.q8.device)
    lse = torch.empty(b, h, seq, dtype=torch.float32, device=qkv.q8.device)
    q_desc, k_desc = rows_desc(qkv.q8, bm), rows_desc(qkv.k8, bn)
    v_desc = vt_desc(qkv.vt8, seq, bn)
    cs, cc = plan.chunks, plan.chunk_count
    sb, sh, c = mask_strides(plan, b, h)
    grid = (plan.item_group.numel(), bh)
    m_buf, l_buf = stats if stats is not None else (lse, lse)
    _fwd_kernel[grid](q_desc, k_desc, v_desc, qkv.sq, qkv.sk, qkv.sv, out, lse, m_buf, l_buf,
                      plan.item_group, plan.item_row, plan.item_rows, cs, cc,
                      h, seq, out.stride(0), out.stride(1), out.stride(2), sb, sh, c, c,
                      BLOCK_M=bm, BLOCK_N=bn, D=d, QK_IMPRECISE=min(qk_imprecise_acc or d, d),
                      EMULATE_CAST=interpreted(), SAVE_STATS=stats is not None,
                      num_warps=num_warps, num_stages=num_stages)
    return out, lse


DEFAULT_BLOCKS = (64, 128)
"""(BLOCK_M, BLOCK_N) unless the caller asks otherwise: the fastest of scripts/bench_attention.py's sweep on the H100
(64 query rows for one warpgroup, 4 warps, 2 stages: 626 TFLOP/s dense at 480p against 453 for 128×128)."""
HEAD_DIMS = (64, 128)


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot run on `x`'s device (None when it can): Hopper GPUs, or the CPU under the interpreter."""
    if interpreted():
        return None if x.device.type == "cpu" else "TRITON_INTERPRET=1 runs the kernel on CPU tensors only"
    if x.device.type != "cuda":
        return f"the FP8 kernel needs an NVIDIA Hopper GPU (H100/H200); the inputs are on {x.device.type}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major != 9:
        return (f"the FP8 kernel is built for Hopper (compute capability 9.x: H100, H200); "
                f"{torch.cuda.get_device_name(x.device)} is {major}.{minor}")
    return None


_STATIC_PLANS: dict[tuple, Plan] = {}


def plan_for(mask, layout, regime, block_m: int, block_n: int, device, transpose: bool = False) -> Plan:
    """The work plan of `mask` (fps/masks.TileMask, or the KeepMask of `select_keep`); with mask None, the regime's
    static plan (dense or window), cached per layout.

    Nothing here reads the mask on the host (kernels/plan.py `tile_plan`): the plan's arrays are sized by the mask's
    `max_kept`, a bound known without looking (a TileMask's width, a selection's k plus its window), so on a GPU
    building a plan only queues work. A row that keeps no key tile fails a device-side check.

    `transpose`: the plan of the transposed mask (items over key tiles, chunks over the query tiles attending them),
    for the backward's dK/dV kernel; a key tile that no query attends gets an item with no chunks. Any number of
    query tiles may pick the same key tile, so its rows are bounded by the number of tiles only."""
    from fpsa_kernels.plan import dense_plan, tile_plan, tile_spans
    from fpsa_train.fps.masks import token_ranges, window_keep

    def plan_of(mask):
        spans = tile_spans(tuple(token_ranges(layout).tolist()), block_m, block_n, str(device))
        keep = mask.to_dense().to(device)
        if transpose:
            return tile_plan(keep.transpose(-1, -2), spans, spans.num_tiles, allow_empty=True)
        return tile_plan(keep, spans, mask.max_kept)

    if mask is not None:
        return plan_of(mask)
    if regime.pattern not in ("dense", "window"):
        raise ValueError(f"regime {regime.name!r} ({regime.pattern}) selects its tiles from q and k: pass its mask")
    key = (tuple(layout.grid), tuple(layout.tile_shape), regime.pattern, regime.window, block_m, block_n, str(device),
           transpose)
    if key not in _STATIC_PLANS:
        if regime.pattern == "dense":
            _STATIC_PLANS[key] = dense_plan(layout.seq_len, block_m, block_n, device)
        else:
            _STATIC_PLANS[key] = plan_of(window_keep(layout.tile_grid, regime.window, device))
    return _STATIC_PLANS[key]


def fps_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, regime, mask=None, gate=None, *,
                  block_m: int | None = None, block_n: int | None = None, num_warps: int = 4,
                  num_stages: int = 2, qk_imprecise_acc: int | None = None, bwd_blocks: tuple | None = None,
                  bwd_warps: int = 4, bwd_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 tile-sparse attention for one regime of the schedule (DESIGN.md numerics, Hopper), differentiable.

    q, k, v: (B, H, L, D) bf16 (or fp16/fp32), tokens in tile-major order of `layout` (models/token_order.py), any
    strides with a contiguous last dimension; D 64 or 128; any L. `regime` (fps/schedule.py) must quantize; its
    Q/K scale groups, window and top-k are applied as fps/reference.py defines them. `mask` (fps/masks.TileMask or
    KeepMask) is the tile mask to use; None takes the regime's own (dense and window plans are built once per layout
    and cached; top-k masks are selected from q, k by `masks.select_keep`, as the reference's `select_tiles` does,
    and planned with no host read, so the call does not wait for the GPU; a `learned` regime needs its mask given,
    and its selector's `gate` (B, H, N, N), forward value 1, to receive the gate's gradient).

    Returns (out bf16 (B, H, L, D) contiguous, lse fp32 (B, H, L): the natural log-sum-exp of each row's scaled
    scores over its kept keys). Numerics: Q, K → e4m3 with scale amax/448 per group, V → e4m3 per channel
    (pre-pass, `quantize_qkv`); S = Q8·K8ᵀ·s_q·s_k/√D in fp32; online softmax in base 2; P → e4m3 with the fixed
    scale 448; P·V in fp32; O = acc·s_v/ℓ. When grad is enabled and q, k, v or gate require it, the call is an
    autograd op whose backward runs the Triton backward of training.py over the same tile lists (gradients of
    the reference's straight-through definition; `bwd_blocks` = (dQ rows, dQ key chunk, dK/dV key rows, dK/dV query
    chunk)). Raises ValueError for unsupported devices, head dims or regimes.
    """
    from fpsa_kernels.quant import quantize_qkv
    from fpsa_kernels.training import BWD_BLOCKS, FPSAttentionFunction
    from fpsa_train.fps.masks import select_keep

    reason = unsupported_reason(q)
    if reason:
        raise ValueError(reason)
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q must be (B, H, L, D) with D in {HEAD_DIMS}; got shape {tuple(q.shape)}")
    if not regime.quantized:
        raise ValueError(f"regime {regime.name!r} does not quantize (quant: null): the FP8 kernel needs FP8 inputs; "
                         "run unquantized regimes through the reference (fps/reference.py) or dense SDPA")
    if layout.order != "tile":
        raise ValueError("the kernel needs tokens in tile-major order: set model.token_order=tile")
    if mask is None and regime.pattern in ("topk", "window_topk"):  # dense and window plans are static, cached
        mask = select_keep(q, k, layout, regime.topk_of(len(layout.tile_sizes())), regime.window)
    if mask is None and regime.pattern == "learned":
        raise ValueError(f"regime {regime.name!r} is `learned`: pass the selector's mask")
    if gate is not None:
        if mask is None:
            raise ValueError("a gate needs its mask: pass the selector's mask with its gate")
        want = (q.shape[0], q.shape[1], mask.num_kv_tiles, mask.num_kv_tiles)
        if tuple(gate.shape) != want:
            raise ValueError(f"gate must be (B, H, N, N) = {want}; got {tuple(gate.shape)}")
    bm, bn = block_m or DEFAULT_BLOCKS[0], block_n or DEFAULT_BLOCKS[1]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, gate)):
        opts = dict(block_m=bm, block_n=bn, num_warps=num_warps, num_stages=num_stages,
                    qk_imprecise_acc=qk_imprecise_acc, bwd_blocks=tuple(bwd_blocks or BWD_BLOCKS),
                    bwd_warps=bwd_warps, bwd_stages=bwd_stages)
        return FPSAttentionFunction.apply(q, k, v, gate, layout, regime, mask, opts)
    plan = plan_for(mask, layout, regime, bm, bn, q.device)
    qkv = quantize_qkv(q, k, v, layout, regime.quant, q_mult=LOG2E / math.sqrt(q.shape[-1]))
    return attention_forward(qkv, plan, num_warps=num_warps, num_stages=num_stages, qk_imprecise_acc=qk_imprecise_acc)
