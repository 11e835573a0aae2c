"""`evaluate` on an H100/H200: the candidate's attention is the Hopper FP8 kernel, the reference dense SDPA in bf16,
the per-step timings are synchronised, and a rerun samples nothing."""

from __future__ import annotations

import pytest

from fpsa_train.eval.config import EvaluateConfig
from fpsa_train.eval.runner import evaluate

pytestmark = pytest.mark.gpu


def test_evaluate_runs_the_kernel_against_a_dense_bf16_reference(kernel_sized_deploy, tiny_components, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left quickly on a dark blue background\n"
                       "a green square moving up slowly on a black background\n")
    cfg = EvaluateConfig(candidates=[kernel_sized_deploy], prompts=str(prompts), seeds=[0, 1], steps=4,
                         components=str(tiny_components), out=str(tmp_path / "eval"), device="cuda", per_regime=True)
    results = evaluate(cfg)
    by_key = {v["key"]: v for v in results["variants"]}
    assert by_key["reference"]["attention"] == ["dense SDPA (fps=False: the exported schedule is not applied)"]
    for key in ("deploy", "deploy@early", "deploy@middle", "deploy@late"):
        v = by_key[key]
        assert "Hopper FP8 tile-sparse kernel" in v["attention"][0], v["attention"]
        assert 0 < v["psnr"] <= results["psnr_cap_db"] and 0 < v["ssim"] <= 1 and v["seconds_per_step"] > 0
        print(f"{key}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, density {v['density_mean']:.3f}, "
              f"{v['seconds_per_step'] * 1e3:.1f} ms/step")
    assert by_key["deploy@early"]["density_mean"] < 1  # the (6,6,1) window drops tiles of the 2×2×4 grid
    for i in range(4):  # 2 prompts × 2 seeds: each started from its seed's noise in every variant
        assert len({results["videos"][k][i]["noise_sha256"] for k in by_key}) == 1
    assert evaluate(cfg)["videos_sampled"] == 0
