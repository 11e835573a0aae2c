"""scripts/bench_deploy.py's step breakdown: the profiler's time of one step split into self-attention,
cross-attention, linears and the rest (CPU op time here; GPU kernel time on the H200)."""

from __future__ import annotations

import importlib.util

import torch

from tests.conftest import REPO
from tests.fps.test_op import kernel_deploy  # noqa: F401  (a kernel-sized tiny export with early/middle/late)

SPEC = importlib.util.spec_from_file_location("bench_deploy", REPO / "scripts" / "bench_deploy.py")
bench_deploy = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_deploy)


def test_the_breakdown_finds_each_component_and_they_sum_to_the_step(kernel_deploy):  # noqa: F811
    from fpsa_train.deploy import load_deploy

    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 3, 8, 16, generator=g), torch.randn(2, 5, 64, generator=g)
    fps = load_deploy(kernel_deploy, backend="kernel")  # the FPS op (Triton interpreter on CPU)
    dense = load_deploy(kernel_deploy, fps=False)  # SDPA for self- and cross-attention
    for deployed, attention in ((fps, "the op"), (dense, "SDPA")):
        parts = bench_deploy.step_breakdown(lambda: deployed.denoise(x, 0.6, text, timestep=500), cuda=False)
        assert set(parts) == {*bench_deploy.COMPONENTS, "total"}
        for name in bench_deploy.COMPONENTS[:3]:
            assert parts[name] > 0, (attention, name, parts)
        named = sum(parts[c] for c in bench_deploy.COMPONENTS[:3])  # inclusive times: nothing counted twice
        assert named <= parts["total"] * 1.001 and abs(named + parts["other"] - parts["total"]) < 1e-6, parts
    # the interpreter makes the op far slower than SDPA: the split must see that, not lump it into "other"
    fps_parts = bench_deploy.step_breakdown(lambda: fps.denoise(x, 0.6, text, timestep=500), cuda=False)
    dense_parts = bench_deploy.step_breakdown(lambda: dense.denoise(x, 0.6, text, timestep=500), cuda=False)
    assert fps_parts["self-attention"] > 10 * dense_parts["self-attention"]
