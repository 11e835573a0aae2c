"""The kernel package on its own: it imports nothing of the training framework, and a call with a plan and scale
groups built without it is bit for bit the framework's call for the same regime."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fpsa_kernels import KernelConfig, QuantGroups, dense_plan, fp8_attention
from fpsa_train.fps.kernel import fps_attention
from tests.conftest import make_regime

from .helpers import make_inputs
from .test_attention import LAYOUT


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_importing_the_kernels_imports_no_framework():
    code = ("import sys, fpsa_kernels; bad = sorted(m for m in sys.modules if m.startswith('fpsa_train')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_plan_and_groups_without_the_framework_give_the_frameworks_output():
    q, k, v = make_inputs("normal", 1, 2, LAYOUT, 64, seed=3, device=device())
    seq = LAYOUT.seq_len
    out, lse = fp8_attention(q, k, v, QuantGroups(seq), dense_plan(seq, 32, 16, q.device))  # one scale per token
    want, want_lse = fps_attention(q, k, v, LAYOUT, make_regime(quant="token"), block_m=32, block_n=16)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_training_needs_a_planner():
    q, k, v = make_inputs("normal", 1, 1, LAYOUT, 64, seed=4, device=device())
    seq = LAYOUT.seq_len
    with pytest.raises(ValueError, match="Planner"):
        fp8_attention(q.requires_grad_(), k, v, QuantGroups(seq), dense_plan(seq, 32, 16, q.device))
    with pytest.raises(ValueError, match="bwd_blocks"):
        KernelConfig(bwd_blocks=(64, 128))
