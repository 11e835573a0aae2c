"""The deploy runtime under torch.compile with Inductor on an H100/H200: one graph per regime around the FPS attention
op (fps/op.py), and the velocity of the eager runtime.

Inductor fuses the bf16 elementwise work around the op differently from eager, so its activations differ at bf16
rounding, and some FP8 roundings inside attention flip with them: the comparison is an SQNR floor, not equality
(tests/fps/test_op.py holds the traced graph to equality with aot_eager on CPU). The floor sits well above the
kernel-vs-reference floor of tests/test_deploy_gpu.py (25 dB): compiling must cost far less accuracy than FP8 does.
Timings are printed (eager vs compiled, per regime) and not asserted; scripts/bench_deploy.py --compile measures.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from fpsa_train.config import resolve
from fpsa_train.deploy import load_deploy
from fpsa_train.export import ExportConfig, export
from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.fps.schedule import Schedule
from fpsa_train.fps.transform import fps_cores
from fpsa_train.lit.module import RUN_CONFIG_KEY
from fpsa_train.models.build import architecture_of
from fpsa_train.models.wan import WanModel
from fpsa_train.train import run_config
from tests.conftest import compose_train

pytestmark = pytest.mark.gpu

# head_dim 128 (the kernel's), the default schedule (window, dense, window ∪ top-k), 2×2×4 tiles of 2×4×4 tokens
KERNEL_SIZED = ["+experiment=tiny", "data=synthetic", "model.dim=256", "model.num_heads=2", "model.ffn_dim=512",
                "data.latent_frames=4", "data.latent_height=16", "data.latent_width=32"]
SQNR_FLOOR_DB = 35.0


@pytest.fixture(scope="module")
def deploy_folder(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tmp = tmp_path_factory.mktemp("compile_gpu")
    conf = resolve(compose_train(KERNEL_SIZED, tmp))
    schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    torch.manual_seed(0)
    model = WanModel(architecture_of(conf.model))
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the published init zeroes it: outputs would be 0
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                RUN_CONFIG_KEY: run_config(conf, schedule), "global_step": 0}, tmp / "last.ckpt")
    return export(ExportConfig(checkpoint=str(tmp / "last.ckpt"), out=str(tmp / "deploy")))["out"]


def median_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def test_inductor_compiled_runtime_matches_eager(deploy_folder):
    torch._dynamo.reset()
    eager = load_deploy(deploy_folder, device="cuda")
    compiled = load_deploy(deploy_folder, device="cuda", compile=True)  # fullgraph: Dynamo raises on a break
    assert compiled.compiled and "Hopper FP8" in compiled.backend and "reference" not in compiled.backend
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 16, 32, generator=g).cuda()
    text = torch.randn(2, 512, 64, generator=g).cuda()
    for regime in compiled.schedule.regimes:
        sigma = (regime.lo + regime.hi) / 2
        ref, got = eager.denoise(x, sigma, text), compiled.denoise(x, sigma, text)
        assert {c.last_backend for c in fps_cores(compiled.model)} == {"kernel"}, regime.name
        db = sqnr_db(ref, got)
        ms_eager = median_ms(lambda: eager.denoise(x, sigma, text))
        ms_compiled = median_ms(lambda: compiled.denoise(x, sigma, text))
        print(f"{regime.name}: compiled vs eager SQNR {db:.1f} dB; step {ms_eager:.2f} ms eager, "
              f"{ms_compiled:.2f} ms compiled")
        assert db > SQNR_FLOOR_DB, f"{regime.name}: SQNR {db:.1f} dB"
    torch._dynamo.reset()
