"""Compile-only checks, on the CPU, of the Gluon forward's variants (kernels/gluon_forward.py), through
scripts/experiments/probe_gluon_fwd.py's compile check.

Gluon has no interpreter, so nothing here runs the kernel: each variant is compiled for sm_90 (`triton.compile` with
a GPUTarget, then ptxas for sm_90a) and its PTX is checked for the structure the plan asks for (warp-specialised
partitions with setmaxnreg, FP8 wgmma with P in registers, TMA + mbarriers, no spills). The numerics
are checked on the GPU: tests/kernels/test_attention_gpu.py (`test_gluon_*`, against the reference) and the probe.

The compiles run in a subprocess without TRITON_INTERPRET: tests/conftest.py sets it on CPU hosts before Triton is
imported, and then `triton.language.standard`'s helpers (which `gl.sum`/`gl.max` call) are interpreter functions
that a Gluon compile rejects.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import compile_check_lines

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

PROBE = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "probe_gluon_fwd.py"
KERNEL = Path(__file__).resolve().parents[2] / "kernels" / "gluon_forward.py"
FAST = ("ws1_m64_s2", "two_m128_s2")
"""One consumer warpgroup, two unordered (the default): ~2 s each to compile; the rest of the sweep is `slow`."""
ALL = ("ws1_m64_s2", "ws1_m64_s3", "ws1_m64_s2_r128", "coop_m128_s2", "two_m128_s2", "two_m128_s3", "two_m128_s4")
"""gluon_forward.VARIANTS (not imported here: the probe imports Gluon, see the module docstring)."""
# (consumer partitions, Q rows per consumer, warps of the default partition, ring stages, maxnreg)
SHAPE = {"ws1_m64_s2": (1, 64, 4, 2, 240), "ws1_m64_s3": (1, 64, 4, 3, 240), "ws1_m64_s2_r128": (1, 64, 4, 2, 128),
         "coop_m128_s2": (1, 128, 8, 2, 168), "two_m128_s2": (2, 64, 4, 2, 168), "two_m128_s3": (2, 64, 4, 3, 168),
         "two_m128_s4": (2, 64, 4, 4, 168)}


def compile_checks(names) -> dict[str, dict]:
    """probe_gluon_fwd.compile_check of each variant (it asserts the PTX properties itself and reports a failure as
    {"failed": ...}), in a clean subprocess."""
    infos, _, failure = compile_check_lines(PROBE, "--compile-only", "--variants", ",".join(names))
    out = {info["variant"]: info for info in infos}
    assert set(out) == set(names), failure
    return out


def check(info: dict) -> None:
    name = info["variant"]
    assert "failed" not in info, f"{name}: {info['failed']}"
    consumers, rows, warps, stages, maxnreg = SHAPE[name]
    assert info["num_warps"] == warps + 4 * (consumers - 1) + 4  # + the 1-warp loader, padded to a warpgroup
    assert info["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"]
    assert info["tma"] == consumers + 2  # a Q box per consumer, then one K and one Vᵀ load per chunk
    # 4 m64n128k32 wgmma per product (K = 128), two products per consumer, P·V's 4 from registers
    assert info["wgmma_count"] == 8 * consumers and info["wgmma_p_in_registers"] == 4 * consumers
    assert any(m.startswith("setmaxnreg.dec") for m in info["setmaxnreg"])
    assert any(m.startswith("setmaxnreg.inc") for m in info["setmaxnreg"])
    assert info["ptxas_rc"] == 0 and info["registers"] is not None and info["registers"] <= maxnreg
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0
    # shared memory holds at least Q (consumers × rows × D) and the ring (stages × (K + Vᵀ) tiles), all e4m3
    assert consumers * rows * 128 + stages * 2 * 128 * 128 <= info["shared"] <= 232448


@pytest.fixture(scope="module")
def fast() -> dict[str, dict]:
    return compile_checks(FAST)


@pytest.mark.parametrize("name", FAST)
def test_gluon_forward_compiles_for_sm90(fast, name):
    check(fast[name])


@pytest.mark.slow
def test_gluon_forward_every_variant_compiles_for_sm90():
    infos = compile_checks([n for n in ALL if n not in FAST])
    for info in infos.values():
        check(info)


def test_every_variant_is_covered():
    """ALL and SHAPE list exactly gluon_forward.VARIANTS (read from its source: importing it needs Gluon unbroken)."""
    names = re.findall(r'^    "(\w+)": dict\(consumers=', KERNEL.read_text(), flags=re.M)
    assert names and sorted(names) == sorted(ALL) == sorted(SHAPE)
