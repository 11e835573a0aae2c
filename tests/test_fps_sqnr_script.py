"""scripts/fps_sqnr.py --smooth-k: the smoothed column measures what subtracting K's mean does under FP8."""

from __future__ import annotations

import importlib.util
import sys

import torch

from fpsa_train.config import FPSConfig
from fpsa_train.fps.schedule import Schedule, regimes_from_data
from tests.conftest import REPO

SPEC = importlib.util.spec_from_file_location("fps_sqnr", REPO / "scripts" / "fps_sqnr.py")
fps_sqnr = importlib.util.module_from_spec(SPEC)
sys.path.insert(0, str(REPO / "scripts"))
SPEC.loader.exec_module(fps_sqnr)


def _columns(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


def test_k_smoothing_recovers_the_range_a_shared_key_offset_wastes():
    (q, k, v), layout = fps_sqnr.synthetic_qkv((6, 8, 8), 2, 64, seed=0)
    schedule = Schedule.from_config(FPSConfig(regimes=regimes_from_data([
        {"name": "fp8", "sigma": [0.0, 1.0], "quant": {"group": "tile", "factor": [1, 1, 1]},
         "sparsity": {"pattern": "dense"}}])), (6, 8, 8))
    plain = _columns(fps_sqnr.report(schedule, lambda s: [(q, k, v, layout)], smooth_k=True)[2])
    offset = k + 20 * torch.randn(1, 1, 1, k.shape[-1], generator=torch.Generator().manual_seed(1))
    shifted = _columns(fps_sqnr.report(schedule, lambda s: [(q, offset, v, layout)], smooth_k=True)[2])
    # columns: regime, σ, density, vs bf16, vs fp32, K smoothed, "plain / smoothed" means
    assert float(shifted[5]) > float(shifted[4]) + 3  # the offset costs FP8 range; smoothing wins it back
    assert abs(float(shifted[5]) - float(plain[5])) < 1.5  # to about where the keys without offset are
    assert abs(float(plain[5]) - float(plain[4])) < 1.0  # and changes little when K has no offset
