"""On a Hopper GPU at Wan's shapes: the top-k selection, its plan and the whole `fps_attention` call never
synchronise with the host (`torch.cuda.set_sync_debug_mode("error")` turns any synchronising CUDA call into an
error), and their results equal the TileMask path's. Marked `gpu`: run on the lent H200 with
`pytest -m gpu tests/kernels/test_select_gpu.py`."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fpsa_kernels import KernelConfig, unsupported_reason
from fpsa_train.fps.kernel import fps_attention, plan_for
from fpsa_train.fps.masks import select_keep
from fpsa_train.fps.reference import select_tiles
from fpsa_train.models.token_order import TokenLayout

from .helpers import make_inputs
from .test_attention_gpu import REGIMES, TILE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or unsupported_reason(torch.zeros(1, device="cuda"))
                                 is not None, reason="needs a Hopper GPU")]

BLOCKS = (KernelConfig.block_m, KernelConfig.block_n)  # the forward's default blocks
SHAPES = {"480p": (12, (21, 30, 52)), "720p": (40, (21, 45, 80))}


@contextlib.contextmanager
def no_sync():
    """Any synchronising CUDA call inside raises (a device-to-host copy, a stream sync, a blocking host copy)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def inputs(shape: str):
    heads, grid = SHAPES[shape]
    layout = TokenLayout(grid, "tile", TILE)
    return layout, make_inputs("peaked", 1, heads, layout, 128, seed=0, device="cuda")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("regime", ["late", "token"])
def test_selection_and_plan_do_not_synchronise(shape, regime):
    reg = REGIMES[regime]
    layout, (q, k, _) = inputs(shape)
    n = len(layout.tile_sizes())

    def select_and_plan():
        mask = select_keep(q, k, layout, reg.topk_of(n), reg.window)
        return mask, plan_for(mask, layout, reg, *BLOCKS, q.device), plan_for(
            mask, layout, reg, *BLOCKS, q.device, transpose=True)

    select_and_plan()  # first call: builds the per-layout caches (one host-to-device copy each)
    with no_sync():
        mask, plan, _ = select_and_plan()
    assert torch.equal(mask.keep, select_tiles(q, k, layout, reg).mask.to_dense())
    assert int(plan.chunk_count.max()) <= plan.chunks.shape[-1]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("regime", ["dense", "early", "late", "token"])
def test_whole_call_does_not_synchronise(shape, regime):
    """The issue's target is the whole call at most 1.1× its kernel: that needs no host stall anywhere in it."""
    reg = REGIMES[regime]
    layout, (q, k, v) = inputs(shape)
    fps_attention(q, k, v, layout, reg)  # compiles the kernels and fills the caches
    with no_sync():
        out, lse = fps_attention(q, k, v, layout, reg)
    if reg.pattern in ("topk", "window_topk"):
        want = fps_attention(q, k, v, layout, reg, select_tiles(q, k, layout, reg).mask)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
