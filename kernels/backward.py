"""The Triton backward of the FP8 tile-sparse attention, over the forward's tile lists and their transpose.

The gradient is the reference's autograd (fps/reference.py), written out. Per row i and kept key j, with
q̂, k̂, v̂ the fake-quantized inputs, s = q̂·k̂/√D, m the exact row max, p = exp(s − m), ℓ = Σ p and
P̂ = e4m3(448 p)/448 (quantized against the row max, as the reference does):

    O = Σ_j P̂_ij v̂_j / ℓ_i                          forward (attention.py)
    dv̂_j = Σ_i (P̂_ij / ℓ_i) dO_i                    through the P quantization's straight-through estimator
    dS_ij = (p_ij / ℓ_i) · (dO_i · v̂_j − Δ_i)        Δ_i = dO_i · O_i (the ℓ term), P unquantized here
    dq̂_i = Σ_j dS_ij k̂_j / √D,  dk̂_j = Σ_i dS_ij q̂_i / √D
    dgate_uv = Σ_{i ∈ u, j ∈ v} dS_ij                 the learned selector's gate (forward value 1) multiplies p

The straight-through estimators of the Q/K/V roundings pass the gradient where |x/scale| <= 464: with scales
from the group amax every element is within 448·(1 + 2^-23) of it, so they pass everything and dq = dq̂. P is at
most 448 after scaling, so its estimator passes everything too.

Two kernels, none holding more than a block of scores (no L² buffer anywhere), both rounding dO ∘ s_v to bf16 the
same way for dP = (dO ∘ s_v)·V8ᵀ (recomputed per block rather than stored, to stay within dense SDPA's memory):
- `_bwd_dq_kernel`: one program per query item of the forward's plan, two passes over its key chunks: the first
  computes Δ_i = Σ_j (P̂_ij/ℓ_i)·dP_ij (= dO_i·O_i, the reference's definition, from the same rounded dP that the
  second pass uses, so rounding errors common to a row cancel in dP − Δ); the second dQ and the gate gradient;
- `_bwd_dkdv_kernel`: one program per key item of the transposed plan (items over key tiles, chunks over the
  query tiles that attend them), looping over query chunks (dK, dV), with the Δ the dQ kernel wrote.
Each recomputes S with the FP8 product of the saved Q8, K8 and scales and P against the forward's final row max m
and ℓ (saved by the forward), so P̂ is quantized as the reference quantizes it. The other products run in bf16
with fp32 accumulation: dP = (dO ∘ s_v)·V8ᵀ, P̂/ℓ · dO, dS·k̂ and dSᵀ·q̂ (dS·s_k and dS·s_q' rounded to bf16;
the FP8 operands are exact in bf16). The tests derive their tolerance from those roundings
(tests/kernels/grad_reference.py). Why the Δ pass: taking Δ from the bf16 output, as FlashAttention does, made dQ
15-25% wrong on video-like inputs (keys sharing a large component, dQ a small difference of large terms); with it
the error is that of the bf16 operands alone (measured in the note of issue 6 and docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fpsa_kernels._interpreter import interpreted
from fpsa_kernels.config import KernelConfig
from fpsa_kernels.numerics import LN2, key_scaled, p_from_scores
from fpsa_kernels.plan import Plan, chunk_of, mask_strides, program_item
from fpsa_kernels.quant import QuantizedQKV, rows_desc, vt_desc


@triton.jit
def _scale_do(do, sv):
    """dO ∘ s_v rounded to bf16, so dO·v̂ = (dO ∘ s_v)·V8: the same rounding in both kernels (no buffer for it)."""
    return (do.to(tl.float32) * sv[None, :]).to(tl.bfloat16)


@triton.jit
def _probabilities(s, s_q, s_k, bias, m, inv_l, QUERY_ROWS: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """(448 P̂ as fp8, P/ℓ) of a block of FP8 scores, P against the final row max m (log2 units), by the forward's
    math (numerics.py). `QUERY_ROWS`: s is (queries, keys); else sᵀ (keys, queries)."""
    p, p8 = p_from_scores(key_scaled(s, s_k, bias, QUERY_ROWS), s_q, m, QUERY_ROWS, EMULATE_CAST)  # p = 448 P
    if QUERY_ROWS:
        pn = p * inv_l[:, None]
    else:
        pn = p * inv_l[None, :]
    return p8, pn


@triton.jit
def _dq_chunk(q_desc, k_desc, v_desc, chunks, i, q, dos, sq, m, inv_l, sk_ptr, bh, BLOCK_N: tl.constexpr,
              D: tl.constexpr, QK_IMPRECISE: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """One key chunk of a dQ program: (start, valid columns, K8, s_k, 448 P̂ fp8, P/ℓ, dP = dO·v̂ᵀ)."""
    start, lo, hi = chunk_of(chunks, i)
    cols = tl.arange(0, BLOCK_N)
    valid = (cols >= lo) & (cols < hi)
    k = k_desc.load([bh, start, 0]).reshape(BLOCK_N, D)
    sk = tl.load(sk_ptr + start + cols, mask=valid, other=0.0)
    s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=QK_IMPRECISE)
    p8, pn = _probabilities(s, sq, sk, tl.where(valid, 0.0, float("-inf")), m, inv_l, True, EMULATE_CAST)
    v = v_desc.load([bh, 0, start]).reshape(D, BLOCK_N).to(tl.bfloat16)
    return start, valid, k, sk, p8, pn, tl.dot(dos, v)  # dP (BLOCK_M, BLOCK_N): dO_i · v̂_j


@triton.jit
def _bwd_dq_kernel(q_desc, k_desc, v_desc, do_ptr, sq_ptr, sk_ptr, sv_ptr, m_ptr, l_ptr, delta_ptr, dq_ptr,
                   dgate_ptr, tile_of_ptr, item_group, item_row, item_rows, chunks, chunk_count, H, L, N,
                   mask_sb, mask_sh, mask_sg, C,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, QK_IMPRECISE: tl.constexpr,
                   EMULATE_CAST: tl.constexpr, GATE: tl.constexpr, INV_SQRT_D: tl.constexpr):
    bh, b, h, g, row0, nrows, mask_base, count = program_item(item_group, item_row, item_rows, chunk_count, H,
                                                                mask_sb, mask_sh, mask_sg, C)

    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    own = r < nrows  # rows past the item (the next tile's) contribute nothing, also not to the gate gradient
    base = bh.to(tl.int64) * L
    q = q_desc.load([bh, row0, 0]).reshape(BLOCK_M, D)
    sq = tl.load(sq_ptr + base + rows, mask=own, other=1.0)
    m = tl.load(m_ptr + base + rows, mask=own, other=0.0)
    inv_l = tl.where(own, 1.0 / tl.load(l_ptr + base + rows, mask=own, other=1.0), 0.0)
    d = tl.arange(0, D)
    do = tl.load(do_ptr + (base + rows[:, None]) * D + d[None, :], mask=own[:, None], other=0.0)
    dos = _scale_do(do, tl.load(sv_ptr + bh * D + d))
    cols = tl.arange(0, BLOCK_N)
    # pass 1: Δ_i = dO_i · O_i = Σ_j (P̂_ij / ℓ_i) dP_ij from the same rounded dP as pass 2, so rounding errors
    # common to a row cancel in dP − Δ (taking Δ from the bf16 output instead costs dQ up to ~20% on video-like
    # inputs, where the keys share a large component and dQ is a small difference)
    delta = tl.zeros([BLOCK_M], tl.float32)
    for i in range(count):
        start, valid, k, sk, p8, _, dp = _dq_chunk(q_desc, k_desc, v_desc, chunks + mask_base, i, q, dos, sq, m,
                                                   inv_l, sk_ptr + base, bh, BLOCK_N, D, QK_IMPRECISE, EMULATE_CAST)
        delta += tl.sum(p8.to(tl.float32) * dp, axis=1) * inv_l
    tl.store(delta_ptr + base + rows, delta, mask=own)
    # pass 2: dS = P/ℓ · (dP − Δ), dQ = dS · k̂ / √D
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(count):
        start, valid, k, sk, _, pn, dp = _dq_chunk(q_desc, k_desc, v_desc, chunks + mask_base, i, q, dos, sq, m,
                                                   inv_l, sk_ptr + base, bh, BLOCK_N, D, QK_IMPRECISE, EMULATE_CAST)
        ds = pn * (dp - delta[:, None])
        dq += tl.dot((ds * sk[None, :]).to(tl.bfloat16), k.to(tl.bfloat16))
        if GATE:  # one sum per kept (query tile g, key tile) pair; a chunk may span several key tiles
            tiles = tl.load(tile_of_ptr + start + cols, mask=valid, other=0)
            dst = dgate_ptr + bh.to(tl.int64) * N * N + g * N + tiles
            tl.atomic_add(dst, tl.sum(ds, axis=0), mask=valid)
    dq = dq * INV_SQRT_D  # dq̂ = Σ dS k̂ / √D with k̂ = K8 s_k
    tl.store(dq_ptr + (base + rows[:, None]) * D + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=own[:, None])


@triton.jit
def _bwd_dkdv_kernel(q_desc, k_desc, do_desc, vt_ptr, sq_ptr, sk_ptr, sv_ptr, m_ptr, l_ptr, delta_ptr, dk_ptr,
                     dv_ptr, item_group, item_row, item_rows, chunks, chunk_count, H, L, L_pad,
                     mask_sb, mask_sh, mask_sg, C,
                     BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr, QK_IMPRECISE: tl.constexpr,
                     EMULATE_CAST: tl.constexpr):
    bh, b, h, g, row0, nrows, mask_base, count = program_item(item_group, item_row, item_rows, chunk_count, H,
                                                                mask_sb, mask_sh, mask_sg, C)

    r = tl.arange(0, BLOCK_K)
    keys = row0 + r
    own = r < nrows
    base = bh.to(tl.int64) * L
    d = tl.arange(0, D)
    k = k_desc.load([bh, row0, 0]).reshape(BLOCK_K, D)
    sk = tl.load(sk_ptr + base + keys, mask=own, other=0.0)
    v8 = tl.load(vt_ptr + bh.to(tl.int64) * D * L_pad + d[:, None] * L_pad + keys[None, :], mask=own[None, :],
                 other=0.0)  # (D, BLOCK_K): this item's keys are fixed, so V is read once, by pointer
    v8 = tl.trans(v8).to(tl.bfloat16)  # (BLOCK_K, D), exact
    sv = tl.load(sv_ptr + bh * D + d)
    cols = tl.arange(0, BLOCK_Q)
    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    for i in range(count):
        start, lo, hi = chunk_of(chunks + mask_base, i)
        valid = (cols >= lo) & (cols < hi)
        q = q_desc.load([bh, start, 0]).reshape(BLOCK_Q, D)
        sq = tl.load(sq_ptr + base + start + cols, mask=valid, other=1.0)
        m = tl.load(m_ptr + base + start + cols, mask=valid, other=0.0)
        inv_l = tl.where(valid, 1.0 / tl.load(l_ptr + base + start + cols, mask=valid, other=1.0), 0.0)
        delta = tl.load(delta_ptr + base + start + cols, mask=valid, other=0.0)
        do = do_desc.load([bh, start, 0]).reshape(BLOCK_Q, D)
        dos = _scale_do(do, sv)
        st = tl.dot(k, tl.trans(q), max_num_imprecise_acc=QK_IMPRECISE)  # (BLOCK_K, BLOCK_Q) = Sᵀ
        p8, pn = _probabilities(st, sq, sk, tl.where(valid, 0.0, float("-inf")), m, inv_l, False, EMULATE_CAST)
        dv += tl.dot((p8.to(tl.float32) * inv_l[None, :]).to(tl.bfloat16), do)  # P̂/ℓ (448s cancel) · dO
        dpt = tl.dot(v8, tl.trans(dos))  # (BLOCK_K, BLOCK_Q): v̂_j · dO_i, rounded as in the dQ kernel
        dst = pn * (dpt - delta[None, :])
        dk += tl.dot((dst * sq[None, :]).to(tl.bfloat16), q.to(tl.bfloat16))
    dk = dk * LN2  # s_q' carries softmax scale · log2 e: q̂/√D = Q8 s_q' / log2 e = Q8 s_q' ln 2
    offs = (base + keys[:, None]) * D + d[None, :]
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=own[:, None])
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=own[:, None])


def attention_backward(qkv: QuantizedQKV, dout: torch.Tensor, m: torch.Tensor, ell: torch.Tensor,
                       plan_q: Plan, plan_kv: Plan, grad_dtype: torch.dtype, gate_tiles: torch.Tensor | None = None,
                       num_warps: int = KernelConfig.bwd_warps, num_stages: int = KernelConfig.bwd_stages,
                       qk_imprecise_acc: int | None = KernelConfig.qk_imprecise_acc):
    """(dq, dk, dv (B, H, L, D) in grad_dtype, dgate fp32 (B, H, N, N) or None) for the forward's outputs.

    dout: the output's gradient (B, H, L, D); m, ell: the forward's saved stats (B·H, L);
    plan_q: plan over query items (the forward's kind); plan_kv: plan of the transposed mask (key items, query
    chunks); gate_tiles: int32 (L,) tile of every token when the gate gradient is wanted (sparse plans only)."""
    bh, seq, d = qkv.q8.shape
    b, h = qkv.batch, qkv.heads
    dev = qkv.q8.device
    dout = dout.to(torch.bfloat16).contiguous().reshape(bh, seq, d)
    delta = torch.empty(bh, seq, dtype=torch.float32, device=dev)  # written by the dQ kernel, read by dK/dV
    dq, dk, dv = (torch.empty(b, h, seq, d, dtype=grad_dtype, device=dev) for _ in range(3))
    imprecise = min(qk_imprecise_acc or d, d)
    common = dict(num_warps=num_warps, num_stages=num_stages)

    bm, bn = plan_q.block_m, plan_q.block_n
    q_desc, k_desc, v_desc = rows_desc(qkv.q8, bm), rows_desc(qkv.k8, bn), vt_desc(qkv.vt8, seq, bn)
    n_tiles = 0
    dgate = None
    if gate_tiles is not None:
        n_tiles = int(plan_q.chunks.shape[2])
        dgate = torch.zeros(b, h, n_tiles, n_tiles, dtype=torch.float32, device=dev)
    sb, sh, c = mask_strides(plan_q, b, h)
    _bwd_dq_kernel[(plan_q.item_group.numel(), bh)](
        q_desc, k_desc, v_desc, dout, qkv.sq, qkv.sk, qkv.sv, m, ell, delta, dq,
        dgate if dgate is not None else delta, gate_tiles if gate_tiles is not None else plan_q.item_group,
        plan_q.item_group, plan_q.item_row, plan_q.item_rows, plan_q.chunks, plan_q.chunk_count, h, seq, n_tiles,
        sb, sh, c, c, BLOCK_M=bm, BLOCK_N=bn, D=d, QK_IMPRECISE=imprecise, EMULATE_CAST=interpreted(),
        GATE=dgate is not None, INV_SQRT_D=1.0 / math.sqrt(d), **common)

    bk, bq = plan_kv.block_m, plan_kv.block_n
    kk_desc, qq_desc, do_desc = rows_desc(qkv.k8, bk), rows_desc(qkv.q8, bq), rows_desc(dout, bq)
    sb, sh, c = mask_strides(plan_kv, b, h)
    _bwd_dkdv_kernel[(plan_kv.item_group.numel(), bh)](
        qq_desc, kk_desc, do_desc, qkv.vt8, qkv.sq, qkv.sk, qkv.sv, m, ell, delta, dk, dv,
        plan_kv.item_group, plan_kv.item_row, plan_kv.item_rows, plan_kv.chunks, plan_kv.chunk_count, h, seq,
        qkv.vt8.shape[-1], sb, sh, c, c, BLOCK_K=bk, BLOCK_Q=bq, D=d, QK_IMPRECISE=imprecise,
        EMULATE_CAST=interpreted(), **common)
    return dq, dk, dv, dgate
