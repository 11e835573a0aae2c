"""FP8 e4m3 fake quantization: bit-exact rounding, SQNR floors, straight-through gradients, group ids."""

import math

import pytest
import torch

from fpsa_train.fps.masks import token_tiles
from fpsa_train.fps.fp8 import (
    AMAX_FLOOR,
    E4M3_MAX,
    QuantGranularity,
    RangeStats,
    e4m3_range_stats,
    fake_quant_e4m3,
    group_scales,
    quantize_p,
    quantize_qk,
    quantize_v,
    qkv_range_stats,
    round_e4m3_emulated as round_e4m3,  # the spelled-out rounding; the fast cast path is checked below
    round_e4m3 as round_e4m3_cast,
    sqnr_db,
    token_group_ids,
)
from fpsa_train.models.token_order import TokenLayout

LAYOUT = TokenLayout(grid=(5, 6, 9), order="tile", tile_shape=(2, 4, 4))  # partial edge tiles on every axis
OUTLIER_CHANNELS = [3, 17, 40]
SQNR_FLOOR_DB = 25.0


def torch_cast(x: torch.Tensor) -> torch.Tensor:
    """The contract: torch's float8 cast of the input clamped to ±448 (saturation, never NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def assert_bit_identical(x: torch.Tensor) -> None:
    out, ref = round_e4m3(x), torch_cast(x)
    assert out.dtype == torch.float32
    bad = out != ref
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. x={x[bad][:5].tolist()} -> {out[bad][:5].tolist()}, " \
                          f"cast gives {ref[bad][:5].tolist()}"
    assert torch.equal(torch.signbit(out), torch.signbit(ref)), "sign of zero differs from the cast"


def e4m3_values() -> torch.Tensor:
    """All 254 finite e4m3 values (both zeros included), from the 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[~values.isnan()]


def gaussian(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, LAYOUT.seq_len, 64, generator=torch.Generator().manual_seed(seed))  # (B, H, L, D)


def heavy_tailed(seed: int = 0) -> torch.Tensor:
    """Student-t (df=3) with a few outlier channels scaled ×20, as seen in Q/K/V activations."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 2, 3, LAYOUT.seq_len, 64, generator=g)  # (4, B, H, L, D)
    x = z[0] / (z[1:].square().sum(0) / 3).sqrt()  # (B, H, L, D): t = N(0,1) / sqrt(chi2_3 / 3)
    x[..., OUTLIER_CHANNELS] *= 20
    return x


# ---------------------------------------------------------------- round_e4m3: bit-exact against the float8 cast
def test_round_all_e4m3_values_are_fixed_points():
    values = e4m3_values()
    assert values.numel() == 254 and values.abs().max() == E4M3_MAX
    assert_bit_identical(values)
    assert torch.equal(round_e4m3(values), values)


def test_round_ties_to_even_normal_and_subnormal():
    pos = e4m3_values().unique()  # sorted, -0 folded into +0
    pos = pos[pos >= 0]
    mids = (pos[:-1] + pos[1:]) / 2  # exact in fp32: e4m3 has 3 mantissa bits
    assert (mids < 2.0**-6).sum() >= 8, "subnormal midpoints are covered"
    x = torch.cat([mids, -mids])
    assert_bit_identical(x)
    # a tie rounds to the neighbour whose mantissa (index in the sorted list) is even
    out = round_e4m3(mids)
    lo_even = torch.arange(mids.numel()) % 2 == 0
    assert torch.equal(out, torch.where(lo_even, pos[:-1], pos[1:]))


def test_round_dense_sweep():
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-12, 4, 1_000_000, dtype=torch.float64).float()
    uniform = (torch.rand(500_000, generator=g) - 0.5) * 1000
    normal = torch.randn(500_000, generator=g) * torch.logspace(-3, 2, 500_000).float()
    assert_bit_identical(torch.cat([mags, -mags, uniform, normal]))


def test_round_subnormals():
    g = torch.Generator().manual_seed(1)
    sub = (torch.rand(200_000, generator=g) * 2 - 1) * 2.0**-6  # |x| < smallest normal: spacing 2^-9
    fp32_denormals = torch.tensor([1e-40, -1e-40, 1e-45, 2.0**-10, 2.0**-10 + 2.0**-20, -(2.0**-10) - 2.0**-20])
    x = torch.cat([sub, fp32_denormals])
    assert_bit_identical(x)
    out = round_e4m3(sub)
    assert torch.equal(out, torch.round(sub * 2**9) / 2**9)
    assert round_e4m3(torch.tensor([2.0**-10])).item() == 0.0  # tie between 0 and 2^-9 → even (0)


def test_round_saturates_at_the_top():
    above, below = torch.nextafter, lambda v: torch.nextafter(v, torch.tensor(0.0))
    edges = torch.tensor([416.0, 424.0, 432.0, 440.0, 448.0, 456.0, 464.0, 480.0, 1e4, 1e30, 3e38, math.inf])
    near = torch.cat([edges, below(edges), above(edges, torch.tensor(math.inf))])
    x = torch.cat([near, -near])
    assert_bit_identical(x[x.isfinite()])
    out = round_e4m3(x)
    assert (out.abs() <= E4M3_MAX).all()
    big = x.abs() >= 432.0  # 432 is the tie between 416 and 448 (even mantissa: 448); from there on ±448
    assert torch.equal(out[big], torch.sign(x[big]) * E4M3_MAX)
    assert round_e4m3(torch.tensor([432.0, below(torch.tensor(432.0)).item()])).tolist() == [448.0, 416.0]
    assert round_e4m3(torch.tensor([-1e30, 1e30])).tolist() == [-448.0, 448.0]


def test_round_keeps_negative_zero_and_nan():
    out = round_e4m3(torch.tensor([-0.0, -1e-4, 0.0, math.nan]))
    assert torch.signbit(out[:2]).all() and out[:3].eq(0).all() and not torch.signbit(out[2])
    assert out[3].isnan()


# ---------------------------------------------------------------- SQNR floors
def test_qk_tile_sqnr_floor_gaussian():
    q = gaussian()
    q_hat, scale = quantize_qk(q, LAYOUT, QuantGranularity("tile"))
    db = sqnr_db(q, q_hat)
    assert db >= SQNR_FLOOR_DB, f"tile-scaled Q on N(0,1): {db:.2f} dB < {SQNR_FLOOR_DB} dB"
    assert q_hat.dtype == torch.float32 and scale.shape == (2, 3, LAYOUT.seq_len, 1)


def test_qk_sqnr_finer_granularity_is_better_on_heavy_tails():
    q = heavy_tailed()
    grans = [QuantGranularity("token"), QuantGranularity("subtile", (1, 2, 2)), QuantGranularity("tile"),
             QuantGranularity("tiles", (2, 2, 2))]
    dbs = [sqnr_db(q, quantize_qk(q, LAYOUT, g)[0]) for g in grans]
    msg = ", ".join(f"{g.group}{g.factor}: {db:.2f} dB" for g, db in zip(grans, dbs))
    assert min(dbs) >= SQNR_FLOOR_DB, msg
    assert dbs == sorted(dbs, reverse=True), f"finer should be at least as good as coarser: {msg}"


@pytest.mark.parametrize("make", [gaussian, heavy_tailed])
def test_v_per_channel_sqnr_floor(make):
    v = make()
    v_hat, scale = quantize_v(v)
    db = sqnr_db(v, v_hat)
    assert db >= SQNR_FLOOR_DB, f"per-channel V on {make.__name__}: {db:.2f} dB"
    assert scale.shape == (2, 3, 1, 64)
    assert torch.equal(scale, v.abs().amax(dim=-2, keepdim=True) / E4M3_MAX)


def test_v_per_channel_beats_per_tensor_on_outlier_channels():
    v = heavy_tailed()
    v_channel, _ = quantize_v(v)
    v_tensor = fake_quant_e4m3(v, v.abs().amax() / E4M3_MAX)
    normal = torch.ones(64, dtype=torch.bool)
    normal[OUTLIER_CHANNELS] = False  # the channels a shared scale pushes towards the subnormal range
    db_channel = sqnr_db(v[..., normal], v_channel[..., normal])
    db_tensor = sqnr_db(v[..., normal], v_tensor[..., normal])
    all_channel, all_tensor = sqnr_db(v, v_channel), sqnr_db(v, v_tensor)
    msg = f"non-outlier channels: per-channel {db_channel:.2f} dB vs per-tensor {db_tensor:.2f} dB; " \
          f"all channels: {all_channel:.2f} vs {all_tensor:.2f} dB"
    assert db_channel >= db_tensor + 0.5, msg
    assert all_channel > all_tensor, msg


def test_sqnr_db_definition():
    ref = torch.randn(1000, dtype=torch.float64)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref * 1.01) == pytest.approx(40.0)


# ---------------------------------------------------------------- straight-through gradients
def test_ste_is_identity_where_nothing_saturates():
    x = (torch.randn(4, 64, dtype=torch.float64) * 3).requires_grad_()
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / E4M3_MAX  # row max maps to 448 (x/scale may be 448+ulp)
    grad_out = torch.randn(4, 64)
    out = fake_quant_e4m3(x, scale)
    out.backward(grad_out)
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float64
    assert torch.equal(x.grad, grad_out.double()), "the group max must keep its gradient too"


def test_ste_is_zero_where_saturated():
    x = torch.linspace(-10, 10, 2001, requires_grad=True)
    scale = torch.tensor(5.0 / E4M3_MAX)  # |x| > 5·464/448 saturates
    out = fake_quant_e4m3(x, scale)
    out.backward(torch.ones_like(out))
    y = x.detach() / scale
    saturated = y.abs() > 464
    assert saturated.sum() > 500 and (~saturated).sum() > 500
    assert torch.equal(x.grad, (~saturated).float())
    assert torch.equal(out[y.abs() > E4M3_MAX].abs(), torch.full_like(out[y.abs() > E4M3_MAX], 5.0))
    assert torch.isfinite(x.grad).all()


def test_qk_ste_grads_identity_finite_and_no_grad_to_scale():
    q = gaussian().requires_grad_()
    q_hat, scale = quantize_qk(q, LAYOUT, QuantGranularity("subtile", (1, 2, 2)))
    assert not scale.requires_grad
    grad_out = torch.randn_like(q_hat)
    q_hat.backward(grad_out)
    assert torch.equal(q.grad, grad_out)


def test_all_zero_and_tiny_groups_are_finite():
    q = gaussian().requires_grad_(False)
    tile0 = int(LAYOUT.tile_sizes()[0])
    q[:, :, :tile0] = 0.0  # first tile (contiguous in tile-major order) all zero
    q[:, :, tile0:2 * tile0] = 1e-30  # second tile tiny
    q.requires_grad_()
    q_hat, scale = quantize_qk(q, LAYOUT, QuantGranularity("tile"))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale[:, :, :tile0], torch.full_like(scale[:, :, :tile0], AMAX_FLOOR / E4M3_MAX))
    assert scale.min() >= torch.finfo(torch.float32).tiny, "scales must be normal fp32 (flush-to-zero safe)"
    assert torch.isfinite(q_hat).all() and q_hat[:, :, :tile0].eq(0).all()
    tiny = q_hat[:, :, tile0:2 * tile0]
    assert torch.allclose(tiny, torch.full_like(tiny, 1e-30), rtol=1e-6, atol=0)
    (q_hat**2).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:, :, :tile0].eq(0).all()
    v_hat, v_scale = quantize_v(torch.zeros(1, 1, 8, 4))
    assert v_hat.eq(0).all() and torch.isfinite(v_scale).all() and (v_scale > 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise_naming_the_tensor(bad):
    q = gaussian()
    q[0, 1, 7, 3] = bad
    with pytest.raises(ValueError, match=r"^q has 1 non-finite values \(NaN/Inf\)"):
        quantize_qk(q, LAYOUT, QuantGranularity("tile"), name="q")
    with pytest.raises(ValueError, match=r"^v has 1 non-finite"):
        quantize_v(q)
    with pytest.raises(ValueError, match=r"^p has 1 non-finite"):
        quantize_p(q)
    with pytest.raises(ValueError, match=r"^x has 1 non-finite"):
        fake_quant_e4m3(q, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^x scale has 1 non-finite"):
        fake_quant_e4m3(torch.ones(3), torch.tensor(bad))


def test_quantize_qk_checks_sequence_length():
    with pytest.raises(ValueError, match="269 tokens"):
        quantize_qk(torch.randn(1, 1, 269, 8), LAYOUT, QuantGranularity())


# ---------------------------------------------------------------- granularity and token group ids
def test_granularity_validation():
    with pytest.raises(ValueError, match=r"quant.group='tilez': expected one of"):
        QuantGranularity("tilez")
    with pytest.raises(ValueError, match=r"quant.factor"):
        QuantGranularity("tiles", (0, 1, 1))
    with pytest.raises(ValueError, match=r"axis 'h'"):
        QuantGranularity("subtile", (1, 3, 1)).group_shape((2, 4, 4))
    assert QuantGranularity("subtile", [1, 2, 2]).factor == (1, 2, 2)
    shapes = {g: QuantGranularity(g, (2, 2, 2)).group_shape((2, 4, 4)) for g in ("tiles", "tile", "subtile", "token")}
    assert shapes == {"tiles": (4, 8, 8), "tile": (2, 4, 4), "subtile": (1, 2, 2), "token": (1, 1, 1)}


def tile_of_each_token(layout: TokenLayout) -> torch.Tensor:
    return token_tiles(layout)  # (L,) tile-major order


def test_group_ids_tile_are_the_tiles():
    ids, n = token_group_ids(LAYOUT, (2, 4, 4))
    assert n == LAYOUT.tile_sizes().numel() == 3 * 2 * 3
    assert ids.dtype == torch.int64 and torch.equal(ids, tile_of_each_token(LAYOUT))


def test_group_ids_subtile_stay_inside_one_tile():
    shape = QuantGranularity("subtile", (2, 2, 2)).group_shape(LAYOUT.tile_shape)
    ids, n = token_group_ids(LAYOUT, shape)
    assert shape == (1, 2, 2) and n == 5 * 3 * 5
    counts = torch.bincount(ids, minlength=n)
    assert counts.min() >= 1 and counts.max() <= 4 and counts.sum() == LAYOUT.seq_len
    tile = tile_of_each_token(LAYOUT)
    lo = torch.full((n,), 10**9).scatter_reduce(0, ids, tile, "amin")
    hi = torch.full((n,), -1).scatter_reduce(0, ids, tile, "amax")
    assert torch.equal(lo, hi), "a sub-tile group spans two tiles"


def test_group_ids_coarse_are_unions_of_whole_tiles():
    ids, n = token_group_ids(LAYOUT, QuantGranularity("tiles", (2, 2, 2)).group_shape(LAYOUT.tile_shape))
    assert n == 2 * 1 * 2
    tile = tile_of_each_token(LAYOUT)
    n_tiles = int(tile.max()) + 1
    lo = torch.full((n_tiles,), 10**9).scatter_reduce(0, tile, ids, "amin")
    hi = torch.full((n_tiles,), -1).scatter_reduce(0, tile, ids, "amax")
    assert torch.equal(lo, hi), "a tile is split between two coarse groups"
    assert torch.bincount(ids).min() >= 1


def test_group_ids_token_and_raster_order():
    ids, n = token_group_ids(LAYOUT, (1, 1, 1))
    assert n == LAYOUT.seq_len and ids.unique().numel() == n
    assert torch.equal(ids, LAYOUT.permutation())  # token id = its raster index
    raster = TokenLayout(LAYOUT.grid, "raster", LAYOUT.tile_shape)
    ids_raster, n_raster = token_group_ids(raster, (2, 4, 4))
    assert n_raster == 18
    ids_tile, _ = token_group_ids(LAYOUT, (2, 4, 4))
    assert torch.equal(ids_raster[LAYOUT.permutation()], ids_tile)  # same groups, tokens in another order
    q = gaussian()
    q_hat_raster, _ = quantize_qk(q, raster, QuantGranularity("tile"))
    perm = LAYOUT.permutation()
    q_hat_tile, _ = quantize_qk(q[:, :, perm], LAYOUT, QuantGranularity("tile"))
    assert torch.equal(q_hat_raster[:, :, perm], q_hat_tile)


def test_group_ids_720p():
    layout = TokenLayout((21, 45, 80), "tile", (6, 8, 8))
    ids, n = token_group_ids(layout, (6, 8, 8))
    assert n == 4 * 6 * 10 and ids.numel() == 21 * 45 * 80
    assert ids.min() == 0 and ids.max() == n - 1
    assert torch.equal(ids, tile_of_each_token(layout))
    counts = torch.bincount(ids, minlength=n)
    assert counts.max() == 384 and counts.min() == 3 * 5 * 8  # corner tile: 21%6, 45%8, 80%8→8
    sub_ids, n_sub = token_group_ids(layout, QuantGranularity("subtile", (2, 2, 2)).group_shape((6, 8, 8)))
    assert n_sub == 7 * 12 * 20 and sub_ids.max() == n_sub - 1


def test_group_ids_cached_and_usable_after_inference_mode():
    layout = TokenLayout((3, 5, 7), "tile", (2, 2, 4))
    with torch.inference_mode():
        ids, n = token_group_ids(layout, (2, 2, 4))
    assert not ids.is_inference()
    assert token_group_ids(layout, (2, 2, 4))[0] is ids
    x = torch.randn(1, 2, 105, 8, requires_grad=True)
    x_hat, _ = quantize_qk(x, layout, QuantGranularity("tile"))
    x_hat.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_group_scales_are_group_amax():
    x = gaussian()
    ids, n = token_group_ids(LAYOUT, (2, 4, 4))
    scale = group_scales(x, ids, n)
    sizes = LAYOUT.tile_sizes().tolist()
    for tile, chunk_x, chunk_s in zip(range(n), x.split(sizes, dim=2), scale.split(sizes, dim=2)):
        expect = chunk_x.abs().amax(dim=(-2, -1), keepdim=True) / E4M3_MAX  # (B, H, 1, 1)
        assert torch.equal(chunk_s, expect.expand_as(chunk_s)), f"tile {tile}"


# ---------------------------------------------------------------- P with the fixed scale 1/448
def test_quantize_p_round_trip():
    g = torch.Generator().manual_seed(2)
    p = torch.cat([torch.rand(200_000, generator=g), torch.rand(10_000, generator=g) ** 8,
                   e4m3_values().clamp(0) / E4M3_MAX, torch.tensor([0.0, 1.0])]).requires_grad_()
    out = quantize_p(p)
    assert out[-2].item() == 0.0 and out[-1].item() == 1.0
    y, y_hat = p.detach() * E4M3_MAX, out.detach() * E4M3_MAX
    assert torch.equal(out, round_e4m3(y) / E4M3_MAX)
    assert torch.equal(round_e4m3(y_hat), y_hat), "P·448 must land on e4m3 values"
    _, exp = torch.frexp(y)
    step = torch.ldexp(torch.ones_like(y), (exp - 1).clamp_min(-6) - 3)  # e4m3 spacing at y
    assert ((y_hat - y).abs() <= step / 2).all(), "P must round to a nearest e4m3 neighbour"
    out.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p)), "P never saturates: the STE is the identity"


def test_fast_cast_path_equals_the_emulation():
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(200_000, generator=g) * 10 ** torch.empty(200_000).uniform_(-12, 4, generator=g),
                   torch.tensor([0.0, -0.0, 448.0, 464.0, 465.0, -1e30, float("inf"), -float("inf"), 2.0**-10])])
    fast, spec = round_e4m3_cast(x), round_e4m3(x)
    assert torch.equal(fast, spec) and torch.equal(torch.signbit(fast), torch.signbit(spec))


def test_range_stats_count_saturation_and_underflow():
    """Constructed values: saturated beyond 464·scale (up to it round-to-nearest gives 448 anyway), underflow for
    nonzero values at or below half the smallest subnormal (2^-10, ties to even go to zero); zeros are neither."""
    scale = torch.tensor(0.25)
    y = torch.tensor([448.0, 448.0 * (1 + 2**-23), 464.0, 470.0, -1000.0,  # fine, fine (an ulp above), fine, sat, sat
                      2.0**-10, -(2.0**-12), 1e-30,  # underflow: the tie, and smaller
                      2.0**-10 * 1.01, 2.0**-9, 0.0, -0.0, 1.0])  # round to ±2^-9 (not lost); zeros; plain
    stats = e4m3_range_stats(y * scale, scale)
    assert stats == RangeStats(saturated=2, underflow=3, nonzero=11, total=13), stats
    assert stats.rates() == {"saturated": 2 / 13, "underflow": 3 / 11}
    assert stats + stats == RangeStats(4, 6, 22, 26)


def test_range_stats_with_contract_scales_never_saturate():
    """With per-group amax scales nothing saturates; small entries of a group with an outlier underflow (counted
    independently here), and a broken (halved) scale shows as saturation."""
    x = heavy_tailed(3)
    x[0, 0, :5, 0] = 1e4  # an outlier in the first tiles' groups
    x[0, 0, :5, 1:] = 1e-4  # tiny values beside it: 1e-4 / (1e4 / 448) = 4.5e-6 < 2^-10
    gran = QuantGranularity("tile")
    stats = qkv_range_stats(x, x, x, LAYOUT, gran)
    assert stats.saturated == 0 and stats.total == 3 * x.numel() and stats.nonzero == 3 * x.numel()
    scale = quantize_qk(x, LAYOUT, gran)[1]
    expected = int(((x / scale).abs() <= 2.0**-10).sum())
    assert e4m3_range_stats(x, scale).underflow == expected >= 5 * 63  # at least the tiny values
    assert stats.underflow >= 2 * expected  # q and k; v's per-channel scales need not lose them
    assert e4m3_range_stats(x, scale / 2).saturated > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_divide_rounds_once_on_every_device(device):
    """`divide` is the correctly rounded quotient (fp64 division rounded to fp32 is: 53 >= 2·24 + 2 bits), also on a
    GPU, where `x / 448.0` multiplies by fl(1/448) and is one bit off for some x (the reference's scales then missed
    the kernels' by a bit)."""
    from fpsa_train.fps.fp8 import divide

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1 << 20, generator=g) * torch.exp2(torch.randint(-20, 20, (1 << 20,), generator=g).float()))
    want = (x.double() / 448.0).float()
    assert torch.equal(divide(x.to(device), 448.0).cpu(), want)
