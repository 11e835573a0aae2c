"""The training kernel on a Hopper GPU at Wan 1.3B's 480p shape, against the reference's gradients run tile by tile.

Budgets as in grad_reference.py. Marked `gpu`: they run on the lent H100 (`pytest -m gpu tests/kernels`), not in CI.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpsa_kernels import unsupported_reason
from fpsa_train.fps.kernel import fps_attention
from fpsa_train.fps.reference import select_tiles
from fpsa_train.models.token_order import TokenLayout

from .grad_reference import reference_grads
from .helpers import make_inputs
from .test_attention_gpu import REGIMES, TILE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or unsupported_reason(torch.zeros(1, device="cuda"))
                                 is not None, reason="needs a Hopper GPU")]

GRID_480P = (21, 30, 52)  # 32,760 tokens


@pytest.mark.parametrize("regime", ["dense", "early", "middle", "late"])
@pytest.mark.parametrize("kind", ["normal", "peaked"])
def test_gradients_at_480p(kind, regime):
    layout = TokenLayout(GRID_480P, "tile", TILE)
    reg = REGIMES[regime]
    q, k, v = make_inputs(kind, 1, 12, layout, 128, seed=1, device="cuda")
    mask = select_tiles(q, k, layout, reg).mask
    dout = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(q.dtype)
    qk = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, _ = fps_attention(*qk, layout, reg, None if reg.pattern in ("dense", "window") else mask)
    out.backward(dout)
    ref = reference_grads(q, k, v, layout, reg, mask, dout, max_rows=768)
    for name, x in zip(("dq", "dk", "dv"), qk):
        assert torch.isfinite(x.grad).all()
        ref.check(name, x.grad)


def test_peak_memory_not_above_dense_sdpa():
    """One forward + backward at 480p: no L² buffer, and no more memory than cuDNN's bf16 SDPA."""
    layout = TokenLayout(GRID_480P, "tile", TILE)
    q, k, v = (x.requires_grad_() for x in make_inputs("normal", 1, 12, layout, 128, device="cuda"))
    dout = torch.randn_like(q)

    def peak(fn):
        fn().backward(dout)  # compile / warm up
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward(dout)
        torch.cuda.synchronize()
        q.grad = k.grad = v.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours = max(peak(lambda: fps_attention(q, k, v, layout, REGIMES[r])[0]) for r in ("dense", "early", "middle"))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        sdpa = peak(lambda: F.scaled_dot_product_attention(q, k, v))
    assert ours <= sdpa, (ours / 2**20, sdpa / 2**20)
    assert ours < q.numel() * 2 * 16  # far below one L² score buffer (12 · 32760² · 2 bytes = 24 GiB)
