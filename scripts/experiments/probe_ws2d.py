"""Experiment (issue 19): does Triton's automatic warp specialisation run the FP8 forward when every operand comes
through 2D/1D TMA descriptors instead of the shipped kernel's 3D ones?

The shipped forward (kernels/attention.py) reads Q, K, Vᵀ through 3D descriptors ([1, rows, D] boxes, reshaped) and
the per-token scales through pointers. With `warp_specialize=True` that kernel fails to compile (a pointer-loaded
per-row vector used in the loop) or, with the scales moved to TMA, dies at launch on the H200 (docs/benchmarks.md,
"Warp specialisation of the forward"). The one warp-specialised probe known to work used 2D descriptors over
(B·H·L, D). This script runs a copy of the forward with exactly that layout: Q, K as (B·H·L, D), Vᵀ as
(B·H·D, L_pad), s_q and s_k as 1D (B·H·L,) descriptors (blocks that run past a head's last token read the next
head's values or TMA's zero fill; those rows are never stored and those keys are masked by the chunk's bias), on the
same plan and quantized inputs, with and without warp specialisation, each configuration in its own process (a
launch failure poisons the CUDA context). It prints, per configuration, TFLOP/s, the speedup over the shipped kernel
and over cuDNN bf16 in the same run, and the error against the shipped kernel's output (both quantize P against a
running max, so they may differ by rounding only).

    python scripts/experiments/probe_ws2d.py [--shape 480p|720p] [--timeout 60]

Status (2026-12-02): written and checked on CPU only: it compiles for sm_90 with warp specialisation (Triton 3.6,
`triton.compile` with a GPUTarget, no GPU needed) and under TRITON_INTERPRET=1 reproduces the shipped kernel's
output exactly on a small dense case; not yet run on a GPU (the session's device time ran out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import SHAPES, TILE, bench  # noqa: E402
from isolated import run_each  # noqa: E402

from fpsa_kernels import dense_plan, quantize_qkv  # noqa: E402
from fpsa_kernels._interpreter import interpreted  # noqa: E402
from fpsa_kernels.attention import attention_forward  # noqa: E402
from fpsa_kernels.numerics import LOG2_448, LOG2E, round_e4m3  # noqa: E402
from fpsa_kernels.plan import program_item  # noqa: E402
from fpsa_train.fps.fp8 import QuantGranularity  # noqa: E402
from fpsa_train.fps.kernel import plan_for, quant_groups  # noqa: E402
from fpsa_train.fps.masks import select_keep  # noqa: E402
from fpsa_train.models.token_order import TokenLayout  # noqa: E402


@triton.jit
def _fwd_2d(q_desc, k_desc, v_desc, sq_desc, sq_ptr, sk_desc, sv_ptr, o_ptr,
            item_group, item_row, item_rows, chunks, chunk_count,
            H, L, stride_ob, stride_oh, stride_ol, mask_sb, mask_sh, mask_sg, C,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, LOG2_CAP: tl.constexpr,
            WS: tl.constexpr, EMULATE_CAST: tl.constexpr, SQ_SCALAR: tl.constexpr):
    bh, b, h, g, row0, nrows, mask_base, count = program_item(item_group, item_row, item_rows, chunk_count, H,
                                                               mask_sb, mask_sh, mask_sg, C)
    q = q_desc.load([bh * L + row0, 0])
    if SQ_SCALAR:  # one scale for the item's rows (tile-aligned items under per-tile or coarser Q scales)
        sq = tl.load(sq_ptr + bh * L + row0)
    else:
        sq = sq_desc.load([bh * L + row0])
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in tl.range(0, count, warp_specialize=WS):
        packed = tl.load(chunks + mask_base + i)
        start = (packed >> 16) * 16
        lo = (packed >> 8) & 0xFF
        hi = packed & 0xFF
        k = k_desc.load([bh * L + start, 0])
        sk = sk_desc.load([bh * L + start])
        s = tl.dot(q, tl.trans(k))
        bias = tl.where((cols >= lo) & (cols < hi), 0.0, float("-inf"))
        if SQ_SCALAR:  # s_q folds into the chunk's key scales: one FMA and one add per score
            t = s * (sk * sq)[None, :] + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(t, axis=1))
            x = t + (LOG2_CAP - m_new)[:, None]
        else:
            t = s * sk[None, :] + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(t, axis=1) * sq)
            x = t * sq[:, None] + (LOG2_CAP - m_new)[:, None]
        p = tl.math.exp2(tl.minimum(x, LOG2_CAP))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([bh * D, start])
        if EMULATE_CAST:  # the interpreter's direct cast misrounds (kernels/numerics.py)
            p8 = round_e4m3(p).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v))
        m_i = m_new
    out = acc * tl.load(sv_ptr + bh * D + tl.arange(0, D))[None, :] / l_i[:, None]
    rows = row0 + tl.arange(0, BLOCK_M)
    dst = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(dst + rows[:, None].to(tl.int64) * stride_ol + tl.arange(0, D)[None, :], out.to(tl.bfloat16),
             mask=(tl.arange(0, BLOCK_M) < nrows)[:, None])


def run_2d(qkv, plan, out, ws: bool, num_warps: int, num_stages: int, sq_scalar: bool = False) -> None:
    bh, seq, d = qkv.q8.shape
    bm, bn = plan.block_m, plan.block_n
    flat = lambda x, rows: TensorDescriptor(x.view(bh * seq, d), [bh * seq, d], [d, 1], [rows, d])  # noqa: E731
    seq_pad = qkv.vt8.shape[-1]
    v_desc = TensorDescriptor(qkv.vt8.view(bh * d, seq_pad), [bh * d, seq], [seq_pad, 1], [d, bn])
    scale = lambda x, n: TensorDescriptor(x.reshape(-1), [bh * seq], [1], [n])  # noqa: E731
    mb, mh, ng, c = plan.chunks.shape
    sb, sh = (0 if mb == 1 else mh * ng * c), (0 if mh == 1 else ng * c)
    _fwd_2d[(plan.item_group.numel(), bh)](
        flat(qkv.q8, bm), flat(qkv.k8, bn), v_desc, scale(qkv.sq, bm), qkv.sq, scale(qkv.sk, bn), qkv.sv, out,
        plan.item_group, plan.item_row, plan.item_rows, plan.chunks, plan.chunk_count,
        qkv.heads, seq, out.stride(0), out.stride(1), out.stride(2), sb, sh, c, c,
        BLOCK_M=bm, BLOCK_N=bn, D=d, LOG2_CAP=LOG2_448.value, WS=ws, EMULATE_CAST=interpreted(), SQ_SCALAR=sq_scalar,
        num_warps=num_warps,
        num_stages=num_stages)


def plans(q, k, layout, cfg: dict):
    """(shipped plan 64×128, probe plan): dense plans ignore tile edges; a `keep` share (1.0 = every tile) gives
    tile-aligned plans of the top-k mask selected from q, k, as the deploy runtime selects them."""
    if cfg.get("keep") is None:
        return dense_plan(q.shape[2], 64, 128, "cuda"), dense_plan(q.shape[2], cfg["block_m"], 128, "cuda")
    n = len(layout.tile_sizes())
    mask = select_keep(q, k, layout, max(1, round(cfg["keep"] * n)))
    return (plan_for(mask, layout, None, 64, 128, q.device), plan_for(mask, layout, None, cfg["block_m"], 128,
                                                                        q.device))


def one(shape: str, cfg: dict) -> dict:
    name, heads, grid = SHAPES[shape]
    layout = TokenLayout(grid, "tile", TILE)
    seq, d = layout.seq_len, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    qkv = quantize_qkv(q, k, v, quant_groups(layout, QuantGranularity("tile"), q.device), q_mult=LOG2E / math.sqrt(d))
    shipped, plan = plans(q, k, layout, cfg)
    flops = 4.0 * heads * seq * seq * d * (1.0 if cfg.get("keep") is None else shipped.useful / (heads * seq * seq))
    res = {"shape": name, **cfg}
    ref, _ = attention_forward(qkv, shipped)
    res["shipped_ms"] = bench(lambda: attention_forward(qkv, shipped))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        res["cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out = torch.empty_like(q)
    run = lambda: run_2d(qkv, plan, out, cfg["ws"], cfg["warps"], cfg["stages"], cfg.get("sq_scalar", False))  # noqa: E731
    run()
    torch.cuda.synchronize()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    res.update(finite=bool(torch.isfinite(out).all()), rel_err_vs_shipped=float(err),
               sqnr_db_vs_shipped=float(-20 * math.log10(max(float(err), 1e-12))))
    res["ms"] = bench(run)
    res.update(tflops=flops / res["ms"] / 1e9, vs_shipped=res["shipped_ms"] / res["ms"],
               vs_cudnn=res["cudnn_ms"] / res["ms"])
    return res


CONFIGS = [dict(block_m=128, warps=4, stages=2, ws=False), dict(block_m=128, warps=4, stages=2, ws=True),
           dict(block_m=64, warps=4, stages=2, ws=True), dict(block_m=128, warps=8, stages=2, ws=True),
           dict(block_m=128, warps=4, stages=2, ws=True, keep=1.0, sq_scalar=True),
           dict(block_m=128, warps=4, stages=2, ws=False, keep=1.0, sq_scalar=True),
           dict(block_m=128, warps=4, stages=2, ws=True, keep=0.25, sq_scalar=True),
           dict(block_m=128, warps=4, stages=2, ws=True, keep=0.25)]
"""`keep`: None = dense plan; a share = the top-k tile-aligned plan (`sq_scalar` is valid only there, per-tile Q
scales); flops then count the kept pairs only (so TFLOP/s compare across plans and vs_cudnn is per call)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.shape, json.loads(args.one))), flush=True)
        return
    run_each(__file__, args.shape, CONFIGS, args.timeout)


if __name__ == "__main__":
    main()
