"""Tile-major token order: a bijection, contiguous tiles, partial edge tiles, RoPE positions that travel."""

from __future__ import annotations

import math

import pytest
import torch

from fpsa_train.models.rope import axis_dims, rope_angles
from fpsa_train.models.token_order import TokenLayout, tile_major_permutation, tile_sizes


@pytest.mark.parametrize("grid, tile", [((21, 45, 80), (6, 8, 8)), ((21, 30, 52), (6, 8, 8)),
                                        ((5, 6, 9), (2, 4, 4)), ((4, 8, 8), (2, 4, 4))])
def test_permutation_groups_each_tile_contiguously(grid, tile):
    perm = tile_major_permutation(grid, tile)
    n = math.prod(grid)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))  # a bijection
    t, h, w = (perm // (grid[1] * grid[2]), (perm // grid[2]) % grid[1], perm % grid[2])
    tile_id = ((t // tile[0]) * -(-grid[1] // tile[1]) + h // tile[1]) * -(-grid[2] // tile[2]) + w // tile[2]
    assert torch.all(tile_id[1:] >= tile_id[:-1])  # tiles appear as contiguous runs, in raster order of tiles
    sizes = tile_sizes(grid, tile)
    assert int(sizes.sum()) == n and len(sizes) == math.prod(-(-g // s) for g, s in zip(grid, tile))
    assert torch.equal(torch.bincount(tile_id), sizes)


def test_partial_edge_tiles_at_720p():
    layout = TokenLayout((21, 45, 80), "tile", (6, 8, 8))
    sizes = layout.tile_sizes()
    assert layout.tile_grid == (4, 6, 10)
    assert sizes.max() == 384 and sizes.min() == 3 * 5 * 8  # last t-tile has 3 frames, last h-tile 5 rows
    assert int(sizes.sum()) == 75_600  # no padding


def test_inverse_undoes_permutation():
    layout = TokenLayout((5, 6, 9), "tile", (2, 4, 4))
    x = torch.randn(2, layout.seq_len, 3)
    tiled = x[:, layout.permutation()]
    assert torch.equal(tiled[:, layout.inverse_permutation()], x)
    assert TokenLayout((5, 6, 9), "raster", (2, 4, 4)).permutation() is None


def test_rope_positions_travel_with_tokens():
    grid, head_dim = (5, 6, 9), 32
    angles = rope_angles(grid, head_dim)  # raster
    layout = TokenLayout(grid, "tile", (2, 4, 4))
    perm = layout.permutation()
    idx = perm[17]  # the 18th token in tile order is raster token idx
    t, h, w = idx // 54, (idx // 9) % 6, idx % 9
    dt, dh, _ = axis_dims(head_dim)
    row = angles[perm][17]
    # each axis' first frequency is 1, so that angle equals the integer position on that axis
    assert row[0] == t and row[dt // 2] == h and row[(dt + dh) // 2] == w


def test_rope_split_is_44_42_42_at_head_dim_128():
    assert axis_dims(128) == (44, 42, 42)
    with pytest.raises(ValueError, match="RoPE table"):
        rope_angles((2000, 1, 1), 128)
