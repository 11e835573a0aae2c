"""Top-k tile selection on the GPU in one Triton kernel: the keep mask of the top-k sparsity patterns from their pooled
tile scores, united with a static window.

Why a kernel. The selection runs once per attention call on the GPU, and its torch statement (the framework's
fps/masks.py `topk_keep`, then the union with the window) is a dozen small operations: a sort of every row, a
scatter, the union. Each costs a launch on the host, and the host's launches, not the GPU's work, were most of the
selection's time (docs/bench_select_h200.md). Here one program per (batch, head, query tile) row ranks its scores
and writes its keep row, the window's row or-ed in.

The ranking, exactly `topk_keep`'s: a row's own tile first, then by score descending, ties to the lower key index;
a NaN score ranks last (as −inf, tied by index with the −inf scores); +inf ranks as the largest finite score, below
the own tile; −0.0 ties with +0.0. Each score becomes an int32 whose signed order is that order (`_rank_key`: the
fp32 bits, NaN, +inf and −0.0 replaced, a negative float's magnitude bits flipped), and a tile is kept when fewer
than k tiles are ahead of it: a larger key, or an equal key at a lower index. Counting them is O(N²) per row, in
blocks of key tiles (N is at most a few hundred tiles); it is exact for any k, ties included, and keeps exactly
min(k, N) tiles.

Pooling stays in torch (fps/masks.py `pooled_tile_scores`): its per-tile sums use `index_add` (atomic adds on a GPU)
and a cuBLAS matmul, whose summation orders a kernel cannot reproduce, and the scores must be the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rank_key(scores, tiles, u, N):
    """int32 keys (one per tile of `tiles`, a query row u's fp32 scores) whose signed order is the ranking, high
    first. On the bits, so no compiler float rule (NaN compares, signed zeros) can change it."""
    bits = scores.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, -8388608, bits)  # NaN ranks last: as -inf (0xFF800000)
    bits = tl.where(bits == 0x7F800000, 0x7F7FFFFF, bits)  # +inf: as the largest finite score
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ties with +0.0
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' magnitude bits flipped: two's complement order
    key = tl.where(tiles == u, 2147483647, key)  # the own tile first
    return tl.where(tiles < N, key, -2147483648)  # padding lanes: below -inf's key, -2139095041


@triton.jit
def _topk_keep_kernel(scores, window, keep, H, N, k, s_sb, s_sh, s_su, s_sv, w_su, w_sv,
                      HAS_WINDOW: tl.constexpr, NP: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row (query tile u, b·H + h): keep[b, h, u, v] for the NP lanes v (a power of two >= N), counting for each
    lane the tiles ahead of it, BLOCK_W tiles at a time (NP × BLOCK_W = 2048 comparisons a step: 64 registers on
    sm_90 at 4 warps, where 4096 take 128)."""
    u = tl.program_id(0)
    bh = tl.program_id(1)
    row = scores + (bh // H) * s_sb + (bh % H) * s_sh + u * s_su
    tiles = tl.arange(0, NP)
    key = _rank_key(tl.load(row + tiles * s_sv, mask=tiles < N, other=0.0).to(tl.float32), tiles, u, N)
    ahead = tl.zeros([NP], dtype=tl.int32)
    for w0 in range(0, N, BLOCK_W):
        others = w0 + tl.arange(0, BLOCK_W)
        other = _rank_key(tl.load(row + others * s_sv, mask=others < N, other=0.0).to(tl.float32), others, u, N)
        tied = (other[None, :] == key[:, None]) & (others[None, :] < tiles[:, None])  # (NP, BLOCK_W)
        ahead += tl.sum(((other[None, :] > key[:, None]) | tied).to(tl.int32), 1)  # (NP,)
    kept = (tiles < N) & (ahead < k)
    if HAS_WINDOW:
        kept = kept | (tl.load(window + u * w_su + tiles * w_sv, mask=tiles < N, other=0) != 0)
    tl.store(keep + (bh * N + u) * N + tiles, kept.to(tl.int8), mask=tiles < N)


def topk_keep_triton(scores: Tensor, k: int, window: Tensor | None = None) -> Tensor:
    """bool (B, H, N, N): per query tile its own tile plus the k − 1 best-scoring others (min(k, N) in all), or-ed
    with `window` (bool (1, 1, N, N), a static mask shared by batch and heads) when given.

    scores: (B, H, N, N), any float dtype and strides. Equal to fps/masks.py `topk_keep(scores, k)` (∪ the window)
    bit for bit; no host read. Runs on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if k < 1:
        raise ValueError(f"top-k selection: k must be >= 1, got k={k}")
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"top-k selection: scores must be (B, H, N, N), got {tuple(scores.shape)}")
    b, h, n, _ = scores.shape
    if window is not None and (window.dtype != torch.bool or tuple(window.shape) != (1, 1, n, n)):
        raise ValueError(f"top-k selection: window must be bool (1, 1, {n}, {n}), got {window.dtype} "
                         f"{tuple(window.shape)}")
    keep = torch.empty((b, h, n, n), dtype=torch.bool, device=scores.device)
    win = keep if window is None else window  # unread without a window
    lanes = triton.next_power_of_2(n)
    _topk_keep_kernel[(n, b * h)](scores, win.view(torch.uint8), keep.view(torch.uint8), h, n, min(k, n),
                                  *scores.stride(), win.stride(2), win.stride(3), HAS_WINDOW=window is not None,
                                  NP=lanes, BLOCK_W=min(lanes, max(1, 2048 // lanes)), num_warps=4)
    return keep
