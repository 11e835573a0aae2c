"""The kernel's selection (`select_keep`, a KeepMask) against the TileMask path (`topk_mask` ∪ `window_mask`):
the same kept tiles exactly, ties and NaN included, and bounds that hold; pooled scores summed in runs of tokens."""

from __future__ import annotations

import math

import pytest
import torch

from fpsa_train.fps.masks import (pooled_tile_scores, select_keep, token_ranges, topk_keep, topk_mask,
                                  union_mask, window_keep, window_mask)
from fpsa_train.fps.reference import select_tiles
from fpsa_train.models.token_order import TokenLayout
from tests.conftest import make_regime

LAYOUT = TokenLayout((5, 9, 11), "tile", (2, 4, 4))  # 3×3×3 tiles, partial on every axis


def tricky_scores(batch: int, heads: int, n: int, seed: int) -> torch.Tensor:
    """Scores with ties, NaN and ±inf, where a disagreement about ranking would show."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, heads, n, n, generator=g)
    s[..., ::3] = 0.25  # ties
    s[..., 1, 4] = float("nan")
    s[..., 2, 7] = float("inf")
    s[..., 3, 5] = float("-inf")
    s[0, ..., 6, :] = float("nan")  # a whole row of NaN: own tile, then the lowest indices
    return s


@pytest.mark.parametrize("k", [1, 2, 5, 27, 40])
def test_topk_keep_is_topk_mask(k):
    scores = tricky_scores(2, 3, 27, seed=k)
    keep = topk_keep(scores, k)
    assert torch.equal(keep.keep, topk_mask(scores, k).to_dense())
    assert keep.max_kept == min(k, 27) == int(keep.keep.sum(-1).max())


@pytest.mark.parametrize("k", [1, 3, 27])
@pytest.mark.parametrize("window", [None, (1, 1, 1), (3, 1, 2), (6, 6, 3)])
@pytest.mark.parametrize("batch_heads", [(1, 1), (2, 3)])
def test_select_keep_is_topk_mask_union_window(k, window, batch_heads):
    g = torch.Generator().manual_seed(k)
    q, k_in = (torch.randn(*batch_heads, LAYOUT.seq_len, 16, generator=g) for _ in range(2))
    q[..., :40, :] = 0.0  # zero tiles: all-tied scores
    mask = select_keep(q, k_in, LAYOUT, k, window)
    expect = topk_mask(pooled_tile_scores(q, k_in, LAYOUT), k)
    if window is not None:
        expect = union_mask(window_mask(LAYOUT.tile_grid, window), expect)
    assert torch.equal(mask.keep, expect.to_dense())
    assert mask.max_kept >= int(mask.keep.sum(-1).max())
    assert torch.allclose(mask.density(), expect.density())
    pattern = "topk" if window is None else "window_topk"
    regime = make_regime(pattern, window=window, topk=k)
    assert torch.equal(select_tiles(q, k_in, LAYOUT, regime).mask.to_dense(), mask.keep)


@pytest.mark.parametrize("tile_grid", [(4, 4, 7), (4, 6, 10), (3, 3, 3), (1, 2, 5)])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (6, 6, 1), (2, 2, 2), (6, 6, 3)])
def test_window_bound_is_its_largest_row(tile_grid, window):
    """Π min(w, grid) is the count of an interior tile: exact, not merely a bound."""
    mask = window_keep(tile_grid, window)
    assert mask.keep.shape == (1, 1, math.prod(tile_grid), math.prod(tile_grid))
    assert mask.max_kept == int(mask.keep.sum(-1).max())
    assert torch.equal(mask.keep, window_mask(tile_grid, window).to_dense())
    assert window_keep(list(tile_grid), list(window)) is mask  # built once per grid, window and device


def test_pooled_scores_sum_runs_of_tokens_on_wan_like_tiles():
    """Tiles of 32, 16 and 8 tokens: the sums run over groups of 8 tokens, and still equal the per-tile means."""
    layout = TokenLayout((4, 6, 10), "tile", (2, 4, 4))
    assert math.gcd(*layout.tile_sizes().tolist()) == 8
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, layout.seq_len, 16, generator=g).bfloat16() for _ in range(2))
    off = token_ranges(layout).tolist()
    pooled = [torch.stack([x[:, :, a:b].double().mean(2) for a, b in zip(off[:-1], off[1:])], 2) for x in (q, k)]
    naive = pooled[0] @ pooled[1].transpose(-1, -2) / 4.0  # (B, H, N, N)
    scores = pooled_tile_scores(q, k, layout)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores.double(), naive, atol=1e-6)

