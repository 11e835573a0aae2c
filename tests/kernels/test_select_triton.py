"""The Triton top-k selection (`topk_keep_triton`, the GPU's selection in `select_keep`) against the torch statement
(fps/masks.py `topk_keep`, ∪ the window): the same kept tiles exactly, with ties, NaN, ±inf, −0.0 and k >= N.
CPU: Triton's interpreter at small shapes; `gpu`: the same at Wan's shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

from fpsa_kernels import unsupported_reason
from fpsa_kernels.select import topk_keep_triton
from fpsa_train.fps.masks import select_keep, topk_keep, window_keep
from fpsa_train.models.token_order import TokenLayout

from ..fps.test_select_keep import tricky_scores

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (GPU: the `gpu` tests here)")
LAYOUT = TokenLayout((5, 9, 11), "tile", (2, 4, 4))  # 3×3×3 tiles, partial on every axis


def signed_zero_scores(batch: int, heads: int, n: int) -> torch.Tensor:
    """Rows of +0.0 and −0.0 (and a few ties above them): only the index may break their ties."""
    s = torch.zeros(batch, heads, n, n)
    s[..., 1::2] = -0.0
    s[..., 0, 3:6] = 1.0
    return s


@cpu_only
@pytest.mark.parametrize("k", [1, 2, 5, 27, 40])
def test_topk_is_the_torch_topk_with_ties_nan_and_inf(k):
    scores = tricky_scores(2, 3, 27, seed=k)
    scores[1, 2] = signed_zero_scores(1, 1, 27)[0, 0]
    got = topk_keep_triton(scores, k)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, topk_keep(scores, k).keep)
    assert (got.sum(-1) == min(k, 27)).all()


@cpu_only
@pytest.mark.parametrize("k", [1, 17, 100])
def test_topk_over_many_tiles_and_strided_half_scores(k):
    """N = 100 (128 lanes: several blocks of competitors, the last partial), bf16 scores (many ties) seen through a
    transpose (non-contiguous)."""
    g = torch.Generator().manual_seed(k)
    scores = (torch.randn(1, 1, 100, 100, generator=g) * 4).round().bfloat16().transpose(-1, -2)
    assert not scores.is_contiguous()
    assert torch.equal(topk_keep_triton(scores, k), topk_keep(scores, k).keep)


@cpu_only
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 1, 2), (6, 6, 3)])
def test_union_with_the_window(window):
    scores = tricky_scores(2, 2, 27, seed=1)
    static = window_keep(LAYOUT.tile_grid, window)
    want = topk_keep(scores, 3).union(static)
    assert torch.equal(topk_keep_triton(scores, 3, static.keep), want.keep)


@cpu_only
@pytest.mark.parametrize("window", [None, (3, 1, 2)])
def test_select_keep_fused_is_select_keep(window):
    """select_keep's kernel branch (taken on GPUs; forced here): the same KeepMask, bound included."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, LAYOUT.seq_len, 16, generator=g) for _ in range(2))
    q[..., :40, :] = 0.0  # zero tiles: all-tied scores
    for topk in (1, 4, 27):
        fused, plain = (select_keep(q, k, LAYOUT, topk, window, fused=flag) for flag in (True, False))
        assert torch.equal(fused.keep, plain.keep) and fused.max_kept == plain.max_kept


@cpu_only
def test_bad_arguments_are_refused():
    scores = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_keep_triton(scores, 0)
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        topk_keep_triton(scores[0], 1)
    with pytest.raises(ValueError, match="window must be bool"):
        topk_keep_triton(scores, 1, torch.ones(1, 1, 4, 5, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or unsupported_reason(torch.zeros(1, device="cuda")) is not None,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("grid, heads", [((21, 30, 52), 12), ((21, 45, 80), 40)])
def test_wan_shapes_select_identically_on_the_gpu(grid, heads):
    """Wan 480p and 720p tile grids: random scores with ties, NaN, ±inf and ±0.0 rows, with and without a window."""
    lay = TokenLayout(grid, "tile", (6, 8, 8))
    n = len(lay.tile_sizes())
    scores = tricky_scores(1, heads, n, seed=0)
    scores[0, 1] = signed_zero_scores(1, 1, n)[0, 0]
    scores = scores.cuda()
    static = window_keep(lay.tile_grid, (3, 3, 3), "cuda")
    for k in (1, 4, n // 4, n, n + 3):
        assert torch.equal(topk_keep_triton(scores, k), topk_keep(scores, k).keep)
        assert torch.equal(topk_keep_triton(scores, k, static.keep), topk_keep(scores, k).union(static).keep)
