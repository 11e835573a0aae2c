"""The quantization pre-pass against fps/fp8.py, bit for bit (CPU: Triton interpreter; GPU: the real kernels), and
the kernels' numeric constants against the reference's."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fpsa_kernels import numerics, quantize_qkv
from fpsa_kernels.numerics import round_e4m3
from fpsa_train.fps.fp8 import AMAX_FLOOR, E4M3_MAX, QuantGranularity
from fpsa_train.fps.fp8 import quantize_qk as reference_qk
from fpsa_train.fps.fp8 import quantize_v as reference_v
from fpsa_train.fps.fp8 import round_e4m3 as reference_round
from fpsa_train.fps.kernel import quant_groups
from fpsa_train.models.token_order import TokenLayout

from .helpers import make_inputs

LAYOUT = TokenLayout((3, 5, 7), "tile", (2, 2, 4))  # partial tiles on every axis
GRANULARITIES = [QuantGranularity("tile"), QuantGranularity("tiles", (2, 2, 2)), QuantGranularity("subtile", (2, 1, 2)),
                 QuantGranularity("token")]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_kernel_constants_are_the_references():
    """The kernel package defines its own numbers (it imports nothing of the framework): they must be fp8.py's."""
    assert numerics.E4M3_MAX.value == E4M3_MAX and numerics.AMAX_FLOOR == AMAX_FLOOR
    assert numerics.LOG2_448.value == math.log2(E4M3_MAX)
    assert numerics.LOG2E == 1 / math.log(2) and numerics.LN2.value == math.log(2)
    assert numerics.RNE_MAGIC.value == 1.5 * 2 ** 23


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, round_e4m3(x).to(tl.float8e4nv).to(tl.float32), mask=i < n)


def test_round_e4m3_matches_the_reference_cast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 14, generator=g) * torch.exp(torch.randn(1 << 14, generator=g) * 4)
    grid = reference_round(torch.linspace(-448, 448, 4001))  # e4m3 values
    special = torch.tensor([448.0, 449.0, 464.0, 465.0, 1e6, -1e6, 0.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10,
                            2.0 ** -6, 2.0 ** -7 + 2.0 ** -10, 1e-30, 31.0, 30.0, 15.5])
    ties = (torch.arange(64) * 2.0 ** -9 + 2.0 ** -10)  # half-way between subnormals: ties to even
    mids = (grid[1:] + grid[:-1]) / 2  # half-way between neighbours across binades
    x = torch.cat([x, special, -special, ties, mids]).to(device())
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = reference_round(x)
    assert torch.equal(y, expected), (x[y != expected][:8], y[y != expected][:8], expected[y != expected][:8])


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.group)
@pytest.mark.parametrize("kind", ["normal", "outliers", "zero_tiles", "large"])
def test_prepass_equals_the_reference_quantization(granularity, kind):
    b, h, d = 2, 3, 32
    q, k, v = make_inputs(kind, b, h, LAYOUT, d, seed=1, device=device())
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D), as the model passes it
    out = quantize_qkv(q, k, v, quant_groups(LAYOUT, granularity, q.device), q_mult=0.5)
    for name, x, x8, s, mult in (("q", q, out.q8, out.sq, 0.5), ("k", k, out.k8, out.sk, 1.0)):
        ref, ref_scale = reference_qk(x, LAYOUT, granularity)
        scale = s.view(b, h, -1, 1) / mult
        assert torch.equal(scale, ref_scale), name
        assert torch.equal(x8.float().view(b, h, -1, d) * scale, ref), name
    ref_v, ref_sv = reference_v(v)
    seq = LAYOUT.seq_len
    assert out.vt8.shape == (b * h, d, 112) and torch.all(out.vt8[..., seq:].float() == 0)  # L=105 padded to 16s
    assert torch.equal(out.sv.view(b, h, 1, d), ref_sv)
    assert torch.equal(out.vt8[..., :seq].float().transpose(1, 2).reshape(b, h, seq, d) * ref_sv, ref_v)


def test_all_zero_groups_get_the_floor_scale_and_zeros():
    q, k, v = (torch.zeros(1, 2, LAYOUT.seq_len, 64, dtype=torch.bfloat16, device=device()) for _ in range(3))
    out = quantize_qkv(q, k, v, quant_groups(LAYOUT, QuantGranularity("tile"), q.device))
    for x8, s in ((out.q8, out.sq), (out.k8, out.sk)):
        assert torch.all(x8.float() == 0) and torch.all(s == AMAX_FLOOR / E4M3_MAX)
    assert torch.all(out.vt8.float() == 0) and torch.isfinite(out.sv).all() and torch.all(out.sv > 0)


def test_prepass_rejects_a_wrong_layout():
    q = torch.zeros(1, 1, LAYOUT.seq_len + 1, 64, device=device())
    with pytest.raises(ValueError, match="tokens"):
        quantize_qkv(q, q, q, quant_groups(LAYOUT, QuantGranularity("tile"), q.device))
