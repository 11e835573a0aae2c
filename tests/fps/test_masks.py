"""Tile-pair sparsity masks: counts + indices format, 3D window against brute force, top-k, union, pooled scores,
and the learned selector's straight-through gate and density regulariser (CPU, fast)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fpsa_train.fps.masks import (LearnedSelector, TileMask, dense_mask, pooled_tile_scores, token_ranges,
                                  topk_mask, union_mask, window_mask)
from fpsa_train.models.token_order import TokenLayout

GRID_720P, GRID_480P, TILE = (21, 45, 80), (21, 30, 52), (6, 8, 8)


def brute_window(tile_grid, window, query):
    """Key tiles (raster numbering) of the query tile at coordinates `query`: a plain triple loop."""
    kept = []
    for a, b, c in itertools.product(*(range(n) for n in tile_grid)):
        ok = True
        for g, w, qx, kx in zip(tile_grid, window, query, (a, b, c)):
            if w > g:
                continue  # the whole axis
            if not -((w - 1) // 2) <= kx - qx <= w // 2:
                ok = False
        if ok:
            kept.append((a * tile_grid[1] + b) * tile_grid[2] + c)
    return kept


def raster_id(tile_grid, coords):
    return (coords[0] * tile_grid[1] + coords[1]) * tile_grid[2] + coords[2]


# --- window ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [GRID_720P, GRID_480P])
@pytest.mark.parametrize("window", [(3, 3, 3), (6, 6, 1), (2, 2, 2)])
def test_window_matches_brute_force_everywhere(grid, window):
    tile_grid = TokenLayout(grid, "tile", TILE).tile_grid
    assert tile_grid == {GRID_720P: (4, 6, 10), GRID_480P: (4, 4, 7)}[grid]
    mask = window_mask(tile_grid, window)
    assert mask.counts.shape == (1, 1, math.prod(tile_grid))
    # Interior, every face, edge and corner: per axis, first / middle / last tile, all 27 combinations ...
    picks = [sorted({0, n // 2, n - 1}) for n in tile_grid]
    for q in itertools.product(*picks):
        expect = brute_window(tile_grid, window, q)
        u = raster_id(tile_grid, q)
        assert int(mask.counts[0, 0, u]) == len(expect), (q, window)
        assert mask.indices[0, 0, u, : len(expect)].tolist() == expect, (q, window)
    # ... and the count of every tile.
    counts = [len(brute_window(tile_grid, window, q)) for q in itertools.product(*(range(n) for n in tile_grid))]
    assert mask.counts[0, 0].tolist() == counts


def test_window_hand_counts_720p():
    tg = (4, 6, 10)
    c333 = window_mask(tg, (3, 3, 3)).counts[0, 0]
    assert int(c333[raster_id(tg, (1, 2, 5))]) == 27  # interior
    assert int(c333[raster_id(tg, (0, 2, 5))]) == 18  # face
    assert int(c333[raster_id(tg, (0, 0, 5))]) == 12  # edge
    assert int(c333[raster_id(tg, (3, 5, 9))]) == 8  # corner
    c661 = window_mask(tg, (6, 6, 1)).counts[0, 0]  # t: 6 > 4 → whole axis; h: offsets -2..3 clipped; w: 1
    assert int(c661[raster_id(tg, (0, 0, 0))]) == 4 * 4 * 1
    assert int(c661[raster_id(tg, (2, 2, 5))]) == 4 * 6 * 1
    c222 = window_mask(tg, (2, 2, 2)).counts[0, 0]  # offsets 0..1 (extra tile on the later side)
    assert int(c222[raster_id(tg, (0, 0, 0))]) == 8 and int(c222[raster_id(tg, (3, 5, 9))]) == 1


def test_window_larger_than_grid_is_dense_and_bad_window_raises():
    assert torch.equal(window_mask((2, 3, 4), (5, 9, 100)).to_dense(), dense_mask(24).to_dense())
    with pytest.raises(ValueError, match="window"):
        window_mask((4, 6, 10), (3, 0, 3))


# --- format ------------------------------------------------------------------------------------------------


def test_dense_round_trip_ascending_padded_density():
    torch.manual_seed(0)
    dense = torch.rand(2, 3, 7, 9) < 0.4
    dense[0, 0, 0] = False  # an empty row
    mask = TileMask.from_dense(dense)
    assert mask.counts.dtype == torch.int32 and mask.indices.dtype == torch.int32
    assert torch.equal(mask.to_dense(), dense)
    assert mask.indices.shape[-1] == int(dense.sum(-1).max())
    assert torch.equal(mask.counts, dense.sum(-1).int())
    for row, cnt in zip(mask.indices.reshape(-1, mask.indices.shape[-1]), mask.counts.reshape(-1)):
        valid, pad = row[:cnt], row[cnt:]
        assert torch.all(valid[1:] > valid[:-1]) and torch.all(pad == -1)
    assert torch.allclose(mask.density(), dense.float().mean((-1, -2)))
    assert mask.density().dtype == torch.float32 and mask.density().shape == (2, 3)
    empty = TileMask.from_dense(torch.zeros(1, 1, 3, 4, dtype=torch.bool))
    assert empty.indices.shape == (1, 1, 3, 1) and torch.all(empty.indices == -1)


def test_dense_mask_and_expand():
    mask = dense_mask(5)
    assert mask.to_dense().all() and mask.counts.shape == (1, 1, 5)
    assert torch.allclose(mask.density(), torch.ones(1, 1))
    big = window_mask((2, 3, 4), (1, 3, 3)).expand(2, 3)
    assert big.counts.shape == (2, 3, 24) and big.indices.shape[:3] == (2, 3, 24)
    assert torch.equal(big.to_dense(), window_mask((2, 3, 4), (1, 3, 3)).to_dense().expand(2, 3, 24, 24))
    with pytest.raises(ValueError):
        TileMask.from_dense(torch.ones(2, 1, 3, 3, dtype=torch.bool)).expand(3, 1)


def test_token_ranges():
    layout = TokenLayout((5, 6, 9), "tile", (2, 4, 4))
    off = token_ranges(layout)
    assert off.dtype == torch.int64 and off[0] == 0 and off[-1] == layout.seq_len
    assert torch.equal(off[1:] - off[:-1], layout.tile_sizes())


# --- top-k and union ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_keeps_own_plus_best_others(k):
    torch.manual_seed(1)
    scores = torch.randn(2, 2, 12, 12)
    scores[..., ::2] = 0.5  # many ties
    mask = topk_mask(scores, k)
    assert torch.all(mask.counts == min(k, 12))
    for b, h, u in itertools.product(range(2), range(2), range(12)):
        others = sorted((v for v in range(12) if v != u), key=lambda v: (-float(scores[b, h, u, v]), v))
        expect = sorted([u, *others[: k - 1]])
        assert mask.indices[b, h, u, : mask.counts[b, h, u]].tolist() == expect


def test_topk_ties_lower_index_large_k_and_validation():
    mask = topk_mask(torch.zeros(1, 1, 6, 6), 3)
    assert mask.indices[0, 0, 4].tolist() == [0, 1, 4]
    assert topk_mask(torch.randn(1, 2, 5, 5), 50).to_dense().all()
    with pytest.raises(ValueError, match="k"):
        topk_mask(torch.zeros(1, 1, 4, 4), 0)


def test_topk_signed_zeros_tie():
    """−0.0 and +0.0 are one score: the lower index wins, whatever the sign bit (a GPU sort may order bits)."""
    scores = torch.zeros(1, 1, 6, 6)
    scores[..., 0::2] = -0.0
    assert topk_mask(scores, 3).indices[0, 0, 5].tolist() == [0, 1, 5]


def test_union_broadcasts_static_with_dynamic():
    tg = (2, 3, 4)
    static = window_mask(tg, (1, 3, 1))  # (1, 1, 24, 24)
    dynamic = topk_mask(torch.randn(2, 3, 24, 24), 4)  # (2, 3, 24, 24)
    both = union_mask(static, dynamic)
    assert both.counts.shape == (2, 3, 24)
    assert torch.equal(both.to_dense(), static.to_dense() | dynamic.to_dense())
    assert torch.equal(union_mask(dynamic, static).to_dense(), both.to_dense())


# --- pooled scores -----------------------------------------------------------------------------------------


def test_pooled_scores_match_per_tile_loop_on_partial_tiles():
    layout = TokenLayout((5, 6, 9), "tile", (2, 4, 4))  # partial tiles on every axis
    torch.manual_seed(2)
    q = torch.randn(2, 3, layout.seq_len, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, layout.seq_len, 16, dtype=torch.float64)
    scores = pooled_tile_scores(q, k, layout)
    assert scores.dtype == torch.float32 and scores.shape == (2, 3, 18, 18)  # tile grid 3×2×3
    off = token_ranges(layout).tolist()
    pq = torch.stack([q[:, :, a:b].mean(2) for a, b in zip(off[:-1], off[1:])], 2)  # (B, H, N, D)
    pk = torch.stack([k[:, :, a:b].mean(2) for a, b in zip(off[:-1], off[1:])], 2)  # (B, H, N, D)
    naive = pq @ pk.transpose(-1, -2) / 4.0
    assert torch.allclose(scores.double(), naive, atol=1e-5)
    scores.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="order"):
        raster = TokenLayout((5, 6, 9), "raster", (2, 4, 4))
        pooled_tile_scores(q, k, raster)


# --- learned selector --------------------------------------------------------------------------------------


def test_learned_selector_gate_is_one_and_passes_gradient():
    torch.manual_seed(3)
    sel = LearnedSelector(num_heads=3, target_density=0.3, temperature=0.5)
    scores = torch.randn(2, 3, 20, 20, requires_grad=True)
    mask, gate, reg = sel(scores)
    assert gate.dtype == torch.float32 and gate.shape == (2, 3, 20, 20)
    assert torch.equal(gate, torch.ones_like(gate))
    assert reg.dim() == 0
    weights = torch.randn(2, 3, 20, 20)
    (gate * weights * mask.to_dense()).sum().backward()
    for g in (sel.bias.grad, scores.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_learned_selector_regulariser_pulls_density_to_target():
    sel = LearnedSelector(num_heads=2, target_density=0.2)
    with torch.no_grad():
        sel.bias.fill_(3.0)  # keeps far more than 20%
    _, _, reg = sel(torch.randn(1, 2, 32, 32))
    reg.backward()
    assert torch.all(sel.bias.grad > 0)  # gradient descent lowers the bias, hence the density
    sel.zero_grad()
    with torch.no_grad():
        sel.bias.fill_(-3.0)
    sel(torch.randn(1, 2, 32, 32))[2].backward()
    assert torch.all(sel.bias.grad < 0)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.5, 1.0])
def test_learned_selector_init_density_near_target(target):
    torch.manual_seed(4)
    sel = LearnedSelector(num_heads=4, target_density=target)
    # bias = Φ⁻¹(target) (clamped to 1 - 1e-6 where Φ⁻¹ is infinite)
    assert torch.allclose(torch.special.ndtr(sel.bias.double()), torch.tensor(min(target, 1 - 1e-6),
                          dtype=torch.float64), atol=1e-6)
    mask, _, _ = sel(torch.randn(2, 4, 512, 512))
    assert torch.all((mask.density() - target).abs() < 0.1), mask.density()


def test_learned_selector_head_range_uses_those_heads():
    """Under sequence parallelism a rank's scores hold a range of the heads: the selector uses their bias entries,
    and its regulariser is weighted by the range's share of the heads."""
    torch.manual_seed(6)
    sel = LearnedSelector(num_heads=4, target_density=0.3)
    with torch.no_grad():
        sel.bias.add_(torch.randn(4))
    scores = torch.randn(2, 4, 24, 24)
    mask, gate, _ = sel(scores)
    part_mask, part_gate, part_reg = sel(scores[:, 2:], heads=slice(2, 4))
    assert torch.equal(part_mask.to_dense(), mask.to_dense()[:, 2:]) and torch.equal(part_gate, gate[:, 2:])
    soft = torch.sigmoid((scores - scores.mean(-1, keepdim=True)) * torch.rsqrt(scores.var(-1, unbiased=False,
                         keepdim=True) + sel.eps) + sel.bias[None, :, None, None])  # (B, H, N, N)
    assert torch.allclose(part_reg, (soft[:, 2:].mean() - 0.3) ** 2 / 2)
    with pytest.raises(ValueError, match="H=2"):
        sel(scores, heads=slice(2, 4))


def test_learned_selector_static_and_validation():
    tg = (2, 3, 4)
    static = window_mask(tg, (3, 3, 3))
    sel = LearnedSelector(num_heads=2, target_density=0.05)
    mask, _, _ = sel(torch.randn(3, 2, 24, 24), static=static)
    dense = mask.to_dense()
    assert torch.equal(dense | static.to_dense(), dense)  # static ⊆ learned
    for kwargs, name in [(dict(target_density=0.0), "target_density"), (dict(target_density=1.5), "target_density"),
                         (dict(target_density=0.5, temperature=0.0), "temperature")]:
        with pytest.raises(ValueError, match=name):
            LearnedSelector(num_heads=2, **kwargs)
    with pytest.raises(ValueError):
        sel(torch.randn(1, 3, 24, 24))  # wrong head count


# --- every mask kind keeps the diagonal --------------------------------------------------------------------


def test_every_mask_kind_keeps_own_tile():
    tg = (4, 6, 10)
    n = math.prod(tg)
    torch.manual_seed(5)
    scores = torch.randn(2, 3, n, n)
    scores.diagonal(dim1=-2, dim2=-1).fill_(-1e4)  # the own tile scores worst: it must still be kept
    sel = LearnedSelector(num_heads=3, target_density=0.1)
    masks = [window_mask(tg, w) for w in [(3, 3, 3), (6, 6, 1), (2, 2, 2), (1, 1, 1)]]
    masks += [topk_mask(scores, 1), topk_mask(scores, 7), union_mask(masks[1], topk_mask(scores, 3)),
              sel(scores)[0], dense_mask(n)]
    eye = torch.eye(n, dtype=torch.bool)
    for mask in masks:
        assert torch.all(mask.to_dense()[..., eye]), mask.shape
