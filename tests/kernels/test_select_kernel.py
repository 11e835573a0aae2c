"""The kernel on the sync-free selection and plan (CPU: Triton interpreter): bit for bit the output, and the
gradients, of the same kernel on the TileMask path and on a plan sized by the mask's actual largest count, since the
static bound only adds chunk slots the kernel never reads."""

from __future__ import annotations

import math

import pytest
import torch

from fpsa_kernels import quantize_qkv, sparse_plan
from fpsa_kernels.attention import attention_forward
from fpsa_kernels.numerics import LOG2E
from fpsa_train.fps.kernel import fps_attention, plan_for, quant_groups
from fpsa_train.fps.masks import select_keep, token_ranges
from fpsa_train.fps.reference import select_tiles
from tests.conftest import make_regime

from .helpers import make_inputs
from .test_attention import LAYOUT
from .test_training import BLOCKS, kernel_grads

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (GPU: test_select_gpu)")

REGIMES = {"topk": make_regime("topk", topk=2),
           "window_topk": make_regime("window_topk", "subtile", window=(1, 1, 1), topk=2)}


@pytest.mark.parametrize("name", list(REGIMES))
def test_forward_is_identical_on_both_plans(name):
    reg = REGIMES[name]
    q, k, v = make_inputs("peaked", 2, 2, LAYOUT, 64, seed=5)
    selected = fps_attention(q, k, v, LAYOUT, reg, block_m=32, block_n=16)  # select_keep, static-bound plan
    tiles = fps_attention(q, k, v, LAYOUT, reg, select_tiles(q, k, LAYOUT, reg).mask, block_m=32, block_n=16)
    for a, b in zip(selected, tiles):
        assert torch.equal(a, b)
    mask = select_keep(q, k, LAYOUT, reg.topk_of(len(LAYOUT.tile_sizes())), reg.window)
    qkv = quantize_qkv(q, k, v, quant_groups(LAYOUT, reg.quant, q.device), q_mult=LOG2E / math.sqrt(64))
    plans = [plan_for(mask, LAYOUT, reg, 32, 16, "cpu"),  # the hot path's: sized by k plus the window
             sparse_plan(mask.keep, token_ranges(LAYOUT), 32, 16),  # sized by the actual largest count
             sparse_plan(mask.keep, token_ranges(LAYOUT), 32, 16, max_kept=mask.num_kv_tiles)]  # by every tile
    assert plans[0].chunks.shape[-1] < plans[2].chunks.shape[-1]
    out, lse = attention_forward(qkv, plans[0])
    assert torch.equal(out, selected[0])
    for plan in plans[1:]:
        other = attention_forward(qkv, plan)
        assert torch.equal(out, other[0]) and torch.equal(lse, other[1])


def test_gradients_are_identical_on_both_masks():
    """The training path plans the KeepMask (and its transpose, bounded by the tile count) as it plans a TileMask."""
    reg = REGIMES["window_topk"]
    q, k, v = make_inputs("normal", 1, 2, LAYOUT, 64, seed=6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    keep = select_keep(q, k, LAYOUT, reg.topk_of(len(LAYOUT.tile_sizes())), reg.window)
    out_keep, grads_keep = kernel_grads(q, k, v, reg, keep, dout, blocks=BLOCKS)
    out_tiles, grads_tiles = kernel_grads(q, k, v, reg, select_tiles(q, k, LAYOUT, reg).mask, dout, blocks=BLOCKS)
    assert torch.equal(out_keep, out_tiles)
    for name in grads_keep:
        assert torch.equal(grads_keep[name], grads_tiles[name]), name
