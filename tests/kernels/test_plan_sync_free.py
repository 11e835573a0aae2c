"""The plan built without host reads (`tile_plan` with a static bound) against a plain-loop statement of the plan:
same chunk lists per (batch, head, group), same items in the same order, zeros past each count; the bound is never
exceeded; and neither the selection nor the plan reads the mask on the host (they run on the meta device, where
any host read, boolean index or data-dependent shape fails)."""

from __future__ import annotations

import pytest
import torch

from fpsa_kernels.plan import sparse_plan, tile_plan, tile_spans
from fpsa_train.fps.kernel import plan_for
from fpsa_train.fps.masks import KeepMask, select_keep, token_ranges, topk_keep, window_keep
from fpsa_train.models.token_order import TokenLayout
from tests.conftest import make_regime

LAYOUTS = {
    "partial": TokenLayout((5, 9, 11), "tile", (2, 4, 4)),  # partial tiles on every axis, unaligned starts
    "odd": TokenLayout((7, 5, 13), "tile", (3, 2, 5)),  # 3×3×3 tiles of 30, 20, 15, ... tokens
    "wan_like": TokenLayout((9, 12, 20), "tile", (6, 8, 8)),  # 2×2×3 tiles of 384, 192, 128, ... tokens
}
BLOCKS = [(16, 16), (32, 64), (64, 128)]


def expected_chunks(row: list[bool], off: list[int], block_n: int) -> list[tuple[int, int, int]]:
    """(start, lo, hi) of every chunk of one row: each run of consecutive kept tiles, from its first token rounded
    down to 16, cut into block_n keys, the valid columns those inside the run."""
    chunks, v, n = [], 0, len(row)
    while v < n:
        if not row[v]:
            v += 1
            continue
        end = v
        while end + 1 < n and row[end + 1]:
            end += 1
        s, e = off[v], off[end + 1]
        for start in range(s // 16 * 16, e, block_n):
            chunks.append((start, max(s - start, 0), min(e - start, block_n)))
        v = end + 1
    return chunks


def expected_items(keep: torch.Tensor, off: list[int], block_m: int, block_n: int) -> list[tuple[int, int, int]]:
    """(group, first row, rows) of every item: each query tile cut into block_m rows, tiles ordered by their largest
    chunk count over batch and heads, longest first, ties in tile order."""
    n = keep.shape[-1]
    work = [max(len(expected_chunks(keep[b, h, u].tolist(), off, block_n))
                for b in range(keep.shape[0]) for h in range(keep.shape[1])) for u in range(n)]
    items = [(u, r, min(block_m, off[u + 1] - r)) for u in range(n) for r in range(off[u], off[u + 1], block_m)]
    return sorted(items, key=lambda item: -work[item[0]])


def check_plan(plan, keep: torch.Tensor, off: list[int], max_chunks: int) -> None:
    assert plan.chunk_start.shape == (*keep.shape[:3], max_chunks)
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            for u in range(keep.shape[2]):
                want = expected_chunks(keep[b, h, u].tolist(), off, plan.block_n)
                count = int(plan.chunk_count[b, h, u])
                got = list(zip(*(x[b, h, u, :count].tolist() for x in (plan.chunk_start, plan.chunk_lo,
                                                                        plan.chunk_hi))))
                assert got == want, (b, h, u)
                for x in (plan.chunk_start, plan.chunk_lo, plan.chunk_hi):
                    assert not x[b, h, u, count:].any()  # unused slots: zero
    items = list(zip(plan.item_group.tolist(), plan.item_row.tolist(), plan.item_rows.tolist()))
    assert items == expected_items(keep, off, plan.block_m, plan.block_n)


def random_keep(batch: int, heads: int, n: int, kept: int, seed: int) -> torch.Tensor:
    """bool (B, H, N, N): each row its own tile plus kept − 1 others at random (exactly `kept` per row)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n, n, generator=g)
    return topk_keep(scores, kept).keep


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch_heads", [(1, 1), (2, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("blocks", BLOCKS)
def test_static_bound_plan_matches_the_loop_statement(layout, batch_heads, blocks):
    lay = LAYOUTS[layout]
    off = token_ranges(lay).tolist()
    n = len(off) - 1
    spans = tile_spans(tuple(off), *blocks, "cpu")
    for seed, kept in enumerate((1, 2, n // 3, n)):
        keep = random_keep(*batch_heads, n, kept, seed)
        plan = tile_plan(keep, spans, kept)
        check_plan(plan, keep, off, spans.max_chunks(kept))


@pytest.mark.parametrize("topk", [1, 3, 27])
@pytest.mark.parametrize("window", [(1, 1, 1), (1, 3, 1), (3, 3, 3), (2, 1, 2)])
def test_window_topk_selection_plan(topk, window):
    """The kernel's own path: select_keep's bound (k plus the window's volume) sizes the plan, on partial tiles."""
    lay = LAYOUTS["partial"]
    g = torch.Generator().manual_seed(topk)
    q, k = (torch.randn(2, 2, lay.seq_len, 16, generator=g) for _ in range(2))
    mask = select_keep(q, k, lay, topk, window)
    assert mask.max_kept >= int(mask.keep.sum(-1).max())
    reg = make_regime("window_topk", window=window, topk=topk, name="late")
    plan = plan_for(mask, lay, reg, 32, 64, "cpu")
    spans = tile_spans(tuple(token_ranges(lay).tolist()), 32, 64, "cpu")
    check_plan(plan, mask.keep, token_ranges(lay).tolist(), spans.max_chunks(mask.max_kept))
    transposed = plan_for(mask, lay, reg, 32, 64, "cpu", transpose=True)
    check_plan(transposed, mask.keep.transpose(-1, -2), token_ranges(lay).tolist(), spans.max_chunks(spans.num_tiles))


def test_broadcast_window_and_sparse_plan_agree_with_the_static_bound():
    """A (1, 1, N, N) window: the convenient `sparse_plan` (bound read from the mask) and the static-bound plan
    differ only in how many unused slots they carry."""
    lay = LAYOUTS["odd"]
    off = token_ranges(lay)
    mask = window_keep(lay.tile_grid, (2, 3, 1))
    assert mask.max_kept == int(mask.keep.sum(-1).max())  # an interior tile keeps the whole window
    read = sparse_plan(mask.keep, off, 16, 32)
    static = tile_plan(mask.keep, tile_spans(tuple(off.tolist()), 16, 32, "cpu"), len(off) - 1)
    slots = read.chunk_start.shape[-1]
    assert static.chunk_start.shape[-1] >= slots
    for name in ("chunk_start", "chunk_lo", "chunk_hi"):
        assert torch.equal(getattr(static, name)[..., :slots], getattr(read, name))
    for name in ("chunk_count", "item_group", "item_row", "item_rows"):
        assert torch.equal(getattr(static, name), getattr(read, name))
    assert (static.useful, static.computed) == (read.useful, read.computed)


def test_separate_runs_cost_their_bound():
    """Rows keeping every other tile: each kept tile is a run of its own, from its start rounded down to 16, so
    it costs exactly its cost_v, the most the bound allows it; the plan stores every one of those chunks."""
    lay = LAYOUTS["partial"]
    off = token_ranges(lay).tolist()
    n = len(off) - 1
    spans = tile_spans(tuple(off), 16, 16, "cpu")
    cost = [-(-(off[v + 1] - off[v] // 16 * 16) // 16) for v in range(n)]
    assert sorted(cost, reverse=True) == list(spans.chunk_costs)
    keep = torch.zeros(1, 1, n, n, dtype=torch.bool)
    keep[..., ::2] = True
    kept = (n + 1) // 2
    plan = tile_plan(keep, spans, kept)
    assert int(plan.chunk_count.max()) == sum(cost[::2]) <= spans.max_chunks(kept)
    check_plan(plan, keep, off, spans.max_chunks(kept))


def test_a_row_over_the_bound_or_empty_fails_the_device_check():
    lay = LAYOUTS["partial"]
    off = token_ranges(lay).tolist()
    spans = tile_spans(tuple(off), 16, 16, "cpu")
    keep = random_keep(1, 2, len(off) - 1, 3, seed=0)
    with pytest.raises(RuntimeError, match="max_kept=2"):
        tile_plan(keep, spans, 2)
    keep[0, 1, 5] = False
    with pytest.raises(RuntimeError, match="fewer than 1"):
        tile_plan(keep, spans, 3)
    tile_plan(keep, spans, 3, allow_empty=True)  # the transposed plan's case


def test_useful_and_computed_are_read_only_when_asked():
    """They are host reads, so the plan computes them lazily, from its own tensors (dense and sparse alike)."""
    lay = LAYOUTS["wan_like"]
    off = token_ranges(lay)
    keep = random_keep(2, 1, len(off) - 1, 4, seed=3)
    plan = tile_plan(keep, tile_spans(tuple(off.tolist()), 64, 128, "cpu"), 4)
    assert "useful" not in vars(plan) and "computed" not in vars(plan)
    sizes = (off[1:] - off[:-1]).float()
    assert plan.useful == int((keep * sizes[:, None] * sizes[None, :]).sum())
    chunks = sum(int(plan.chunk_count[..., g].sum()) for g in plan.item_group.tolist())  # per item, over (b, h)
    assert plan.computed == chunks * 64 * 128


@pytest.mark.parametrize("pattern", ["topk", "window_topk"])
def test_selection_and_plan_make_no_host_reads(pattern):
    """On the meta device tensors have shapes and no values: `.item()`, `int(t)`, `.tolist()`, `nonzero`, boolean
    indexing and a shape read from a tensor's values all fail there. So running the hot path (pooled scores, top-k,
    union with the window, the plan and its transpose for the backward) on meta shows it never waits for the GPU.
    A Wan 480p shape, so the bounds are the deployed ones."""
    lay = TokenLayout((21, 30, 52), "tile", (6, 8, 8))
    window = (6, 6, 3) if pattern == "window_topk" else None
    reg = make_regime(pattern, window=window, topk=4, name="late")
    q = torch.empty(1, 12, lay.seq_len, 128, dtype=torch.bfloat16, device="meta")
    mask = select_keep(q, torch.empty_like(q), lay, reg.topk_of(112), reg.window)
    assert isinstance(mask, KeepMask) and mask.keep.device.type == "meta"
    assert mask.max_kept == (4 + 4 * 4 * 3 if window else 4)  # k + the window's volume on the 4×4×7 tile grid
    for transpose in (False, True):
        plan = plan_for(mask, lay, reg, 64, 128, "meta", transpose=transpose)
        assert plan.chunks.device.type == "meta" and plan.chunks.shape[:3] == (1, 12, 112)
