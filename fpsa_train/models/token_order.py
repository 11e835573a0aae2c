"""Token order inside the DiT: raster (t, h, w) as published, or tile-major for a 3D tile shape.

Block-sparse attention works on contiguous runs of tokens, so FPS attention wants every 3D tile of the latent
grid (default 6×8×8 patched tokens) to be one contiguous run. We permute the tokens once after patchify and
once back before unpatchify; every block in between is order-agnostic except for RoPE, whose positions are
permuted with their tokens. Grids the tile does not divide (720p: 21×45×80 with 6×8×8) get partial edge tiles
instead of padding, so no compute is wasted on pad tokens.

Tile-major order: tiles in raster order over the tile grid, and inside a tile the tokens in raster order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits: what an attention implementation needs to know about the sequence."""

    grid: tuple[int, int, int]
    """Patched token grid (t, h, w); the sequence length is their product."""
    order: str
    """`raster` or `tile`."""
    tile_shape: tuple[int, int, int]
    """3D tile (t, h, w) in tokens (meaningful for `tile` order; kept for raster so masks can still be built)."""

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """Number of tiles per axis (edge tiles may be partial)."""
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile_shape))

    def permutation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Index tensor p with `tokens_in_order = tokens_raster[:, p]`; None for raster order."""
        if self.order == "raster":
            return None
        return tile_major_permutation(self.grid, self.tile_shape).to(device)

    def inverse_permutation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Index tensor q with `tokens_raster = tokens_in_order[:, q]`; None for raster order."""
        if self.order == "raster":
            return None
        return _inverse(self.grid, self.tile_shape).to(device)

    def tile_sizes(self) -> torch.Tensor:
        """Tokens per tile in tile-major order (int64, length = number of tiles); partial tiles are smaller."""
        return tile_sizes(self.grid, self.tile_shape)


def _tile_ids(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Tile index of every token in raster order, tiles numbered in raster order over the tile grid."""
    (gt, gh, gw), (tt, th, tw) = grid, tile
    n_h, n_w = -(-gh // th), -(-gw // tw)
    it = torch.arange(gt) // tt  # (T,)
    ih = torch.arange(gh) // th  # (H,)
    iw = torch.arange(gw) // tw  # (W,)
    ids = (it[:, None, None] * n_h + ih[None, :, None]) * n_w + iw[None, None, :]  # (T, H, W)
    return ids.reshape(-1)


@functools.lru_cache(maxsize=64)
def tile_major_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Raster → tile-major gather indices (CPU int64). A stable sort by tile id keeps raster order inside tiles."""
    grid, tile = tuple(int(g) for g in grid), tuple(int(t) for t in tile)
    with torch.inference_mode(False):  # cached: must stay usable by autograd when first built under validation
        return torch.argsort(_tile_ids(grid, tile), stable=True)


@functools.lru_cache(maxsize=64)
def _inverse(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.argsort(tile_major_permutation(grid, tile))


@functools.lru_cache(maxsize=64)
def tile_sizes(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    n_tiles = math.prod(-(-g // t) for g, t in zip(grid, tile))
    with torch.inference_mode(False):
        return torch.bincount(_tile_ids(tuple(grid), tuple(tile)), minlength=n_tiles)
