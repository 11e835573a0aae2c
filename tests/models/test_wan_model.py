"""Behaviour of our Wan DiT beyond parity: token order, replaceable attention, checkpointing, text handling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fpsa_train.models.attention import SDPAttention
from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel

CFG = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, text_len=12)


def randomised(cfg: WanConfig, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(cfg)
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.1)  # the published init zeroes the output layer
    return model


def inputs(shape=(2, 16, 5, 12, 18), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g), torch.tensor([800.0, 40.0]),
            torch.randn(shape[0], 5, CFG.text_dim, generator=g))


@pytest.mark.parametrize("tile", [[2, 2, 2], [2, 4, 4], [6, 8, 8], [1, 1, 1]])
def test_tile_major_equals_raster_with_dense_attention(tile):
    raster = randomised(CFG).eval()
    tiled = randomised(dataclasses.replace(CFG, token_order="tile", tile_shape=tile)).eval()
    x, t, c = inputs()  # token grid 5×6×9: no tile above divides it evenly
    with torch.no_grad():
        a, b = raster(x, t, c), tiled(x, t, c)
    assert ((a - b).norm() / a.norm()).item() < 1e-6


def test_attention_core_is_replaceable_and_sees_tile_layout():
    model = randomised(dataclasses.replace(CFG, token_order="tile", tile_shape=[2, 4, 4])).eval()
    seen = []

    class Recording(SDPAttention):
        def forward(self, q, k, v, layout, **attn_kwargs):
            seen.append((q.shape, layout, attn_kwargs))
            return torch.zeros_like(q)  # kill self-attention entirely

    x, t, c = inputs()
    with torch.no_grad():
        dense = model(x, t, c)
        for block in model.blocks:
            block.self_attn.core = Recording()
        swapped = model(x, t, c, attn_kwargs={"sigma": 0.5})
    assert len(seen) == CFG.num_layers
    shape, layout, kwargs = seen[0]
    assert shape == (2, CFG.num_heads, 5 * 6 * 9, CFG.head_dim)
    assert layout.grid == (5, 6, 9) and layout.order == "tile" and kwargs == {"sigma": 0.5}
    assert not torch.allclose(dense, swapped)


def test_activation_checkpointing_gives_same_gradients():
    x, t, c = inputs()
    grads = []
    for flag in (False, True):
        model = randomised(dataclasses.replace(CFG, activation_checkpointing=flag)).train()
        F.mse_loss(model(x, t, c), torch.zeros_like(x)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_unpadded_list_equals_zero_padded_tensor():
    model = randomised(CFG).eval()
    x, t, _ = inputs()
    g = torch.Generator().manual_seed(3)
    text = [torch.randn(4, CFG.text_dim, generator=g), torch.randn(9, CFG.text_dim, generator=g)]
    padded = torch.zeros(2, CFG.text_len, CFG.text_dim)
    padded[0, :4], padded[1, :9] = text
    with torch.no_grad():
        assert torch.equal(model(x, t, text), model(x, t, padded))
        assert torch.equal(model(x, t, padded[:, :9]), model(x, t, padded))  # shorter tensors are zero-padded


def test_text_pads_are_attended_without_mask():
    """Published behaviour: zero pads up to text_len become bias-only tokens that every query attends to, so the
    same caption gives a different output than it would if only its real tokens were attended."""
    padded_model = randomised(CFG).eval()
    unpadded_model = randomised(dataclasses.replace(CFG, text_len=5)).eval()  # same weights, no room for pads
    x, t, c = inputs()  # captions of exactly 5 tokens
    with torch.no_grad():
        with_pads, without_pads = padded_model(x, t, c), unpadded_model(x, t, c)
    assert padded_model.embed_text(c).shape == (2, CFG.text_len, CFG.dim)
    assert ((with_pads - without_pads).norm() / without_pads.norm()).item() > 1e-3


def test_too_long_text_and_bad_latent_shape_are_errors():
    model = randomised(CFG).eval()
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="text_len"):
        model(x, t, torch.zeros(2, CFG.text_len + 1, CFG.text_dim))
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.zeros(2, 16, 5, 11, 18), t, torch.zeros(2, 3, CFG.text_dim))


def test_bf16_autocast_keeps_fp32_where_the_original_does():
    """The module docstring's fp32 list: time MLP (e, e0), the residual stream and the head."""
    model = randomised(CFG).eval()
    x, t, c = inputs()
    captured = {}

    def second_argument(name):  # of a block (x, e0, context, ...) or the head (x, e)
        def hook(module, args):
            captured.setdefault(name, args[1])  # returns None: a pre-hook's return value would replace the args
        return hook

    model.blocks[1].register_forward_hook(lambda m, a, out: captured.setdefault("residual", out))
    model.blocks[0].register_forward_pre_hook(second_argument("e0"))
    model.head.register_forward_pre_hook(second_argument("e"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, c)
    ref = model(x, t, c).detach()
    dtypes = {name: v.dtype for name, v in captured.items()}
    assert out.dtype == torch.float32 and dtypes == dict.fromkeys(("residual", "e0", "e"), torch.float32), dtypes
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2  # bf16 matmuls, fp32 residual and head


@pytest.mark.parametrize("bad", [dict(num_heads=5), dict(token_order="snake"), dict(tile_shape=[2, 2]),
                                 dict(dim=12, num_heads=6)])
def test_config_checks(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **bad)
