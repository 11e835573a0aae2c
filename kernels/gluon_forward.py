"""The FP8 attention forward as an explicit warp-specialised Hopper kernel in Gluon (Triton 3.6), for inference.

Same inputs (`quantize_qkv`), same plan arrays and the same arithmetic per score as the Triton forward
(attention.py, whose docstring is the numerics' spec), with the schedule made explicit instead of left to Triton's
pipeliner (docs/kernel_plan_gluon.md is the design, docs/benchmarks.md the measurements):

- a **loader** partition (1 warp, few registers) decodes the plan item, loads Q once and streams K and Vᵀ tiles by
  TMA into a ring of `STAGES` shared-memory buffers, with separate ready/empty mbarriers for K and for V, so that
  Q·K_{i+1}ᵀ can start while P_i·V_i still holds V_i; it also puts each chunk's s_k into shared memory, so the
  consumers' loop does no global load but the next chunk's plan entry, loaded an iteration ahead;
- one or two **consumer** partitions (4 warps = one warpgroup each, or one 8-warp partition) do Q·Kᵀ by wgmma (both
  operands in shared memory), the softmax in registers (per-row s_q, per-key s_k, the 448 cap, ℓ from the
  unquantized P), cast P to e4m3 with round-to-nearest-even and do P·V by wgmma with P in registers (the "RS"
  form): Q·Kᵀ, wait, softmax, P·V, wait per chunk; two consumers share the ring and run unordered.

Schedules measured on the H200 and removed as slower or no faster (docs/benchmarks.md, "The Gluon forward"; the code
is in git): FA3's intra-warpgroup overlap (chunk i's Q·Kᵀ with chunk i−1's P·V; it spills, commit 2a5f1f8),
ping-pong of the two consumers on mbarrier turns around their Q·Kᵀ (2a5f1f8) or around both GEMMs of a step
(`_bundled_loop`, commit f7eb8d1).

The key loop reads the plan's packed chunk list (`(start / 16) << 16 | lo << 8 | hi`, count from `chunk_count`), so
sparse plans run the same code (columns outside [lo, hi) get bias −∞, only on chunks that have such columns with
`EDGE_MASK`). Q, K are read through 2D descriptors over (B·H·L, D) and Vᵀ over (B·H·D, L): rows past a head's end
belong to the next head (finite, never stored; their key columns get P = 0 exactly) or are zero-filled by TMA.

`VARIANTS` names the schedules measured; `DEFAULT_VARIANT` is the fastest of them on the H200. Limits: D = 128,
Hopper only, no CPU interpreter (Gluon has none), no saved statistics (so no backward: training runs the Triton
forward). `gluon_forward(qkv, plan)` runs it; `fp8_attention(..., config=KernelConfig(forward="gluon"))` picks it.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fpsa_kernels.numerics import LN2, LOG2_448
from fpsa_kernels.plan import Plan, mask_strides
from fpsa_kernels.quant import QuantizedQKV

LOG2_CAP = LOG2_448  # P' = 448 P is capped at 448, the e4m3 maximum


@gluon.jit
def _item(item_group, item_row, item_rows, chunk_count, H, mask_sb, mask_sh, mask_sg, C):
    """This CTA's plan item, as the shipped kernel decodes it (`_program_item` / `program_item`): (bh, b, h, first row,
    valid rows, offset of its chunk list, chunk count)."""
    item = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    g = gl.load(item_group + item)
    mask_base = b * mask_sb + h * mask_sh + g * mask_sg
    return bh, b, h, gl.load(item_row + item), gl.load(item_rows + item), mask_base, gl.load(
        chunk_count + mask_base // C)


@gluon.jit
def _decode(packed):
    """(first key, first valid column, end of valid columns) of a packed chunk entry."""
    return (packed >> 16) * 16, (packed >> 8) & 0xFF, packed & 0xFF


@gluon.jit
def _next_entry(chunks, mask_base, i, count):
    """Chunk i's packed entry, clamped to the last one: loaded an iteration ahead of its use, so its latency hides
    under the current chunk's work (a load in the chunk's own iteration put ~1 µs of latency on every chunk)."""
    return gl.load(chunks + mask_base + gl.minimum(i, count - 1))


@gluon.jit
def _masked(s, sk, lo, hi, col_l: gl.constexpr):
    """S·s_k + bias: bias 0 on the valid columns [lo, hi), −∞ elsewhere."""
    cols = gl.arange(0, s.shape[1], layout=col_l)
    return s * sk[None, :] + gl.where((cols >= lo) & (cols < hi), 0.0, float("-inf"))[None, :]


@gluon.jit
def _softmax(s, sk, lo, hi, sq, m_i, l_i, EDGE_MASK: gl.constexpr, p_op: gl.constexpr, col_l: gl.constexpr):
    """One chunk's online softmax in log2 units, exactly `_fwd_kernel`'s arithmetic: (e4m3 P' in the A-operand
    layout of P·V, new row max, new ℓ', α = 2^(m_old − m_new)). `sk` is 0 outside the chunk's valid columns
    [lo, hi) (the loader zero-fills it); there the bias is −∞."""
    if EDGE_MASK:
        if (lo == 0) & (hi == s.shape[1]):  # no masked column in this chunk: + 0 would change nothing
            t = s * sk[None, :]
        else:
            t = _masked(s, sk, lo, hi, col_l)
    else:
        t = _masked(s, sk, lo, hi, col_l)
    m_new = gl.maximum(m_i, gl.max(t, axis=1) * sq)
    x = t * sq[:, None] + (LOG2_CAP - m_new)[:, None]
    p = gl.exp2(gl.minimum(x, LOG2_CAP))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    p8 = gl.convert_layout(p.to(gl.float8e4nv, fp_downcast_rounding="rtne"), p_op)
    return p8, m_new, l_i, alpha


@gluon.jit
def _qk(q, k, s_l: gl.constexpr, QK_IMPRECISE: gl.constexpr):
    """Issue S = Q·Kᵀ (async, both operands in shared memory; K is K-major, so Kᵀ is a permuted view).

    QK_IMPRECISE = 0: no promotion inside the 128 products of a chunk, Triton's default for FP8 on sm_90. It is the
    same arithmetic as the shipped kernel's max_num_imprecise_acc = 128 = D (one partial sum of all 128 products, then
    added to a zero accumulator, which is exact) without the second 64-register accumulator that value costs."""
    BM: gl.constexpr = q.shape[0]
    BN: gl.constexpr = k.shape[0]
    zero = gl.zeros([BM, BN], gl.float32, layout=s_l)
    if QK_IMPRECISE == 0:
        tok = warpgroup_mma(q, k.permute((1, 0)), zero, use_acc=False, is_async=True)
    else:
        tok = warpgroup_mma(q, k.permute((1, 0)), zero, use_acc=False, max_num_imprecise_acc=QK_IMPRECISE,
                            is_async=True)
    return tok


@gluon.jit
def _consumer(WG: gl.constexpr, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty,
              sq_ptr, sv_ptr, o_ptr, lse_ptr, chunks, bh, b, h, row0, nrows, mask_base, count, L,
              stride_ob, stride_oh, stride_ol, QK_IMPRECISE: gl.constexpr, EDGE_MASK: gl.constexpr):
    """Rows [WG·BM, WG·BM + BM) of the item: Q·Kᵀ, softmax, P·V over the chunk list, then O = acc·s_v/ℓ' and lse.
    The loop does no global load of its own but the next chunk's packed entry (for lo, hi): K, Vᵀ and the chunk's
    s_k come through shared memory from the loader."""
    BM: gl.constexpr = q_s.type.shape[1]
    D: gl.constexpr = q_s.type.shape[2]
    ST: gl.constexpr = k_s.type.shape[0]
    BN: gl.constexpr = k_s.type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, D, 32])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_l)
    col_s: gl.constexpr = gl.SliceLayout(0, s_l)
    row_o: gl.constexpr = gl.SliceLayout(1, o_l)
    col_o: gl.constexpr = gl.SliceLayout(0, o_l)

    base = bh.to(gl.int64) * L
    rows = row0 + WG * BM + gl.arange(0, BM, layout=row_s)
    sq = gl.load(sq_ptr + base + rows, mask=rows < L, other=1.0)  # incl. softmax scale · log2 e
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BM], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BM, D], gl.float32, layout=o_l)
    q = q_s.index(WG)
    mbarrier.wait(q_ready.index(WG), 0)

    packed = _next_entry(chunks, mask_base, 0, count)
    # Q·Kᵀ, wait, softmax, P·V, wait (the loader runs ahead by the ring)
    for i in range(count):
        st = i % ST
        phase = (i // ST) & 1
        _, lo, hi = _decode(packed)
        packed = _next_entry(chunks, mask_base, i + 1, count)
        mbarrier.wait(k_ready.index(st), phase)
        s_tok = _qk(q, k_s.index(st), s_l, QK_IMPRECISE)
        sk = sk_s.index(st).load(col_s)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(st), count=1)  # K and s_k of this stage are read
        p8, m_i, l_i, alpha = _softmax(s, sk, lo, hi, sq, m_i, l_i, EDGE_MASK, p_op, col_s)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        mbarrier.wait(v_ready.index(st), phase)
        o_tok = warpgroup_mma(p8, v_s.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index(st), count=1)

    sv = gl.load(sv_ptr + bh * D + gl.arange(0, D, layout=col_o))
    out = acc * sv[None, :] / gl.convert_layout(l_i, row_o)[:, None]  # acc and ℓ' both carry the factor 448
    local = WG * BM + gl.arange(0, BM, layout=row_o)
    dst = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    gl.store(dst + (row0 + local)[:, None].to(gl.int64) * stride_ol + gl.arange(0, D, layout=col_o)[None, :],
             out.to(gl.bfloat16), mask=(local < nrows)[:, None])
    lse = (m_i + gl.log2(l_i) - LOG2_CAP) * LN2
    local_s = WG * BM + gl.arange(0, BM, layout=row_s)
    gl.store(lse_ptr + base + row0 + local_s, lse, mask=local_s < nrows)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty,
            sk_ptr, chunks, bh, row0, mask_base, count, L):
    """One warp: Q once (a box per consumer), then per chunk K and its s_k (0 outside the chunk's valid columns) on
    k_ready and Vᵀ on v_ready of ring stage i % ST, once every consumer has released that stage (empties count one
    arrival per consumer). k_ready completes on two arrivals: the TMA's expect (with its bytes) and the loader's
    own after it stored s_k (the compiler syncs the warp before a partition's mbarrier arrive). The next entry and
    the s_k of this chunk are loaded before the waits, so their latency hides under them."""
    NC: gl.constexpr = q_s.type.shape[0]
    BM: gl.constexpr = q_s.type.shape[1]
    D: gl.constexpr = q_s.type.shape[2]
    ST: gl.constexpr = k_s.type.shape[0]
    BN: gl.constexpr = k_s.type.shape[1]
    cols = gl.arange(0, BN, layout=gl.BlockedLayout([BN // 32], [32], [1], [0]))
    base = bh.to(gl.int64) * L
    packed = _next_entry(chunks, mask_base, 0, count)
    for w in gl.static_range(NC):
        mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [bh * L + row0 + w * BM, 0], q_ready.index(w), q_s.index(w))
    for i in range(count):
        st = i % ST
        phase = ((i // ST) & 1) ^ 1  # the first pass over the ring waits on fresh barriers: passes at once
        start, lo, hi = _decode(packed)
        packed = _next_entry(chunks, mask_base, i + 1, count)
        sk = gl.load(sk_ptr + base + start + cols, mask=(cols >= lo) & (cols < hi), other=0.0)
        mbarrier.wait(k_empty.index(st), phase)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [bh * L + start, 0], k_ready.index(st), k_s.index(st))
        sk_s.index(st).store(sk)
        mbarrier.arrive(k_ready.index(st), count=1)
        mbarrier.wait(v_empty.index(st), phase)
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [bh * D, start], v_ready.index(st), v_s.index(st))


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, sq_ptr, sk_ptr, sv_ptr, o_ptr, lse_ptr,
                     item_group, item_row, item_rows, chunks, chunk_count,
                     H, L, stride_ob, stride_oh, stride_ol, mask_sb, mask_sh, mask_sg, C,
                     CONSUMERS: gl.constexpr, STAGES: gl.constexpr, QK_IMPRECISE: gl.constexpr,
                     EDGE_MASK: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """One CTA per (plan item, batch·head). The item has CONSUMERS × (Q box rows) rows."""
    bh, b, h, row0, nrows, mask_base, count = _item(item_group, item_row, item_rows, chunk_count, H,
                                                    mask_sb, mask_sh, mask_sg, C)
    q_s = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_s = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    sk_s = gl.allocate_shared_memory(gl.float32, [STAGES, k_desc.block_type.shape[0]],
                                     gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(CONSUMERS):
        mbarrier.init(q_ready.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=2)  # the TMA's expect + the loader's s_k
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)
        mbarrier.init(v_empty.index(s), count=CONSUMERS)

    # The partitions' argument tuples are written out in the call: a tuple bound to a name first turns its
    # constexpr elements into runtime values (Triton 3.6), and WG, QK_IMPRECISE, ... must stay constexpr.
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (0, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty, sq_ptr, sv_ptr,
                         o_ptr, lse_ptr, chunks, bh, b, h, row0, nrows, mask_base, count, L, stride_ob, stride_oh,
                         stride_ol, QK_IMPRECISE, EDGE_MASK)),
            (_consumer, (1, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty, sq_ptr, sv_ptr,
                         o_ptr, lse_ptr, chunks, bh, b, h, row0, nrows, mask_base, count, L, stride_ob, stride_oh,
                         stride_ol, QK_IMPRECISE, EDGE_MASK)),
            (_loader, (q_desc, k_desc, v_desc, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty, sk_ptr,
                       chunks, bh, row0, mask_base, count, L)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty, sq_ptr, sv_ptr,
                         o_ptr, lse_ptr, chunks, bh, b, h, row0, nrows, mask_base, count, L, stride_ob, stride_oh,
                         stride_ol, QK_IMPRECISE, EDGE_MASK)),
            (_loader, (q_desc, k_desc, v_desc, q_s, k_s, v_s, sk_s, q_ready, k_ready, k_empty, v_ready, v_empty, sk_ptr,
                       chunks, bh, row0, mask_base, count, L)),
        ], [1], [LOADER_REGS])

# ----------------------------------------------------------------------------------------------------- variants
VARIANTS = {
    "ws1_m64_s2": dict(consumers=1, rows=64, warps=4, stages=2, maxnreg=240),
    "ws1_m64_s3": dict(consumers=1, rows=64, warps=4, stages=3, maxnreg=240),
    "ws1_m64_s2_r128": dict(consumers=1, rows=64, warps=4, stages=2, maxnreg=128),
    "coop_m128_s2": dict(consumers=1, rows=128, warps=8, stages=2, maxnreg=168),
    "two_m128_s2": dict(consumers=2, rows=64, warps=4, stages=2, maxnreg=168),
    "two_m128_s3": dict(consumers=2, rows=64, warps=4, stages=3, maxnreg=168),
    "two_m128_s4": dict(consumers=2, rows=64, warps=4, stages=4, maxnreg=168),
}
"""`rows`: query rows per consumer partition (its Q box); the plan item has consumers × rows. `warps`: warps of the
default partition (consumer 0); a second consumer is a 4-warp worker, the loader a 1-warp worker (it still takes a
warpgroup's registers). `maxnreg`: the register cap at launch (12 warps × 168 ≤ 64 K registers; setmaxnreg then
moves the loader down to LOADER_REGS and the consumers up to ~232-240)."""
LOADER_REGS = 32  # 24 (FA3's) spills 4 B in the loader that decodes chunks (two-consumer variants)
CONSUMER_REGS = 240


def block_m(variant: str) -> int:
    v = VARIANTS[variant]
    return v["consumers"] * v["rows"]


def constexprs(variant: str, qk_imprecise: int = 128, edge_mask: bool = True) -> dict:
    """`qk_imprecise`: as attention_forward's (promote Q·Kᵀ to fp32 every N products); N >= D = 128 is the default
    and becomes QK_IMPRECISE = 0 (see `_qk`)."""
    v = VARIANTS[variant]
    return dict(CONSUMERS=v["consumers"], STAGES=v["stages"],
                QK_IMPRECISE=0 if qk_imprecise >= 128 else qk_imprecise,
                EDGE_MASK=edge_mask, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS)


def launch_options(variant: str) -> dict:
    v = VARIANTS[variant]
    return dict(num_warps=v["warps"], **({"maxnreg": v["maxnreg"]} if v.get("maxnreg") else {}))


def _smem_layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)


def descriptors(q8, k8, vt8, seq: int, rows: int, block_n: int = 128):
    """Gluon TMA descriptors: Q and K as (B·H·L, D) with boxes of `rows` / `block_n` rows, Vᵀ as (B·H·D, L) (row
    stride L_pad, TMA zero-fills columns ≥ L) with boxes of D × block_n."""
    bh, _, d = q8.shape
    seq_pad = vt8.shape[-1]
    flat = lambda x, r: TensorDescriptor(x.reshape(bh * seq, d), [bh * seq, d], [d, 1], [r, d],  # noqa: E731
                                         _smem_layout([r, d]))
    v_desc = TensorDescriptor(vt8.reshape(bh * d, seq_pad), [bh * d, seq], [seq_pad, 1], [d, block_n],
                              _smem_layout([d, block_n]))
    return flat(q8, rows), flat(k8, block_n), v_desc


def run_gluon(qkv, plan, out, lse, variant: str, qk_imprecise: int = 128, edge_mask: bool = True) -> None:
    """The forward of `variant` on quantized inputs and a plan of block_m = block_m(variant), block_n = 128, into
    out (B, H, L, D) bf16 and lse (B·H·L) fp32."""
    bh, seq, d = qkv.q8.shape
    if variant not in VARIANTS:
        raise ValueError(f"unknown Gluon forward variant {variant!r}; choose from {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    if plan.block_m != block_m(variant) or plan.block_n != 128 or d != 128:
        raise ValueError(f"the Gluon forward ({variant}) needs a plan of {block_m(variant)}×128 and D = 128; got a "
                         f"plan of {plan.block_m}×{plan.block_n} and D = {d}")
    q_desc, k_desc, v_desc = descriptors(qkv.q8, qkv.k8, qkv.vt8, seq, v["rows"])
    sb, sh, c = mask_strides(plan, qkv.batch, qkv.heads)
    gluon_fwd_kernel[(plan.item_group.numel(), bh)](
        q_desc, k_desc, v_desc, qkv.sq, qkv.sk, qkv.sv, out, lse,
        plan.item_group, plan.item_row, plan.item_rows, plan.chunks, plan.chunk_count,
        qkv.heads, seq, out.stride(0), out.stride(1), out.stride(2), sb, sh, c, c,
        **constexprs(variant, qk_imprecise, edge_mask), **launch_options(variant))


DEFAULT_VARIANT = "two_m128_s2"
"""The fastest variant measured (docs/benchmarks.md, "Gluon forward"): two consumer warpgroups of 64 rows,
unordered, a 2-stage ring; its plans are 128 × 128."""


def gluon_forward(qkv: QuantizedQKV, plan: Plan, out: torch.Tensor | None = None,
                  variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Gluon forward (`variant`, None: DEFAULT_VARIANT) on quantized inputs and a plan of
    block_m(variant) × 128: (out bf16 (B, H, L, D), lse fp32 (B, H, L)), as attention.attention_forward returns
    them."""
    variant = DEFAULT_VARIANT if variant is None else variant
    bh, seq, d = qkv.q8.shape
    if out is None:
        out = torch.empty(qkv.batch, qkv.heads, seq, d, dtype=torch.bfloat16, device=qkv.q8.device)
    lse = torch.empty(qkv.batch, qkv.heads, seq, dtype=torch.float32, device=qkv.q8.device)
    run_gluon(qkv, plan, out, lse, variant)
    return out, lse
