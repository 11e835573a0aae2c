"""The reference FPS attention: tile loop = materialised, dense regime = plain attention, gradients flow."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.fps.masks import LearnedSelector
from fpsa_train.fps.reference import attention_materialized, attention_tiles
from fpsa_train.models.token_order import TokenLayout
from tests.conftest import make_regime

LAYOUT = TokenLayout((5, 6, 9), "tile", (2, 4, 4))  # 270 tokens, 3×2×3 tiles, partial at every far edge


def qkv(b=2, h=3, d=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, LAYOUT.seq_len, d, generator=g).requires_grad_(requires_grad) for _ in range(3)]


REGIMES = [
    make_regime("dense", None), make_regime("dense", "tile"), make_regime("dense", "subtile"),
    make_regime("dense", "tiles"), make_regime("dense", "token"), make_regime("window", None, window=(1, 1, 1)),
    make_regime("window", "tile", window=(3, 1, 2)), make_regime("topk", "tile", topk=3),
    make_regime("window_topk", "subtile", window=(1, 1, 1), topk=2),
]


@pytest.mark.parametrize("reg", REGIMES, ids=lambda r: f"{r.pattern}-{r.quant.group if r.quant else 'noquant'}")
def test_tile_loop_equals_materialized(reg):
    q, k, v = qkv()
    a, mask_a = attention_tiles(q, k, v, LAYOUT, reg)
    b, mask_b = attention_materialized(q, k, v, LAYOUT, reg)
    assert torch.equal(mask_a.mask.to_dense(), mask_b.mask.to_dense())
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"max diff {(a - b).abs().max():.3g}"


def test_dense_unquantized_is_plain_attention():
    q, k, v = qkv()
    out, _ = attention_tiles(q, k, v, LAYOUT, make_regime("dense", None))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_window_masks_out_far_keys():
    """With a (1,1,1) window each query tile sees only its own tile: changing other tiles' values does nothing."""
    q, k, v = qkv(b=1, h=1)
    reg = make_regime("window", None, window=(1, 1, 1))
    out, _ = attention_tiles(q, k, v, LAYOUT, reg)
    v2 = v.clone()
    v2[..., 32:, :] += 100.0  # tiles after the first
    out2, _ = attention_tiles(q, k, v2, LAYOUT, reg)
    assert torch.equal(out[..., :32, :], out2[..., :32, :]) and not torch.allclose(out[..., 32:, :], out2[..., 32:, :])


@pytest.mark.parametrize("group, floor", [("token", 25.0), ("subtile", 25.0), ("tile", 25.0)])
def test_quantized_attention_sqnr_floor(group, floor):
    q, k, v = qkv(b=1, h=2, d=64, seed=3)
    ref, _ = attention_tiles(q, k, v, LAYOUT, make_regime("dense", None))
    out, _ = attention_tiles(q, k, v, LAYOUT, make_regime("dense", group))
    assert sqnr_db(ref, out) > floor, f"{group}: {sqnr_db(ref, out):.1f} dB"


@pytest.mark.parametrize("reg", [make_regime("dense", "tile"),
                                 make_regime("window_topk", "subtile", window=(1, 1, 1), topk=2)],
                         ids=["dense", "window_topk"])
def test_gradients_flow_and_match_materialized(reg):
    grads = []
    for fn in (attention_tiles, attention_materialized):
        q, k, v = qkv(b=1, h=2, seed=5, requires_grad=True)
        out, _ = fn(q, k, v, LAYOUT, reg)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
        assert all(t.grad.isfinite().all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_learned_selector_gets_gradient_and_keeps_output_unchanged():
    q, k, v = qkv(b=2, h=3, seed=7, requires_grad=True)
    selector = LearnedSelector(num_heads=3, target_density=0.5)
    reg = make_regime("learned", "tile", window=(1, 1, 1), target_density=0.5)
    out, sel = attention_tiles(q, k, v, LAYOUT, reg, selector)
    out_m, _ = attention_materialized(q, k, v, LAYOUT, reg, selector)
    assert torch.allclose(out, out_m, rtol=1e-5, atol=1e-6)
    (out.square().sum() + sel.reg_loss).backward()
    assert selector.bias.grad is not None and selector.bias.grad.abs().sum() > 0
    assert torch.isfinite(selector.bias.grad).all()
    assert 0 < float(sel.mask.density().mean()) < 1


def test_nonfinite_input_is_an_error():
    q, k, v = qkv(b=1, h=1)
    q[0, 0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        attention_tiles(q, k, v, LAYOUT, make_regime("dense", "tile"))
    with pytest.raises(ValueError, match="non-finite"):
        attention_tiles(q, k, v, LAYOUT, make_regime("dense", None))


@pytest.mark.parametrize("quant", [None, "tile"])
@pytest.mark.parametrize("fn", [attention_tiles, attention_materialized])
def test_huge_finite_input_is_an_error_not_silent_nan(fn, quant):
    """Regression: q and k of 1e20 passed the finiteness check, q·kᵀ overflowed fp32 and the output held NaN."""
    q, k, v = qkv(b=1, h=1)
    q[0, 0, 3] = 1e20
    k[0, 0, 7] = 1e20
    with pytest.raises(ValueError, match=r"scores overflow fp32.*\|q\| = 1e\+20"):
        fn(q, k, v, LAYOUT, make_regime("dense", quant))
    q[0, 0, 3] = 1e15  # large but representable: a finite result
    out, _ = fn(q, k, v, LAYOUT, make_regime("dense", quant))
    assert torch.isfinite(out).all()


def test_raster_layout_is_refused():
    q, k, v = qkv(b=1, h=1)
    with pytest.raises(ValueError, match="token_order=tile"):
        attention_tiles(q, k, v, TokenLayout((5, 6, 9), "raster", (2, 4, 4)), make_regime())
