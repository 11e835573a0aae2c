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

The pre-pass's e4m3 quantization (quant.py) is here too: `scale_of` (max(amax, floor) / 448) and `quantize_e4m3`
(x / scale rounded once, then to the e4m3 grid; on the GPU by `quotient_rn`, the IEEE quotient from FMAs).
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


@triton.jit
def quantize_e4m3(x, scale, EMULATE_CAST: tl.constexpr):
    """e4m3(x / scale): x in its dtype, scale fp32 > 0 (a scalar, or shaped to broadcast against x); the quotient
    is the IEEE one (rounded to nearest), then rounded to nearest even on the e4m3 grid, saturating at ±448.

    Under the interpreter: `tl.div_rn` and the spelled-out rounding (`round_e4m3`), which needs the sign of a zero
    put back. On the GPU, `div.rn.f32` per element costs a reciprocal, a range check and the call of a slow path
    (whose registers make a block of 128 elements a thread spill), so the same quotient comes from the scale's
    reciprocal (`quotient_rn`), and the hardware cast (`cvt.rn.satfinite`) rounds."""
    if EMULATE_CAST:
        y = tl.div_rn(x.to(tl.float32), scale)
        return with_sign_of(round_e4m3(y), y).to(tl.float8e4nv)  # its (v + M) − M rounds −0 (and −tiny) to +0
    else:
        return quotient_rn(x.to(tl.float32), scale).to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def with_sign_of(y, x):
    """|y| with x's sign (fp32): a zero keeps the sign its quotient had, as the reference's cast keeps it (0x80)."""
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return ((y.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quotient_rn(x, scale):
    """RN(x / scale), the IEEE quotient of fp32 x by a normal fp32 scale > 0 where |x| <= 448 (1 + 2^-23) · scale
    (x in the scale's group), in FMAs: Markstein's correction of x · RN(1 / scale), twice.

    With scale = b · 2^e, b in [1, 2), both sides are scaled by 2^-e (exact) so that the reciprocal r = RN(1 / b) and
    the remainders stay normal. q0 = RN(x · r) is within 1.5 ulp of x / b, so its remainder x − q0 · b (one FMA) is
    nearly exact and q1 = RN(q0 + rem · r) within an ulp; the remainder of q1 is then exact, and RN(q1 + rem · r) is
    the correctly rounded quotient (Markstein's theorem: r within half an ulp of 1 / b, q1 within an ulp of x / b).
    Quotients too small for that (x · 2^-e subnormal) are below 2^-100: they round to ±0 in e4m3 whatever their
    last bits, and the result takes x's sign, as the quotient has it. Checked against the IEEE division for every
    bf16 x and the scale of every bf16 amax (tests/kernels/test_quant.py)."""
    bits = scale.to(tl.int32, bitcast=True)
    b = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # scale / 2^e
    xs = x * ((254 - (bits >> 23)) << 23).to(tl.float32, bitcast=True)  # x · 2^-e
    r = tl.div_rn(1.0, b)
    q = xs * r
    q = tl.fma(tl.fma(-q, b, xs), r, q)
    q = tl.fma(tl.fma(-q, b, xs), r, q)
    return with_sign_of(q, x)  # a correction turns −0 into −0 + +0 = +0


@triton.jit
def scale_of(amax, FLOOR: tl.constexpr):
    """The reference's scale of an amax: max(amax, floor) / 448, an IEEE division in fp32."""
    return tl.div_rn(tl.maximum(amax, FLOOR), E4M3_MAX)
