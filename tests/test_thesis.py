"""scripts/thesis.py: its variants are the densities they claim on the proving ground's tile grid, its recovery
arithmetic, and the whole experiment (PTQ export, QAT fine-tunes with the dense control, evaluation, tables) on the
tiny model on CPU, the same code path the H200 runs on the proving-ground model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from fpsa_train.config import FPSConfig
from fpsa_train.export import ExportConfig, export
from fpsa_train.flow import sampling_sigmas
from fpsa_train.fps.masks import window_mask
from fpsa_train.fps.schedule import Schedule
from fpsa_train.sample import flow_unipc
from tests.conftest import REPO

SPEC = importlib.util.spec_from_file_location("thesis", REPO / "scripts" / "thesis.py")
thesis = importlib.util.module_from_spec(SPEC)
sys.path.insert(0, str(REPO / "scripts"))
SPEC.loader.exec_module(thesis)

PROVING_TILES = (3, 4, 4)  # 256×256×17: latent 5×32×32, patch 1×2×2 → 5×16×16 tokens in 2×4×4 tiles


def _schedule(name: str, tmp_path) -> Schedule:
    return Schedule.from_config(FPSConfig(schedule_file=str(thesis.schedule_file(name, tmp_path))), (2, 4, 4))


def _density(regime) -> float:
    n = PROVING_TILES[0] * PROVING_TILES[1] * PROVING_TILES[2]
    if regime.pattern == "dense":
        return 1.0
    if regime.pattern == "topk":
        return regime.topk / n
    assert regime.pattern == "window"
    return window_mask(PROVING_TILES, regime.window).counts.float().mean().item() / n


@pytest.mark.parametrize("name, density", [("fp8", 1.0), ("fp8_k24", 0.5), ("fp8_k12", 0.25), ("sparse_k12", 0.25),
                                           ("fp8_k6", 0.125), ("fp8_k15", 0.3125), ("fp8_window333", 0.304)])
def test_uniform_variants_keep_the_density_they_are_named_for(name, density, tmp_path):
    schedule = _schedule(name, tmp_path)
    assert len(schedule.regimes) == 1 and schedule.regimes[0].lo == 0 and schedule.regimes[0].hi == 1
    assert _density(schedule.regimes[0]) == pytest.approx(density, abs=0.001)
    assert schedule.regimes[0].quantized == name.startswith("fp8")


def test_the_step_aware_variant_costs_what_uniform_top12_costs_over_50_sampling_steps(tmp_path):
    schedule = _schedule("fp8_stepaware25", tmp_path)
    sigmas = flow_unipc(50, 5.0, 1000, torch.device("cpu")).sigmas[:50]
    mean = sum(_density(schedule.regime_for(float(s))) for s in sigmas) / 50
    assert mean == pytest.approx(0.25, abs=0.005)
    assert {r.name for r in schedule.regimes} == {"early", "middle", "late"}


def test_default_regime_variants_apply_one_regime_and_leave_the_rest_dense(tmp_path):
    for regime in ("early", "middle", "late"):
        schedule = _schedule(f"default_{regime}", tmp_path)
        touched = [r.name for r in schedule.regimes if r.quantized or r.pattern != "dense"]
        assert touched == [regime]


def test_recovery_is_the_fraction_of_the_ptq_loss_that_qat_wins_back():
    def row(key, psnr, acc):
        return {"key": key, "psnr": psnr, "accuracy": {"all": acc}}

    rows = [row("dense", None, 0.9), row("ptq_x", 20.0, 0.5), row("qat_x", 30.0, 0.8),
            row("qat_dense_ft", 40.0, 0.95)]
    got = thesis.recovery(rows)["x"]
    assert got["mse_recovered"] == pytest.approx(0.9)  # MSE 0.01 → 0.001
    assert got["accuracy_lost"] == pytest.approx(0.4)
    assert got["accuracy_recovered"] == pytest.approx(0.75)  # 0.3 of 0.4
    assert got["accuracy_recovered_net_of_control"] == pytest.approx(0.625)  # the control alone gained 0.05


def test_the_experiment_end_to_end_on_the_tiny_model(trained_checkpoint, tiny_components, tmp_path):
    """PTQ and QAT of one variant plus the dense control, and the QAT run's step-1 checkpoint (the N-step curve),
    evaluated against the dense base: every row there.
    ~75 s on 2 cores (a dozen subprocesses), above the `slow` marker's 30 s, kept in `make test` on purpose: it is
    the only CPU run of the code path the GPU experiment depends on."""
    base = export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / "base")))["out"]
    out = tmp_path / "thesis"
    data = ["data=synthetic", "data.num_samples=8", "data.val_samples=2", "data.batch_size=2",
            "data.latent_frames=3", "data.latent_height=8", "data.latent_width=16",
            "logger.wandb=false", "logger.tensorboard=false"]
    cmd = [sys.executable, "scripts/thesis.py", "--base", base, "--experiment", "tiny", "--out", str(out),
           "--variants", "fp8", "--qat-steps", "2", "--curve", "fp8:1", "--parallel", "2", "--eval-steps", "2",
           "--eval-prompts", "2", "--eval-batch", "2", "--train-backend", "reference",
           "--eval-override", f"components={tiny_components}", "--eval-override", "height=32",
           "--eval-override", "width=128", "--eval-override", "frames=5", *data]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    keys = [r["key"] for r in report["rows"]]
    assert keys == ["dense", "ptq_fp8", "qat_dense_ft", "qat_fp8", "qat_fp8_1"]
    assert report["qat_steps_done"] == {"qat_fp8": 2, "qat_fp8_1": 1, "qat_dense_ft": 2} and not report["failed"]
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["dense"]["psnr"] is None and rows["ptq_fp8"]["psnr"] > 0 and rows["qat_fp8"]["density_mean"] == 1.0
    assert "fp8" in report["recovery"] and "| qat_fp8 | 2 |" in (out / "thesis.md").read_text()


def test_report_names_rows_and_reads_speed_off_the_measured_density_curve(tmp_path):
    """scripts/thesis_report.py: row keys → (method, variant, curve step), and a schedule's expected speedup is
    cuDNN's time over the mean of its steps' whole-call times, interpolated on the uniform top-k curve."""
    spec = importlib.util.spec_from_file_location("thesis_report", REPO / "scripts" / "thesis_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.variant_of("qat_fp8_k12_100") == ("qat", "fp8_k12", 100)
    assert report.variant_of("qat_dense_ft") == ("qat", "dense_ft", None)
    assert report.variant_of("ptq_default_early") == ("ptq", "default_early", None)
    bench = {"results": [{"name": "wan14B-720p", "sdpa_cudnn": 100.0, "dense": {"c": 90.0}, "best_dense_config": "c",
                          "schedules": {"uniform_0.5": {"avg_density": 0.5, "avg_call_ms": 50.0},
                                        "uniform_0.25": {"avg_density": 0.25, "avg_call_ms": 30.0}}}]}
    k12 = report.schedule_of("fp8_k12", tmp_path)  # not in the folder: the variant's own spec
    per_step = [report.regime_density(k12.regime_for(s), 0.0) for s in sampling_sigmas()]
    assert per_step == [0.25] * 50
    assert report.speedup_720p(k12, per_step, bench, "fp8_k12") == pytest.approx(100 / 30)
    assert report.speedup_720p(k12, [0.375] * 50, bench, "fp8_k12") == pytest.approx(100 / 40)  # half-way
    assert report.speedup_720p(k12, [1.0] * 50, bench, "fp8_k12") == pytest.approx(100 / 90)  # the dense FP8 call
    assert report.speedup_720p(None, [1.0] * 50, bench, "dense_ft") == 1.0  # bf16 SDPA: the baseline itself
