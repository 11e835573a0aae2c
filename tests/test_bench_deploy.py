"""scripts/bench_deploy.py's step breakdown: the profiler's time of one step split into self-attention,
cross-attention, linears and the rest (CPU op time here; GPU kernel time on the H200)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_the_in_memory_runtime_is_what_load_deploy_builds(kernel_deploy):  # noqa: F811
    """`--no-export` (14B: no 2 × 27 GB written) times the runtime that `in_memory_deploy` assembles from the dense
    model's weights; it must be the one load_deploy builds from an export of those weights: same attention on
    every regime, same velocity."""
    from fpsa_train.deploy import SCHEDULE, load_deploy

    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 16, 3, 8, 16, generator=g), torch.randn(2, 5, 64, generator=g)
    loaded = load_deploy(kernel_deploy)
    dense = load_deploy(kernel_deploy, fps=False).model
    built = bench_deploy.in_memory_deploy(dense, str(Path(kernel_deploy) / SCHEDULE), compile=False, fp8_linears=False)
    assert built.model is not dense and built.backend == loaded.backend
    assert [r.name for r in built.schedule.regimes] == [r.name for r in loaded.schedule.regimes]
    for regime in loaded.schedule.regimes:
        sigma = (regime.lo + regime.hi) / 2
        torch.testing.assert_close(built.denoise(x, sigma, text, timestep=500),
                                   loaded.denoise(x, sigma, text, timestep=500), rtol=0, atol=0)
    plain = load_deploy(kernel_deploy, fps=False).denoise(x, 0.6, text, timestep=500)
    assert (built.denoise(x, 0.6, text, timestep=500) - plain).abs().max() > 1e-4  # FPS really is applied
