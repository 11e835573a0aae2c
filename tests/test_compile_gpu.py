"""The deploy runtime under torch.compile with Inductor on an H100/H200: one graph per regime around the FPS attention
op (fps/op.py), and the velocity of the eager runtime.

Inductor fuses the bf16 elementwise work around the op differently from eager, so its activations differ at bf16
rounding, and some FP8 roundings inside attention flip with them: the comparison is an SQNR floor, not equality
(tests/fps/test_op.py holds the traced graph to equality with aot_eager on CPU). The floor sits well above the
kernel-vs-reference floor of tests/test_deploy_gpu.py (25 dB): compiling must cost far less accuracy than FP8 does.
Timings are printed (eager vs compiled, per regime) and not asserted; scripts/bench_deploy.py --compile measures.
"""

from __future__ import annotations

import pytest
import torch
import triton

from fpsa_train.deploy import load_deploy
from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.fps.transform import fps_cores
from tests.conftest import kernel_sized_steps

pytestmark = pytest.mark.gpu

SQNR_FLOOR_DB = 35.0


def test_inductor_compiled_runtime_matches_eager(kernel_sized_deploy):
    torch._dynamo.reset()
    eager = load_deploy(kernel_sized_deploy, device="cuda")
    compiled = load_deploy(kernel_sized_deploy, device="cuda", compile=True)  # fullgraph: Dynamo raises on a break
    assert compiled.compiled and "Hopper FP8" in compiled.backend and "reference" not in compiled.backend
    x, text, steps = kernel_sized_steps(compiled)
    for regime, sigma in steps:
        ref, got = eager.denoise(x, sigma, text), compiled.denoise(x, sigma, text)
        assert {c.last_backend for c in fps_cores(compiled.model)} == {"kernel"}, regime.name
        db = sqnr_db(ref, got)
        ms_eager = triton.testing.do_bench(lambda: eager.denoise(x, sigma, text), return_mode="median")
        ms_compiled = triton.testing.do_bench(lambda: compiled.denoise(x, sigma, text), return_mode="median")
        print(f"{regime.name}: compiled vs eager SQNR {db:.1f} dB; step {ms_eager:.2f} ms eager, "
              f"{ms_compiled:.2f} ms compiled")
        assert db > SQNR_FLOOR_DB, f"{regime.name}: SQNR {db:.1f} dB"
    torch._dynamo.reset()
