"""Our Wan DiT against diffusers' WanTransformer3DModel: same weights (through the key adapter), same output.

diffusers is the independent oracle here: its implementation of the published architecture is separate code,
so agreement to fp32 rounding checks every exactness item of reference/wan.md §7 at once (q/k RMSNorm over the
full width, interleaved 44/42/42-style RoPE split, cos-then-sin time embedding, e vs e0 modulation, ungated
cross-attention, unpatchify layout).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from fpsa_train.models.config import WAN_1_3B, WAN_14B, WanConfig
from fpsa_train.models.state_dict import to_diffusers
from fpsa_train.models.wan import WanModel

TINY = dict(dim=48, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, freq_dim=16, text_len=24)


def diffusers_model(cfg: WanConfig) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = WanConfig(**TINY)
    ours = WanModel(cfg).eval()
    with torch.no_grad():  # published init zeroes the head; random weights exercise every path
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs = diffusers_model(cfg).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("order, tile", [("raster", [6, 8, 8]), ("tile", [2, 2, 3]), ("tile", [6, 8, 8])])
def test_matches_diffusers_fp32(pair, order, tile):
    ours, theirs = pair
    ours.cfg.token_order, ours.cfg.tile_shape = order, tile
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 10, 14, generator=g)  # grid 3×5×7: the 2×2×3 tile leaves partial edge tiles
    t = torch.tensor([999.0, 123.5])
    text = [torch.randn(7, 32, generator=g), torch.randn(24, 32, generator=g)]  # unpadded, as cached
    padded = torch.zeros(2, 24, 32)
    padded[0, :7], padded[1] = text[0], text[1]
    with torch.no_grad():
        out = ours(x, t, text)
        ref = theirs(x, t, padded).sample
    assert out.dtype == torch.float32 and out.shape == x.shape
    err = rel_err(out, ref)
    assert err <= 1e-5, f"relative error {err:.3g} (max abs {(out - ref).abs().max():.3g})"


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("sizes, published", [(WAN_1_3B, 1.419e9), (WAN_14B, 14.288e9)])
def test_parameter_counts_equal_diffusers(sizes, published):
    cfg = WanConfig(**sizes)
    with torch.device("meta"):
        ours, theirs = param_count(WanModel(cfg)), param_count(diffusers_model(cfg))
    assert ours == theirs
    assert abs(ours - published) / published < 5e-4  # reference/wan.md §1, computed from the shapes
