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
        assert set(parts) == {*bench_deploy.PARTS, "total"} and parts["unattributed"] == 0  # no GPU here
        for name in bench_deploy.COMPONENTS[:3]:
            assert parts[name] > 0, (attention, name, parts)
        assert abs(sum(parts[c] for c in bench_deploy.PARTS) - parts["total"]) < 1e-6, parts
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


def test_the_breakdown_counts_each_op_once_under_autocast():
    """Autocast re-dispatches linear under its own name (aten::linear inside aten::linear): summing per-op totals
    counted such ops twice, and the H200's first split came out at 2.5 to 3.5 times the step. Each op's own time counts
    once: the parts add up to the profiled ops' own times, and the linears cannot exceed the whole."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(512, 256)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.gelu(net(x)).sum()

    step()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    parts = bench_deploy.attribute(prof.events(), cuda=False)
    nested = [e for e in prof.events() if e.name == "aten::linear" and e.cpu_parent is not None
              and e.cpu_parent.name == "aten::linear"]
    assert nested, "autocast no longer nests aten::linear: this test no longer exercises the double count"
    assert 0 < parts["linears"] <= parts["total"] and parts["other"] > 0, parts
    own = sum(e.self_cpu_time_total for e in prof.events() if e.device_type == DeviceType.CPU) / 1e3
    assert abs(parts["total"] - own) < 1e-6 * max(own, 1)  # every op's own time, once
    inclusive = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "aten::linear") / 1e3
    assert inclusive > 1.5 * parts["linears"]  # what the old sum reported: the nested copy counted again
