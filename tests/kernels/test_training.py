"""The training kernel (forward + Triton backward) against the reference's autograd (CPU: Triton interpreter).

Each test runs `fps_attention` on inputs that require grad, back-propagates a random output gradient, and checks
dq, dk, dv (and the selector gate's gradient) element by element against the reference's autograd within the
worst-case bound derived in grad_reference.py, which must itself be small against the gradient.
"""

from __future__ import annotations

import pytest
import torch

from fpsa_train.fps.kernel import fps_attention, plan_for
from fpsa_train.fps.masks import LearnedSelector, TileMask, pooled_tile_scores, topk_mask
from fpsa_train.fps.reference import select_tiles
from tests.conftest import make_regime

from .grad_reference import reference_grads
from .helpers import make_inputs
from .test_attention import LAYOUT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (GPU: test_training_gpu)")

BLOCKS = dict(block_m=32, block_n=16, bwd_blocks=(32, 16, 16, 32))


def kernel_grads(q, k, v, reg, mask, dout, gate=None, layout=LAYOUT, blocks=BLOCKS):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    gate = None if gate is None else gate.detach().clone().requires_grad_()
    out, lse = fps_attention(q, k, v, layout, reg, mask, gate, **blocks)
    assert out.requires_grad and not lse.requires_grad
    out.backward(dout)
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    for name, g in grads.items():
        assert g.dtype == q.dtype and g.shape == q.shape and torch.isfinite(g).all(), name
    if gate is not None:
        grads["dgate"] = gate.grad
    return out.detach(), grads


def check(kind, reg, mask=None, heads=2, head_dim=64, batch=1, seed=0, layout=LAYOUT, gate=None, blocks=BLOCKS):
    q, k, v = make_inputs(kind, batch, heads, layout, head_dim, seed=seed)
    mask = mask if mask is not None else select_tiles(q, k, layout, reg).mask
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q.dtype)
    out, grads = kernel_grads(q, k, v, reg, mask, dout, gate, layout, blocks)
    ref = reference_grads(q, k, v, layout, reg, mask, dout, gate)
    return {name: ref.check(name, g) for name, g in grads.items()}


@pytest.mark.parametrize("reg", [make_regime(), make_regime("window", window=(1, 1, 1)), make_regime("topk", topk=3),
                                 make_regime("window_topk", "subtile", window=(1, 1, 1), topk=2)],
                         ids=["dense", "window", "topk", "window_topk-subtile"])
def test_gradients_match_the_reference(reg):
    check("normal", reg)


@pytest.mark.parametrize("kind", ["peaked", "outliers", "zero_tiles"])
def test_gradients_on_inputs_that_stress_fp8(kind):
    check(kind, make_regime("window_topk", "tiles", window=(1, 3, 1), topk=2), seed=4)


@pytest.mark.parametrize("kind", ["near_max", "large"])
def test_gradients_stay_finite_at_huge_logits(kind):
    """Inputs near e4m3's max or scaled by 1e4 give logits of 1e6 and more: the softmax is one-hot and fp32 cannot
    resolve its near-ties, so no implementation's gradient is comparable there; they must stay finite and dV (a
    sum of P̂-weighted dO, insensitive to which near-tie wins only up to that tie) must be sized like the reference."""
    reg = make_regime("window_topk", "tiles", window=(1, 3, 1), topk=2)
    q, k, v = make_inputs(kind, 1, 2, LAYOUT, 64, seed=4)
    mask = select_tiles(q, k, LAYOUT, reg).mask
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(q.dtype)
    out, grads = kernel_grads(q, k, v, reg, mask, dout)  # asserts finite gradients
    ref = reference_grads(q, k, v, LAYOUT, reg, mask, dout)
    norm = torch.linalg.vector_norm
    assert 0.5 < norm(grads["dv"].float()) / norm(ref.grads["dv"]) < 2.0


def test_backward_blocks_other_than_the_forwards():
    """The backward builds its own query plan when its blocks differ from the forward's (else it reuses that one)."""
    check("normal", make_regime("topk", topk=3), blocks=dict(block_m=32, block_n=16, bwd_blocks=(16, 32, 32, 16)))


def test_per_head_masks_batch_two_and_head_dim_128():
    n = len(LAYOUT.tile_sizes())
    mask = topk_mask(torch.randn(2, 2, n, n, generator=torch.Generator().manual_seed(0)), 4)
    check("peaked", make_regime("topk", topk=4), mask, batch=2, head_dim=128, seed=5,
          blocks=dict(block_m=16, block_n=32, bwd_blocks=(16, 32, 32, 16)))


def test_key_tiles_no_query_attends_get_zero_gradient():
    n = len(LAYOUT.tile_sizes())
    keep = torch.eye(n, dtype=torch.bool)
    keep[:, 0] = True  # every query tile attends itself and tile 0; tile 3 is attended by itself only
    keep[3, 3] = False
    keep[3, 0] = True
    mask = TileMask.from_dense(keep[None, None])
    plan = plan_for(mask, LAYOUT, make_regime("topk", topk=1), 16, 32, "cpu", transpose=True)
    assert int(plan.chunk_count[0, 0, 3]) == 0
    q, k, v = make_inputs("normal", 1, 2, LAYOUT, 64, seed=7)
    out, grads = kernel_grads(q, k, v, make_regime("topk", topk=1), mask, torch.randn(q.shape).to(q.dtype))
    lo, hi = (int(x) for x in LAYOUT.tile_sizes().cumsum(0)[2:4])
    assert torch.all(grads["dk"][:, :, lo:hi] == 0) and torch.all(grads["dv"][:, :, lo:hi] == 0)
    assert grads["dk"][:, :, :lo].abs().sum() > 0


def test_learned_selector_gets_the_reference_gradient():
    """A learned regime: the gate (value 1) multiplies each kept pair's P; its gradient is dS summed per pair, and
    through the gate's sigmoid it reaches the selector's per-head bias."""
    reg = make_regime("learned", window=(1, 1, 1))
    q, k, v = make_inputs("peaked", 1, 2, LAYOUT, 64, seed=8)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    selector = LearnedSelector(2, 0.4)
    static = select_tiles(q, k, LAYOUT, make_regime("window", window=(1, 1, 1))).mask
    mask, gate, _ = selector(pooled_tile_scores(q.float(), k.float(), LAYOUT), static)
    out, grads = kernel_grads(q, k, v, reg, mask, dout, gate)
    ref = reference_grads(q, k, v, LAYOUT, reg, mask, dout, gate)
    for name in ("dq", "dk", "dv", "dgate"):
        ref.check(name, grads[name])
    # d loss / d bias = Σ dgate · ∂gate/∂bias with ∂gate/∂bias = soft (1 − soft) / T >= 0, so the bound maps too
    # d loss / d bias = the gate's vector-Jacobian product with dgate; ∂gate/∂bias >= 0 (a sigmoid's slope), so the
    # budget maps through it as for the other gradients: twice the emulated roundings' effect plus the logit term
    def to_bias(dgate, retain=True):
        return torch.autograd.grad(gate, selector.bias, dgate, retain_graph=retain)[0]

    bias_k, bias_ref = to_bias(grads["dgate"]), to_bias(ref.grads["dgate"])
    budget = 2 * (to_bias(ref.emulated["dgate"]) - bias_ref).abs() + to_bias(ref.score_bounds["dgate"], False)
    assert torch.all((bias_k - bias_ref).abs() <= budget), (bias_k, bias_ref, budget)
    assert torch.all(budget < bias_ref.abs()), (bias_ref, budget)  # a zero or sign-flipped gradient fails


def test_no_grad_calls_do_not_build_a_graph():
    q, k, v = make_inputs("normal", 1, 2, LAYOUT, 64)
    q.requires_grad_()
    with torch.no_grad():
        out, _ = fps_attention(q, k, v, LAYOUT, make_regime(), block_m=32, block_n=16)
    assert not out.requires_grad
