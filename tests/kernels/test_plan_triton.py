"""The Triton planner (`tile_plan_triton`, the GPU's `tile_plan`) against the torch statement `tile_plan_torch`:
every tensor of the plan equal, dtype and shape included, on masks of every density (rows keeping nothing, one tile,
exactly the bound, every tile), masks broadcast over batch or heads (stride 0), the transposed mask of the backward,
tile offsets that are not multiples of 16 and Wan-like tiles with partial edges. CPU: Triton's interpreter, at
small shapes (a planned row costs ~15 ms there); `gpu`: the same at Wan's shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

from fpsa_kernels import unsupported_reason
from fpsa_kernels.plan import tile_plan_torch, tile_plan_triton, tile_spans
from fpsa_train.fps.masks import token_ranges, topk_keep, window_keep
from fpsa_train.models.token_order import TokenLayout

FIELDS = ("item_group", "item_row", "item_rows", "chunk_start", "chunk_lo", "chunk_hi", "chunk_count", "chunks")

LAYOUTS = {
    "partial": TokenLayout((5, 9, 11), "tile", (2, 4, 4)),  # 3×3×3 tiles of 32, 24, 16, 12, ... tokens
    "odd": TokenLayout((7, 5, 13), "tile", (3, 2, 5)),  # 3×3×3 tiles of 30, 20, 15, ...: few starts 16-aligned
    "wan_like": TokenLayout((9, 13, 20), "tile", (6, 8, 8)),  # 2×2×3 tiles of 384, 192, 240, 120, 108, ...
    "long": TokenLayout((2, 16, 29), "tile", (2, 4, 4)),  # 1×4×8 tiles (N = 32: 5 search steps), last ones partial
    "many": TokenLayout((4, 20, 39), "tile", (2, 4, 4)),  # 2×5×10 tiles (N = 100: 128 lanes, 7 search steps)
}

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (GPU: the `gpu` tests here)")


def assert_same_plan(got, want) -> None:
    assert (got.block_m, got.block_n) == (want.block_m, want.block_n)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (name, (a != b).nonzero()[:5].tolist())


def mixed_keep(batch: int, heads: int, n: int, seed: int, empty: bool = False) -> torch.Tensor:
    """bool (B, H, N, N) whose rows keep from one tile (their own) to all of them, at random densities; with
    `empty`, some rows keep nothing."""
    g = torch.Generator().manual_seed(seed)
    density = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.9, 1.0])[torch.randint(0, 6, (batch, heads, n, 1), generator=g)]
    keep = torch.rand(batch, heads, n, n, generator=g) < density
    keep |= torch.eye(n, dtype=torch.bool)
    if empty:
        keep &= torch.rand(batch, heads, n, 1, generator=g) > 0.2
    return keep


def both(keep: torch.Tensor, layout: TokenLayout, blocks: tuple[int, int], max_kept: int, allow_empty: bool = False):
    spans = tile_spans(tuple(token_ranges(layout).tolist()), *blocks, str(keep.device))
    return (tile_plan_triton(keep, spans, max_kept, allow_empty), tile_plan_torch(keep, spans, max_kept, allow_empty))


@cpu_only
@pytest.mark.parametrize("layout, blocks, batch_heads", [
    ("partial", (16, 16), (2, 1)), ("partial", (32, 64), (1, 2)), ("partial", (64, 128), (1, 1)),
    ("odd", (16, 32), (1, 2)), ("odd", (64, 128), (2, 1)),
    ("wan_like", (64, 128), (2, 2)), ("wan_like", (128, 128), (1, 3)), ("wan_like", (16, 16), (1, 1)),
    ("long", (32, 64), (1, 1)), ("many", (64, 128), (1, 1))])
def test_random_masks_plan_identically(layout, blocks, batch_heads):
    """The bound is the largest row (some rows keep exactly max_kept), then every tile (more slots than used)."""
    lay = LAYOUTS[layout]
    n = len(lay.tile_sizes())
    keep = mixed_keep(*batch_heads, n, seed=n + blocks[1])
    largest = int(keep.sum(-1).max())
    assert_same_plan(*both(keep, lay, blocks, largest))
    if layout == "wan_like":
        assert_same_plan(*both(keep, lay, blocks, n))


@cpu_only
@pytest.mark.parametrize("layout", ["partial", "wan_like"])
def test_empty_rows_and_the_transposed_mask(layout):
    """The backward's plan: the transposed (non-contiguous) mask, rows of key tiles no query keeps, bound N."""
    lay = LAYOUTS[layout]
    n = len(lay.tile_sizes())
    keep = mixed_keep(1, 2, n, seed=3, empty=True)
    assert not keep.any(-1).all()
    assert_same_plan(*both(keep, lay, (32, 64), n, allow_empty=True))
    keep_t = topk_keep(torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(4)), 2).keep
    assert_same_plan(*both(keep_t.transpose(-1, -2), lay, (64, 128), n, allow_empty=True))


@cpu_only
def test_masks_broadcast_over_batch_and_heads():
    """A (1, 1, N, N) window keeps its shape; an expanded view (stride 0 over batch and heads) plans as its copy."""
    lay = LAYOUTS["partial"]
    window = window_keep(lay.tile_grid, (2, 3, 1))
    assert_same_plan(*both(window.keep, lay, (16, 32), window.max_kept))
    expanded = window.keep.expand(2, 2, -1, -1)
    assert expanded.stride(0) == expanded.stride(1) == 0
    got, want = both(expanded, lay, (16, 32), window.max_kept)
    assert_same_plan(got, want)
    assert got.chunk_count.shape == (2, 2, 27)


@cpu_only
def test_a_single_tile_and_single_chunk_rows():
    """N = 1 (no search steps) and rows that are one 16-aligned run of one chunk."""
    lay = TokenLayout((2, 4, 4), "tile", (2, 4, 4))
    keep = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert_same_plan(*both(keep, lay, (16, 32), 1))
    assert_same_plan(*both(torch.eye(27, dtype=torch.bool)[None, None], LAYOUTS["partial"], (32, 128), 1))


@cpu_only
def test_the_bound_check_fails_on_the_device_as_the_torch_one():
    lay = LAYOUTS["partial"]
    spans = tile_spans(tuple(token_ranges(lay).tolist()), 16, 16, "cpu")
    keep = topk_keep(torch.rand(1, 2, 27, 27, generator=torch.Generator().manual_seed(0)), 3).keep
    with pytest.raises(RuntimeError, match="max_kept=2"):
        tile_plan_triton(keep, spans, 2)
    keep[0, 1, 5] = False
    with pytest.raises(RuntimeError, match="fewer than 1"):
        tile_plan_triton(keep, spans, 3)
    assert_same_plan(tile_plan_triton(keep, spans, 3, allow_empty=True), tile_plan_torch(keep, spans, 3, True))
    with pytest.raises(ValueError, match="bool"):
        tile_plan_triton(keep.int(), spans, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or unsupported_reason(torch.zeros(1, device="cuda")) is not None,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("grid, heads", [((21, 30, 52), 12), ((21, 45, 80), 40)])
def test_wan_shapes_plan_identically_on_the_gpu(grid, heads):
    """Wan 480p and 720p tile grids (partial edge tiles at 720p), top-k ∪ window masks and their transposes."""
    lay = TokenLayout(grid, "tile", (6, 8, 8))
    n = len(lay.tile_sizes())
    scores = torch.randn(1, heads, n, n, generator=torch.Generator().manual_seed(0)).cuda()
    window = window_keep(lay.tile_grid, (3, 3, 3), "cuda")
    for k in (1, n // 4, n):
        keep = topk_keep(scores, k).union(window)
        for blocks in ((64, 128), (128, 128)):
            assert_same_plan(*both(keep.keep, lay, blocks, keep.max_kept))
            assert_same_plan(*both(keep.keep.transpose(-1, -2), lay, blocks, n, allow_empty=True))
