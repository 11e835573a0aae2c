"""The kernel's work plan covers exactly the kept (query, key) token pairs, once each, with bounded padding."""

from __future__ import annotations

import pytest
import torch

from fpsa_kernels.plan import dense_plan, sparse_plan
from fpsa_train.fps.masks import token_ranges, topk_mask, union_mask, window_mask
from fpsa_train.models.token_order import TokenLayout

from .helpers import token_mask

LAYOUT = TokenLayout((5, 9, 11), "tile", (2, 4, 4))  # partial tiles on every axis, 3×3×3 tiles


def covered(plan, seq_len: int, batch: int, heads: int) -> torch.Tensor:
    """How often the plan computes each (query, key) pair with a valid column: int (B, H, L, L)."""
    hits = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            mb, mh = min(b, plan.chunk_count.shape[0] - 1), min(h, plan.chunk_count.shape[1] - 1)
            for g, row, rows in zip(plan.item_group.tolist(), plan.item_row.tolist(), plan.item_rows.tolist()):
                assert 0 < rows <= plan.block_m
                for c in range(int(plan.chunk_count[mb, mh, g])):
                    start = int(plan.chunk_start[mb, mh, g, c])
                    lo, hi = int(plan.chunk_lo[mb, mh, g, c]), int(plan.chunk_hi[mb, mh, g, c])
                    assert start % 16 == 0 and 0 <= lo < hi <= plan.block_n
                    hits[b, h, row: row + rows, start + lo: start + hi] += 1
    return hits


def masks():
    n = len(LAYOUT.tile_sizes())
    scores = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(0))
    window = window_mask(LAYOUT.tile_grid, (1, 3, 1))
    return {"window": window, "topk": topk_mask(scores, 5), "union": union_mask(window, topk_mask(scores, 2)),
            "single": window_mask(LAYOUT.tile_grid, (1, 1, 1))}


@pytest.mark.parametrize("name", ["window", "topk", "union", "single"])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 64)])
def test_sparse_plan_covers_each_kept_pair_once(name, blocks):
    mask = masks()[name]
    plan = sparse_plan(mask.to_dense(), token_ranges(LAYOUT), *blocks)
    b, h = mask.counts.shape[:2]
    hits = covered(plan, LAYOUT.seq_len, b, h)
    expected = token_mask(mask, LAYOUT).expand(b, h, -1, -1)
    assert torch.equal(hits, expected.int())
    assert plan.useful == int(expected.sum())
    assert plan.computed >= plan.useful and plan.waste >= 0


def test_dense_plan_covers_everything_once_ignoring_tiles():
    plan = dense_plan(LAYOUT.seq_len, 32, 64)
    assert torch.equal(covered(plan, LAYOUT.seq_len, 1, 1), torch.ones(1, 1, LAYOUT.seq_len, LAYOUT.seq_len).int())
    assert plan.waste == pytest.approx(plan.computed / LAYOUT.seq_len ** 2 - 1)


def test_runs_of_tiles_are_merged():
    """Three consecutive key tiles are one run: chunks straddle tile edges instead of padding each tile."""
    plan_runs = sparse_plan(window_mask(LAYOUT.tile_grid, (1, 1, 3)).to_dense(), token_ranges(LAYOUT), 32, 64)
    sizes = LAYOUT.tile_sizes()
    middle = 13  # tile (1, 1, 1): keys are tiles 12, 13, 14, contiguous
    run = int(sizes[12] + sizes[13] + sizes[14])
    assert int(plan_runs.chunk_count[0, 0, middle]) == -(-(run + int(token_ranges(LAYOUT)[12]) % 16) // 64)


def test_items_are_longest_first():
    mask = masks()["topk"]
    plan = sparse_plan(mask.to_dense(), token_ranges(LAYOUT), 16, 16)
    work = plan.chunk_count.amax((0, 1))[plan.item_group.long()]
    assert torch.all(work[:-1] >= work[1:])


def test_empty_query_row_is_refused():
    keep = torch.eye(27, dtype=torch.bool).view(1, 1, 27, 27).clone()
    keep[0, 0, 4] = False
    with pytest.raises(ValueError, match="at least one key tile"):
        sparse_plan(keep, token_ranges(LAYOUT), 16, 16)
