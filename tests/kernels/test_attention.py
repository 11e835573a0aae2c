"""The FP8 tile-sparse forward kernel against the PyTorch reference (CPU: Triton interpreter, small shapes).

Tolerances are derived in helpers.py: the L2 budget (twice the reference's own P-rounding error, plus bf16 output
rounding) and the per-element worst case. When a row's keys fit in one chunk the kernel's running max is the exact
row max, so it must equal the reference up to the bf16 rounding of the output (and rare fp32-level rounding flips).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fpsa_kernels import unsupported_reason
from fpsa_train.fps.kernel import fps_attention
from fpsa_train.fps.masks import topk_mask, window_mask
from fpsa_train.fps.reference import quantize_inputs
from fpsa_train.models.token_order import TokenLayout
from tests.conftest import make_regime

from .helpers import BF16_ULP, KINDS, elementwise_bound, make_inputs, reference_and_budget, token_mask

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (GPU: test_attention_gpu)")

LAYOUT = TokenLayout((3, 6, 10), "tile", (2, 4, 4))  # 2×2×3 tiles, partial on t and w; L = 180


def run(q, k, v, reg, mask=None, blocks=(32, 16), layout=LAYOUT):
    out, lse = fps_attention(q, k, v, layout, reg, mask, block_m=blocks[0], block_n=blocks[1])
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    return out.float(), lse


def the_mask(reg, q, k, layout=LAYOUT):
    from fpsa_train.fps.reference import select_tiles

    return select_tiles(q, k, layout, reg).mask


@pytest.mark.parametrize("reg", [make_regime(), make_regime("window", window=(1, 1, 1)), make_regime("topk", topk=3),
                                 make_regime("window_topk", "subtile", window=(1, 1, 1), topk=2)],
                         ids=["dense", "window", "topk", "window_topk-subtile"])
def test_kernel_within_the_elementwise_worst_case(reg):
    q, k, v = make_inputs("normal", 1, 2, LAYOUT, 64, seed=2)
    mask = the_mask(reg, q, k)
    out, lse = run(q, k, v, reg, mask)
    ref, budget = reference_and_budget(q, k, v, LAYOUT, reg, mask)
    keep = token_mask(mask, LAYOUT)
    bound = elementwise_bound(q, k, v, LAYOUT, reg, keep) + BF16_ULP * ref.abs() + 1e-6
    assert torch.all((out - ref).abs() <= bound), float(((out - ref).abs() / bound).max())
    assert torch.linalg.vector_norm(out - ref) <= budget
    qh, kh, _ = quantize_inputs(q, k, v, LAYOUT, reg)
    s = (qh @ kh.transpose(-1, -2) / math.sqrt(64)).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-5)


def test_one_chunk_per_row_equals_the_reference():
    """All keys in one chunk: P is quantized against the exact row max, as in the reference."""
    layout = TokenLayout((2, 4, 6), "tile", (2, 4, 4))  # L = 48
    q, k, v = make_inputs("peaked", 2, 2, layout, 64, seed=3)
    reg = make_regime()
    out, _ = run(q, k, v, reg, blocks=(16, 64), layout=layout)
    ref, budget = reference_and_budget(q, k, v, layout, reg, None)
    within = (out - ref).abs() <= BF16_ULP * ref.abs() + 1e-6
    assert within.float().mean() > 0.999, within.float().mean()  # an e4m3 tie flipped by an fp32 ulp is allowed
    bf16_only = BF16_ULP * torch.linalg.vector_norm(ref)
    assert torch.linalg.vector_norm(out - ref) <= 1.5 * bf16_only < budget  # far below the multi-chunk budget


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_that_stress_fp8(kind):
    q, k, v = make_inputs(kind, 1, 2, LAYOUT, 64, seed=4)
    reg = make_regime("window_topk", "tiles", window=(1, 3, 1), topk=2)
    mask = the_mask(reg, q, k)
    out, _ = run(q, k, v, reg, mask)
    ref, budget = reference_and_budget(q, k, v, LAYOUT, reg, mask)
    assert torch.linalg.vector_norm(out - ref) <= budget, (torch.linalg.vector_norm(out - ref).item(), budget)


def test_batch_with_per_head_masks_and_head_dim_128():
    q, k, v = make_inputs("peaked", 2, 2, LAYOUT, 128, seed=5)
    n = len(LAYOUT.tile_sizes())
    scores = torch.randn(2, 2, n, n, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(scores, 4)  # a different mask for every (batch, head)
    reg = make_regime("topk", topk=4)
    out, _ = run(q, k, v, reg, mask, blocks=(16, 32))
    ref, budget = reference_and_budget(q, k, v, LAYOUT, reg, mask)
    assert torch.linalg.vector_norm(out - ref) <= budget


def test_static_mask_broadcast_over_batch_and_heads():
    q, k, v = make_inputs("normal", 2, 3, LAYOUT, 64, seed=6)
    reg = make_regime("window", window=(1, 3, 1))
    mask = window_mask(LAYOUT.tile_grid, (1, 3, 1))  # (1, 1, N, K)
    out, _ = run(q, k, v, reg, mask)
    ref, budget = reference_and_budget(q, k, v, LAYOUT, reg, mask)
    assert torch.linalg.vector_norm(out - ref) <= budget
    cached, _ = run(q, k, v, reg, None)  # the regime's own window: the plan cached per layout
    assert torch.equal(cached, out)


def test_refuses_what_it_does_not_support():
    q = torch.zeros(1, 1, LAYOUT.seq_len, 64)
    with pytest.raises(ValueError, match="does not quantize"):
        fps_attention(q, q, q, LAYOUT, dataclasses.replace(make_regime(), quant=None))
    with pytest.raises(ValueError, match="D in"):
        fps_attention(q[..., :48], q[..., :48], q[..., :48], LAYOUT, make_regime())
    with pytest.raises(ValueError, match="learned"):
        fps_attention(q, q, q, LAYOUT, make_regime("learned"))
    assert unsupported_reason(q) is None
    assert "CPU tensors only" in unsupported_reason(torch.zeros(1, device="meta"))


def test_knobs_given_as_none_take_their_defaults():
    """`block_m=None` is "no preference" (the GPU tests pass their parametrised blocks straight through): the call
    runs the KernelConfig defaults, bit for bit; an unknown knob is refused."""
    q, k, v = make_inputs("normal", 1, 1, LAYOUT, 64, seed=7)
    reg = make_regime()
    default, _ = fps_attention(q, k, v, LAYOUT, reg)
    none, _ = fps_attention(q, k, v, LAYOUT, reg, block_m=None, block_n=None, qk_imprecise_acc=None, bwd_blocks=None)
    assert torch.equal(none, default)
    with pytest.raises(TypeError, match="block_size"):
        fps_attention(q, k, v, LAYOUT, reg, block_size=64)


def test_gluon_forward_is_refused_where_it_cannot_run_and_skipped_by_training():
    """forward="gluon" names a GPU-only inference kernel: on the CPU interpreter an inference call says so and how to
    fix it; a training call runs the Triton forward (which saves the backward's statistics) whatever `forward` says;
    an unknown forward is refused when the config is built."""
    q, k, v = make_inputs("normal", 1, 1, LAYOUT, 64, seed=8)
    reg = make_regime()
    with pytest.raises(ValueError, match="no CPU interpreter"):
        fps_attention(q, k, v, LAYOUT, reg, forward="gluon")
    with pytest.raises(ValueError, match="forward='cuda'"):
        fps_attention(q, k, v, LAYOUT, reg, forward="cuda")
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    trained, _ = fps_attention(qg, kg, vg, LAYOUT, reg, forward="gluon")
    trained.float().sum().backward()
    assert qg.grad is not None and torch.equal(trained, fps_attention(q, k, v, LAYOUT, reg)[0])


def test_gluon_plan_blocks_match_its_default_variant():
    """fp8_attention plans the Gluon forward at GLUON_BLOCK without importing Gluon; the kernel refuses any other
    plan, so the constant must be its default variant's rows."""
    from fpsa_kernels.attention import GLUON_BLOCK
    from fpsa_kernels.gluon_forward import DEFAULT_VARIANT, block_m

    assert block_m(DEFAULT_VARIANT) == GLUON_BLOCK
