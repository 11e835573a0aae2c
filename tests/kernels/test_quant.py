"""The quantization pre-pass against fps/fp8.py, bit for bit (CPU: Triton interpreter; GPU: the real kernels), and
against the pre-pass before its rewrite; its GPU division against the IEEE one; the kernels' numeric constants
against the reference's; and its launches compiled for sm_90.

Bit for bit: the fp8 outputs are compared as bytes (so the sign of zero counts) with the reference's rounding of
x / scale, and the scales with the reference's, for every kind of Q/K grouping the framework uses (one scale per
token, a tile, a subtile, 2×2×2 tiles: groups past quant.GROUP_ROWS), at partial groups, lengths that are no
multiple of 16, B > 1 and the strided inputs the model passes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fpsa_kernels import QuantGroups, numerics, quant, quantize_qkv
from fpsa_kernels._interpreter import interpreted
from fpsa_kernels.numerics import round_e4m3
from fpsa_train.fps.fp8 import AMAX_FLOOR, E4M3_MAX, QuantGranularity, qk_scales, v_scales
from fpsa_train.fps.fp8 import round_e4m3 as reference_round
from fpsa_train.fps.kernel import quant_groups
from fpsa_train.models.token_order import TokenLayout

from .helpers import compile_check_lines, make_inputs

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "experiments" / "bench_prepass.py"
_spec = importlib.util.spec_from_file_location("bench_prepass", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # the pre-pass before the rewrite (`before_quantize_qkv`), the compile check

LAYOUT = TokenLayout((3, 5, 7), "tile", (2, 2, 4))  # partial tiles on every axis, L = 105
BIG = TokenLayout((9, 9, 17), "tile", (4, 4, 8))  # L = 1,377; 2×2×2 tiles are 1,024-token groups: chunked
GRANULARITIES = [QuantGranularity("tile"), QuantGranularity("tiles", (2, 2, 2)), QuantGranularity("subtile", (2, 1, 2)),
                 QuantGranularity("token")]
SMALL_BLOCKS = quant.Blocks(token_rows=8, group_rows=8, sub_rows=4, v_rows=16, v_amax_blocks=2)
"""Blocks far smaller than the groups: every tile (16 tokens) is chunked, chunks end mid-group."""


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_inputs(kind: str, batch: int, heads: int, layout: TokenLayout, d: int, seed: int = 1):
    """q, k, v (B, H, L, D) with the strides the model gives them: q a (B, L, H, D) view (wan.py), k and v slices
    of one fused (B, L, 2, H, D) projection."""
    q, k, v = make_inputs(kind, batch, heads, layout, d, seed=seed, device=device())
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) memory
    kv = torch.stack((k, v), 2).transpose(1, 3).contiguous()  # (B, L, 2, H, D) memory
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, L, D) views, token stride 2·H·D
    return q, k, v


def reference_bytes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 bytes (B, H, L, D) of fps/fp8.py's quantization of x with `scale` (broadcasting against x)."""
    return reference_round(x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    bad = got != want
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} bytes differ, e.g. got "
                           f"{got[bad][:6].tolist()} want {want[bad][:6].tolist()}")


def assert_reference(out: quant.QuantizedQKV, q, k, v, layout: TokenLayout, granularity: QuantGranularity,
                     q_mult: float) -> None:
    """Every output of the pre-pass is fps/fp8.py's, bit for bit."""
    b, h, seq, d = q.shape
    for name, x, x8, s, mult in (("q", q, out.q8, out.sq, q_mult), ("k", k, out.k8, out.sk, 1.0)):
        ref_scale = qk_scales(x, layout, granularity, name)  # (B, H, L, 1)
        want = ref_scale * torch.tensor(mult, dtype=torch.float32)  # the kernel multiplies by the fp32 mult
        assert torch.equal(s.view(b, h, seq, 1), want), f"s{name}: {(s.view(b, h, seq, 1) != want).sum()} differ"
        assert_bytes_equal(x8.view(torch.uint8).view(b, h, seq, d), reference_bytes(x, ref_scale), f"{name}8")
    ref_sv = v_scales(v)  # (B, H, 1, D)
    assert torch.equal(out.sv.view(b, h, 1, d), ref_sv), "sv"
    seq_pad = triton.cdiv(seq, 16) * 16
    assert out.vt8.shape == (b * h, d, seq_pad)
    vt = out.vt8.view(torch.uint8)
    assert_bytes_equal(vt[..., :seq].transpose(1, 2).reshape(b, h, seq, d), reference_bytes(v, ref_sv), "vt8")
    assert not vt[..., seq:].any(), "vt8 pad columns are not 0"




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


# ------------------------------------------------------------ the GPU's division (numerics.quotient_rn)
@triton.jit
def _quotient_kernel(x_ptr, s_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = i < n
    tl.store(y_ptr + i, numerics.quotient_rn(tl.load(x_ptr + i, mask=keep, other=0.0),
                                        tl.load(s_ptr + i, mask=keep, other=1.0)), mask=keep)


def _fma_exact(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 fma(a, b, c) = RN(a · b + c) with one rounding: a · b is exact in fp64; the fp64 sum and its error (Knuth's
    TwoSum) are the exact sum, rounded to fp32 once (a tie of the fp64 sum is broken by the error's sign)."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = c.astype(np.float64)
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)  # s + err = p + c exactly
    f = s.astype(np.float32)
    toward = np.nextafter(f, np.where(s > f, np.float32(np.inf), np.float32(-np.inf)))
    tie = (s != f) & (s == (f.astype(np.float64) + toward.astype(np.float64)) / 2)
    away = tie & (((err > 0) & (toward > f)) | ((err < 0) & (toward < f)))
    return np.where(away, toward, f)


@pytest.fixture
def exact_fma(monkeypatch):
    """Under the interpreter, tl.fma with one rounding as on the GPU (the interpreter's rounds twice)."""
    if interpreted():
        from triton.runtime import interpreter

        def create_fma(self, x, y, z):
            return interpreter.TensorHandle(_fma_exact(x.data, y.data, z.data), z.dtype.scalar)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", create_fma)


def quotients(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """numerics.quotient_rn of fp32 x by scale, elementwise, in a Triton kernel."""
    x, scale = x.to(device()), scale.to(device())
    y = torch.empty_like(x)
    _quotient_kernel[(triton.cdiv(x.numel(), 1 << 16),)](x, scale, y, x.numel(), BLOCK=1 << 16)
    return y.cpu()


def check_quotients(x: torch.Tensor, scale: torch.Tensor) -> None:
    """numerics.quotient_rn is the IEEE quotient wherever it matters (|x / scale| >= 2^-10; below, both round to ±0 in
    e4m3, sign included), and the e4m3 bytes of the two are equal everywhere."""
    want, got = x / scale, quotients(x, scale)
    big = want.abs() >= 2.0 ** -10
    assert torch.equal(got[big], want[big]), (x[big][got[big] != want[big]][:6], scale[big][got[big] != want[big]][:6])
    assert_bytes_equal(reference_round(got).to(torch.float8_e4m3fn).view(torch.uint8),
                       reference_round(want).to(torch.float8_e4m3fn).view(torch.uint8), "e4m3(quotient)")


def _all_of(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of a 16-bit float dtype, as fp32."""
    top = 0x7C00 if dtype == torch.float16 else 0x7F80
    return torch.arange(top, dtype=torch.int16).view(dtype).float()


def pairs(values: torch.Tensor, amaxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, scale): for each amax, its scale (fp8.py's: max(amax, floor) / 448) with every ±value up to the amax."""
    xs, scales = [], []
    for amax in amaxes.tolist():
        x = values[values <= amax]
        scale = torch.tensor(amax).float().clamp_min(AMAX_FLOOR) / E4M3_MAX
        xs += [x, -x]
        scales.append(scale.expand(2 * len(x)))
    return torch.cat(xs), torch.cat(scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_division_is_the_ieee_one(exact_fma, dtype):
    """Every value of the dtype against the scales of edge amaxes (zero and below the floor, the smallest normal,
    powers of two, all-ones mantissas, the largest) and of random ones."""
    values = _all_of(dtype)
    g = torch.Generator().manual_seed(0)
    edges = [0.0, 1e-40, AMAX_FLOOR / 2, torch.finfo(dtype).tiny, 1.0, 2.0 ** 7, 1.9921875, 3.0, 448.0,
             float(values[-1]), float(values[-2])]
    amaxes = torch.cat([torch.tensor(edges), values[torch.randint(len(values), (24,), generator=g)]])
    check_quotients(*pairs(values, amaxes))


def test_gpu_division_of_fp32_near_e4m3_ties(exact_fma):
    """fp32 inputs within a few ulps of x / scale landing on e4m3 values and the midpoints between them (where a
    quotient one ulp off would round the other way), and random ones, at scales across the exponent range."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 16
    grid = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # e4m3 values >= 0
    targets = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    scale = (2.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 230 - 120)
             * (1 + torch.rand(n, generator=g, dtype=torch.float64))).float()
    x = (targets[torch.randint(len(targets), (n,), generator=g)] * scale.double()).float()
    steps = torch.randint(-3, 4, (n,), generator=g)
    for _ in range(3):  # up to 3 ulps either way
        x = torch.where(steps != 0, torch.nextafter(x, steps.float() * math.inf), x)
        steps = steps - steps.sign()
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    noise = (torch.randn(n, generator=g) * 50).clamp(-448, 448) * scale
    x, scale = torch.cat([x, noise]), torch.cat([scale, scale])
    keep = x.abs() <= 448 * scale
    check_quotients(x[keep], scale[keep])


@pytest.mark.slow
def test_gpu_division_every_bf16_pair(exact_fma):
    """All ~10^9 pairs of a bf16 value and a bf16 amax at least as large (a few minutes)."""
    values = _all_of(torch.bfloat16)
    for chunk in values.split(256):
        check_quotients(*pairs(values, chunk))


# --------------------------------------------------------------------------------------------------- the pre-pass
@pytest.mark.parametrize("granularity, kind", [(g, "outliers") for g in GRANULARITIES] + [
    (GRANULARITIES[0], kind) for kind in ("normal", "zero_tiles", "large")], ids=lambda x: getattr(x, "group", x))
def test_prepass_equals_the_reference_quantization(granularity, kind):
    """Every grouping on inputs with outlier channels (small values of a large group round to ±0), and tile groups
    on the other kinds of inputs (normal, all-zero tiles, values of 10^4)."""
    b, h, d = 2, 1, 32
    q, k, v = model_inputs(kind, b, h, LAYOUT, d)
    q_mult = numerics.LOG2E / math.sqrt(d)  # as the forwards pass it: inexact in fp32
    out = quantize_qkv(q, k, v, quant_groups(LAYOUT, granularity, q.device), q_mult=q_mult)
    assert_reference(out, q, k, v, LAYOUT, granularity, q_mult)


@pytest.mark.parametrize("granularity", [QuantGranularity("tiles", (2, 2, 2)), QuantGranularity("tile")],
                         ids=lambda g: g.group)
def test_prepass_large_groups(granularity):
    """1,024-token groups (past quant.GROUP_ROWS: two chunks, their amax joined by an atomic max between the two
    launches) and 128-token ones, all partial at the grid's edges."""
    groups = quant_groups(BIG, granularity, device())
    assert groups.max_size == (1024 if granularity.group == "tiles" else 128)
    q, k, v = model_inputs("outliers", 1, 2, BIG, 32)
    out = quantize_qkv(q, k, v, groups, q_mult=0.5)
    assert_reference(out, q, k, v, BIG, granularity, 0.5)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.group)
def test_prepass_with_small_blocks(granularity):
    """Every grouping through blocks smaller than its groups (`SMALL_BLOCKS`): chunks that end inside a group, groups
    of a size no multiple of the block, V's amax over several blocks per program."""
    q, k, v = model_inputs("normal", 2, 1, LAYOUT, 32, seed=3)
    (q8, sq, k8, sk, vt8, sv), launches = quant.plan_prepass(q, k, v, quant_groups(LAYOUT, granularity, q.device),
                                                              0.5, SMALL_BLOCKS)
    for launch in launches:
        launch()
    assert_reference(quant.QuantizedQKV(q8, k8, vt8, sq, sk, sv, 2, 1), q, k, v, LAYOUT, granularity, 0.5)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.group)
def test_prepass_equals_the_one_before(granularity):
    """Byte for byte the pre-pass before the rewrite (commit 0d0e7bf, in scripts/experiments/bench_prepass.py), but
    for the sign of zero: it made +0 of negative values that round to zero, the reference (and now the pre-pass)
    keeps -0 (0x80)."""
    q, k, v = model_inputs("outliers", 1, 1, LAYOUT, 32, seed=4)
    q[0, 0, :3, 1] = -1e-7  # rounds to -0 whatever the groups
    groups = quant_groups(LAYOUT, granularity, q.device)
    new, before = quantize_qkv(q, k, v, groups, 0.3), bench.before_quantize_qkv(q, k, v, groups, 0.3)
    assert bench.differences(new, before, signed_zeros=False) == []
    assert bench.differences(new, before) != [], "no value rounded to -0: the case tests less than it says"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_prepass_of_other_input_dtypes(dtype):
    """fp32 and fp16 inputs (fps_attention takes them): the amax of their bits, 32 bits wide for fp32."""
    q, k, v = (x.to(dtype) for x in model_inputs("outliers", 1, 2, LAYOUT, 32, seed=6))
    granularity = QuantGranularity("tile")
    out = quantize_qkv(q, k, v, quant_groups(LAYOUT, granularity, q.device), q_mult=0.5)
    assert_reference(out, q, k, v, LAYOUT, granularity, 0.5)


def test_quantize_qk_and_v_alone_are_the_pre_pass():
    q, k, v = model_inputs("normal", 1, 1, LAYOUT, 32, seed=5)
    groups = quant_groups(LAYOUT, QuantGranularity("tile"), q.device)
    out = quantize_qkv(q, k, v, groups, 0.5)
    for x, x8, s, mult in ((q, out.q8, out.sq, 0.5), (k, out.k8, out.sk, 1.0)):
        y8, t = quant.quantize_qk(x, groups, mult)
        assert torch.equal(y8.view(torch.uint8), x8.view(torch.uint8)) and torch.equal(t, s)
    vt8, sv = quant.quantize_v(v)
    assert torch.equal(vt8.view(torch.uint8), out.vt8.view(torch.uint8)) and torch.equal(sv, out.sv)


def test_all_zero_groups_get_the_floor_scale_and_zeros():
    q, k, v = (torch.zeros(1, 2, LAYOUT.seq_len, 64, dtype=torch.bfloat16, device=device()) for _ in range(3))
    q[0, 1, 5, 7] = -0.0  # -0 quantizes to -0 (0x80), as the reference's rounding has it
    out = quantize_qkv(q, k, v, quant_groups(LAYOUT, QuantGranularity("tile"), q.device))
    for x8, s in ((out.q8, out.sq), (out.k8, out.sk)):
        assert torch.all(x8.float() == 0) and torch.all(s == AMAX_FLOOR / E4M3_MAX)
    assert out.q8.view(torch.uint8)[1, 5, 7] == 0x80
    assert torch.all(out.vt8.float() == 0) and torch.isfinite(out.sv).all() and torch.all(out.sv > 0)


def test_prepass_rejects_a_wrong_layout():
    q = torch.zeros(1, 1, LAYOUT.seq_len + 1, 64, device=device())
    with pytest.raises(ValueError, match="tokens"):
        quantize_qkv(q, q, q, quant_groups(LAYOUT, QuantGranularity("tile"), q.device))


def test_quant_groups_know_their_largest_group():
    assert QuantGroups(10).max_size == 1
    groups = QuantGroups.from_ids(torch.tensor([0, 2, 2, 1, 2, 0]), 4)  # group 3 is empty
    assert groups.max_size == 3 and groups.offsets.tolist() == [0, 2, 3, 6, 6]


# ------------------------------------------------------------------------------------------------ sm_90 compiles
def compile_checks(shapes: str, granularities: str) -> list[dict]:
    """bench_prepass.py --compile-only (it asserts no spills, the hardware cast and 16-byte loads itself), in a
    process without TRITON_INTERPRET (tests/conftest.py sets it on CPU hosts; the interpreter's helpers break
    compiles)."""
    infos, returncode, failure = compile_check_lines(BENCH, "--compile-only", "--shapes", shapes, "--granularities",
                                                     granularities, timeout=900)
    assert returncode == 0, failure
    return infos

def test_prepass_compiles_for_sm90():
    """The 480p launches of 2×2×2 tiles: chunked, so both launches run every kind of item but whole groups (the slow
    test below compiles those, and every other launch)."""
    infos = compile_checks("480p", "tiles")
    assert [i["kernel"] for i in infos] == ["_first_kernel", "_second_kernel"]


@pytest.mark.slow
def test_prepass_compiles_for_sm90_every_launch():
    infos = compile_checks("480p,720p", "token,tile,subtile,tiles")
    assert {i["granularity"] for i in infos} == {"token", "tile", "subtile", "tiles"}
