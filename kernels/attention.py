"""FP8 tile-sparse attention (Triton, Hopper): the forward kernel, its launcher, the autograd op and `fp8_attention`.

The numerics are DESIGN.md's, as the PyTorch reference (fps/reference.py in the training framework) defines them.
One program owns `BLOCK_M` query rows of one query group (plan.py) for one (batch, head) and loops over the group's
key chunks of `BLOCK_N` keys, each a TMA load of K (B·H, L, D) and of V transposed (B·H, D, L_pad):

    S   = (Q8 · K8ᵀ) · s_k · s_q'                     fp32 accumulation; s_q' = s_q · softmax_scale · log2(e)
    P'  = 2^(S − m + log2 448) = 448 P               online softmax in base 2 against the running row max m
    ℓ'  = ℓ' · 2^(m_old − m) + Σ P'                   fp32, from the unquantized P (ℓ' = 448 ℓ)
    acc = acc · 2^(m_old − m) + e4m3(P') · V8         fp32 accumulation
    O   = acc · s_v / ℓ'  (bf16),  lse = ln 2 · (m + log2 ℓ' − log2 448)

Per score that is two FMAs (s·s_k + bias, then t·s_q' + (log2 448 − m)), a min, exp2 and the FP8 cast, written once
for the forward and the backward (numerics.py `key_scaled` and `p_from_scores`, which explains the min). The bias is
−∞ for a chunk's columns outside its valid range [lo, hi) (before or after a run of kept tiles), so masking is free.
FP8 Q·Kᵀ on Hopper accumulates in the tensor cores' reduced precision by default (about 14 bits, Triton's
`max_num_imprecise_acc`); `qk_imprecise_acc=32` promotes to fp32 after every 32 products instead.

Differences from the reference, all rounding-level: P is quantized against the running max instead of the exact row
max (so a value may round once more, by at most one e4m3 step, relative 2^-4, after rescaling), scales are applied
after the FP8 product instead of to its operands, and exp2 is the hardware approximation. Tests derive their
tolerance from these (tests/kernels/test_attention.py).

The package takes tensors, scale groups (quant.py `QuantGroups`) and plans (plan.py): which tiles a regime keeps,
and the plans and scale groups of a token layout, are the training framework's business (its fps/kernel.py, which
calls `fp8_attention`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import triton
import triton.language as tl

from fpsa_kernels._interpreter import interpreted
from fpsa_kernels.backward import attention_backward
from fpsa_kernels.config import KernelConfig
from fpsa_kernels.numerics import LN2, LOG2_448, LOG2E, key_scaled, p_from_scores
from fpsa_kernels.plan import Plan, chunk_of, mask_strides, program_item
from fpsa_kernels.quant import QuantGroups, QuantizedQKV, quantize_qkv, rows_desc, vt_desc

HEAD_DIMS = (64, 128)

Planner = Callable[[int, int, bool], Plan]
"""(block_m, block_n, transpose) → the Plan of one mask at those blocks; with transpose, the plan of the transposed
mask (items over key tiles, chunks over the query tiles attending them: the backward's dK/dV kernel)."""


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, sq_ptr, sk_ptr, sv_ptr, o_ptr, lse_ptr, m_ptr, l_ptr,
                item_group, item_row, item_rows, chunks, chunk_count,
                H, L, stride_ob, stride_oh, stride_ol,
                mask_sb, mask_sh, mask_sg, C,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, QK_IMPRECISE: tl.constexpr,
                EMULATE_CAST: tl.constexpr, SAVE_STATS: tl.constexpr):
    bh, b, h, g, row0, nrows, mask_base, count = program_item(item_group, item_row, item_rows, chunk_count, H,
                                                               mask_sb, mask_sh, mask_sg, C)

    rows = row0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([bh, row0, 0]).reshape(BLOCK_M, D)
    sq = tl.load(sq_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=1.0)  # incl. softmax scale · log2 e
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(count):
        start, lo, hi = chunk_of(chunks + mask_base, i)
        k = k_desc.load([bh, start, 0]).reshape(BLOCK_N, D)
        valid = (cols >= lo) & (cols < hi)
        sk = tl.load(sk_ptr + bh.to(tl.int64) * L + start + cols, mask=valid, other=0.0)
        bias = tl.where(valid, 0.0, float("-inf"))
        s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=QK_IMPRECISE)  # (BLOCK_M, BLOCK_N) fp32
        t = key_scaled(s, sk, bias, True)  # u = t · s_q' in log2 units
        m_new = tl.maximum(m_i, tl.max(t, axis=1) * sq)
        p, p8 = p_from_scores(t, sq, m_new, True, EMULATE_CAST)  # 448 P against the running max, and its e4m3
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([bh, 0, start]).reshape(D, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v))
        m_i = m_new

    sv = tl.load(sv_ptr + bh * D + tl.arange(0, D))
    out = acc * sv[None, :] / l_i[:, None]  # acc and ℓ both carry the factor 448
    keep = tl.arange(0, BLOCK_M) < nrows
    dst = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(dst + rows[:, None].to(tl.int64) * stride_ol + tl.arange(0, D)[None, :], out.to(tl.bfloat16),
             mask=keep[:, None])
    lse = (m_i + tl.math.log2(l_i) - LOG2_448) * LN2
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=keep)
    if SAVE_STATS:  # for the backward (backward.py): the row max (log2 units) and ℓ' = 448 ℓ
        tl.store(m_ptr + bh.to(tl.int64) * L + rows, m_i, mask=keep)
        tl.store(l_ptr + bh.to(tl.int64) * L + rows, l_i, mask=keep)


def attention_forward(qkv: QuantizedQKV, plan: Plan, out: torch.Tensor | None = None,
                      num_warps: int = KernelConfig.num_warps, num_stages: int = KernelConfig.num_stages,
                      qk_imprecise_acc: int | None = KernelConfig.qk_imprecise_acc,
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


def quantized(q, k, v, groups: QuantGroups) -> QuantizedQKV:
    """The pre-pass as every forward takes it: Q's scales carry the softmax scale 1/√D and log2 e (base-2 scores)."""
    return quantize_qkv(q, k, v, groups, q_mult=LOG2E / math.sqrt(q.shape[-1]))


class FP8AttentionFunction(torch.autograd.Function):
    """Autograd op: the forward kernel (saving m and ℓ) and the backward kernels (backward.py). See `fp8_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, gate, groups, plan, planner, gate_tiles, config):
        b, h, seq, d = q.shape
        qkv = quantized(q, k, v, groups)
        stats = torch.empty(2, b * h, seq, dtype=torch.float32, device=q.device)
        out, lse = attention_forward(qkv, plan, num_warps=config.num_warps, num_stages=config.num_stages,
                                     qk_imprecise_acc=config.qk_imprecise_acc, stats=(stats[0], stats[1]))
        ctx.save_for_backward(qkv.q8, qkv.k8, qkv.vt8, qkv.sq, qkv.sk, qkv.sv, stats)
        ctx.args = (b, h, q.dtype, plan, planner, config)
        ctx.gate_tiles = None if gate is None else gate_tiles.to(torch.int32)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q8, k8, vt8, sq, sk, sv, stats = ctx.saved_tensors
        b, h, dtype, plan, planner, config = ctx.args
        bm, bn, bk, bq = config.bwd_blocks
        # the forward's plan when the blocks agree (the defaults do): a dynamic mask's plan is built once
        same = (plan.block_m, plan.block_n) == (bm, bn)
        plan_q = plan if same else planner(bm, bn, False)
        plan_kv = planner(bk, bq, True)
        dq, dk, dv, dgate = attention_backward(
            QuantizedQKV(q8, k8, vt8, sq, sk, sv, b, h), dout, stats[0], stats[1], plan_q, plan_kv, dtype,
            gate_tiles=ctx.gate_tiles, num_warps=config.bwd_warps, num_stages=config.bwd_stages,
            qk_imprecise_acc=config.qk_imprecise_acc)
        return dq, dk, dv, dgate, None, None, None, None, None


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


def check_supported(q: torch.Tensor) -> None:
    """Raise ValueError where the kernel cannot take q: its device (`unsupported_reason`) or its shape."""
    reason = unsupported_reason(q)
    if reason:
        raise ValueError(reason)
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q must be (B, H, L, D) with D in {HEAD_DIMS}; got shape {tuple(q.shape)}")


GLUON_BLOCK = 128
"""The Gluon forward's plan blocks (block_m = block_n; gluon_forward.DEFAULT_VARIANT's two warpgroups of 64 rows)."""


def _gluon_call(q, k, v, groups: QuantGroups, plan: Plan, variant: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference forward by the Gluon kernel (KernelConfig.forward = "gluon"), after checking what it needs."""
    if interpreted():
        raise ValueError("forward='gluon' needs a Hopper GPU: Gluon has no CPU interpreter (use forward='triton' "
                         "under TRITON_INTERPRET=1)")
    if q.shape[-1] != 128:
        raise ValueError(f"forward='gluon' supports head dim 128 only; got {q.shape[-1]} (use forward='triton')")
    from fpsa_kernels.gluon_forward import gluon_forward

    return gluon_forward(quantized(q, k, v, groups), plan, variant=variant)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: QuantGroups, plan: Plan | Planner,
                  gate: torch.Tensor | None = None, gate_tiles: torch.Tensor | None = None,
                  config: KernelConfig = KernelConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 tile-sparse attention over the tile pairs of a plan (DESIGN.md numerics, Hopper), differentiable.

    q, k, v: (B, H, L, D) bf16 (or fp16/fp32), any strides with a contiguous last dimension; D 64 or 128; any L.
    `groups`: which tokens share a Q/K scale (`QuantGroups`). `plan`: a `Plan` (plan.py: `dense_plan`, `sparse_plan`
    of a tile mask), whose blocks the forward runs at; or a `Planner`, called at config's forward blocks and, in
    training, at its backward blocks and for the transposed mask. `gate` (B, H, N, N), forward value 1, multiplies
    each kept tile pair's P (a learned selector's) to receive its gradient; `gate_tiles` int (L,): the tile of every
    token, N tiles.

    Returns (out bf16 (B, H, L, D) contiguous, lse fp32 (B, H, L): the natural log-sum-exp of each row's scaled
    scores over its kept keys). Numerics: Q, K → e4m3 with scale amax/448 per group, V → e4m3 per channel
    (pre-pass, `quantize_qkv`); S = Q8·K8ᵀ·s_q·s_k/√D in fp32; online softmax in base 2; P → e4m3 with the fixed
    scale 448; P·V in fp32; O = acc·s_v/ℓ. When grad is enabled and q, k, v or gate require it, the call is an
    autograd op whose backward runs the Triton backward (backward.py) over the same tile lists: the gradients of the
    reference's straight-through definition; that needs a Planner. An inference call runs the forward that
    `config.forward` names (the Gluon one plans at 128 × 128). Raises ValueError for unsupported devices, head
    dims, or a training call without a Planner or without gate_tiles for its gate.
    """
    check_supported(q)
    if gate is not None and gate_tiles is None:
        raise ValueError("a gate needs gate_tiles, the tile of every token, to sum its gradient per tile pair")
    planner = None if isinstance(plan, Plan) else plan
    training = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, gate))
    if config.forward == "gluon" and not training:
        plan = plan if planner is None else planner(GLUON_BLOCK, GLUON_BLOCK, False)
        return _gluon_call(q, k, v, groups, plan, config.gluon_variant)
    forward_plan = plan if planner is None else planner(config.block_m, config.block_n, False)
    if training:
        if planner is None:
            raise ValueError("training needs a Planner, not a Plan: the backward plans the transposed mask (and its "
                             "own blocks, config.bwd_blocks)")
        return FP8AttentionFunction.apply(q, k, v, gate, groups, forward_plan, planner, gate_tiles, config)
    return attention_forward(quantized(q, k, v, groups), forward_plan, num_warps=config.num_warps,
                             num_stages=config.num_stages, qk_imprecise_acc=config.qk_imprecise_acc)

