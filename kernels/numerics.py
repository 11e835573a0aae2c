"""The numbers and the jit math that the forward and the backward share, each defined once.

The kernels implement DESIGN.md's numerics (the PyTorch reference, fps/reference.py in the training framework, is
the specification; tests/kernels check these constants against fps/fp8.py's). Triton reads a module-level number
inside `@triton.jit` code only when it is a `tl.constexpr`, so the ones the jit code reads are constexprs (read one
on the host with `.value`); the host-only ones are plain floats.

The softmax runs in base 2 against a running row max m (log2 units) with P held as P' = 448 P, so that P' is
already the e4m3 value to round (the fixed scale 448 of DESIGN.md step 5):

    t  = S8 · s_k + bias                          one FMA; bias −∞ off a chunk's valid columns (`key_scaled`)
    P' = 2^min(t · s_q' + (log2 448 − m), log2 448)    one FMA, a min and exp2; s_q' = s_q · softmax scale · log2 e
    P8 = e4m3(P')                                 (`p_from_scores`)

The min caps P' at 448: the row max is taken over rounded products and the FMA uses the unrounded one, so without
it an exponent could exceed log2 448 by a rounding error (at logits of 1e8, by several units) and saturate while ℓ'
counted it whole. The forward takes m as the running max, the backward as the forward's final one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
"""Largest finite float8_e4m3fn value (1.75 · 2^8): the saturation bound, the divisor of amax in every scale, and
the fixed scale of P."""
AMAX_FLOOR = E4M3_MAX.value * torch.finfo(torch.float32).tiny
"""amax floor: scale = max(amax, floor) / 448 is never below the smallest normal fp32, never 0, NaN or Inf."""
LOG2E = math.log2(math.e)
"""log2 e: the pre-pass folds it into the query scale (s_q' = s_q · softmax scale · log2 e) for the base-2 softmax."""
LN2 = tl.constexpr(math.log(2.0))
"""ln 2 = 1 / log2 e: back from base-2 units (the natural lse; dK, whose q̂ carried log2 e through s_q')."""
LOG2_448 = tl.constexpr(math.log2(448.0))
"""log2 448: P' = 448 P = 2^(u − m + log2 448), and the cap on that exponent."""
RNE_MAGIC = tl.constexpr(1.5 * 2.0 ** 23)
"""1.5 · 2^23: (v + M) − M rounds |v| < 2^22 to an integer, ties to even, in fp32."""


@triton.jit
def round_e4m3(x):
    """fp32 → the nearest e4m3 value (ties to even, subnormals, saturating at ±448), still fp32."""
    x = tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX)
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # binade [2^exp, 2^(exp+1))
    shift = tl.maximum(exp, -6) - 3  # e4m3 spacing there is 2^shift; subnormals keep 2^-9
    up = ((127 - shift) << 23).to(tl.float32, bitcast=True)  # 2^-shift, exact
    down = ((127 + shift) << 23).to(tl.float32, bitcast=True)  # 2^shift
    v = x * up  # |v| <= 16: the rounding below is the only inexact step
    v = (v + RNE_MAGIC) - RNE_MAGIC
    return v * down


@triton.jit
def key_scaled(s, s_k, bias, QUERY_ROWS: tl.constexpr):
    """t = S8 · s_k + bias, fp32, in one FMA per score. `QUERY_ROWS`: s is (queries, keys), so s_k runs along the
    columns; else sᵀ (keys, queries), s_k along the rows. `bias` (0 or −∞) runs along the columns either way."""
    if QUERY_ROWS:
        t = s * s_k[None, :] + bias[None, :]
    else:
        t = s * s_k[:, None] + bias[None, :]
    return t


@triton.jit
def p_from_scores(t, s_q, m, QUERY_ROWS: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """(P' = 448 P fp32, e4m3(P') float8) of key-scaled scores t against the row max m (log2 units); s_q is s_q'
    (softmax scale · log2 e included), s_q and m run along the queries (rows when `QUERY_ROWS`, else columns).

    `EMULATE_CAST`: round in fp32 (`round_e4m3`) before the cast, for Triton's interpreter, whose direct cast rounds
    some values across a binade wrongly; on the GPU the hardware cast rounds to nearest even."""
    shift = -m + LOG2_448  # = log2 448 − m exactly; a constexpr left of a tensor breaks Triton's interpreter
    if QUERY_ROWS:
        x = t * s_q[:, None] + shift[:, None]
    else:
        x = t * s_q[None, :] + shift[None, :]
    p = tl.math.exp2(tl.minimum(x, LOG2_448))
    if EMULATE_CAST:
        p8 = round_e4m3(p).to(tl.float8e4nv)
    else:
        p8 = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return p, p8
