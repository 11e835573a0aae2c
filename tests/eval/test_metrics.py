"""Fidelity metrics on frames whose PSNR and SSIM can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fpsa_train.eval.metrics import PSNR_CAP_DB, fidelity, lpips_unavailable, psnr_frames, ssim_frames


def _constant(values: list[int], h: int = 24, w: int = 32) -> np.ndarray:
    """A (T, H, W, 3) uint8 video whose frame t is the grey level values[t] everywhere."""
    return np.broadcast_to(np.asarray(values, dtype=np.uint8)[:, None, None, None], (len(values), h, w, 3)).copy()


def test_psnr_per_frame_is_10_log10_of_one_over_the_mse_in_unit_range():
    reference = _constant([0, 0, 100])
    candidate = _constant([51, 0, 110])  # frame 0: every value off by 51/255 = 0.2; frame 2: by 10/255
    psnr = psnr_frames(candidate, reference)
    assert psnr[0] == pytest.approx(10 * math.log10(1 / 0.2**2), abs=1e-4)  # 13.9794 dB
    assert psnr[1] == PSNR_CAP_DB  # identical frame: torchmetrics says +inf, we cap
    assert psnr[2] == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)  # 28.1308 dB


def test_psnr_of_a_single_differing_pixel_value():
    reference = _constant([128], h=16, w=16)
    candidate = reference.copy()
    candidate[0, 3, 5, 1] += 1  # one channel of one pixel, one level: MSE = (1/255)² / (16·16·3)
    expected = 10 * math.log10(16 * 16 * 3 * 255**2)  # 76.98 dB, below the cap
    assert psnr_frames(candidate, reference)[0] == pytest.approx(expected, abs=1e-3)


def test_ssim_of_constant_frames_is_the_luminance_term():
    """For constant frames the variances and covariance vanish, so SSIM = (2ab + C1) / (a² + b² + C1) with
    C1 = (0.01·1)², whatever the window."""
    a, b = 51 / 255, 102 / 255  # 0.2 and 0.4
    c1 = 0.01**2
    ssim = ssim_frames(_constant([102, 51, 51]), _constant([51, 51, 102]))
    assert ssim[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-5)  # 0.80010
    assert ssim[1] == pytest.approx(1.0, abs=1e-6)
    assert ssim[2] == pytest.approx(ssim[0], abs=1e-6)  # symmetric in its arguments


def test_identical_videos_give_the_psnr_cap_and_ssim_one():
    video = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    result = fidelity(video, video.copy(), lpips=None)
    assert result["psnr"] == PSNR_CAP_DB and all(p == PSNR_CAP_DB for p in result["psnr_frames"])
    assert result["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert result["lpips"] is None


def test_video_values_are_means_over_frames():
    reference = _constant([0, 0])
    candidate = _constant([51, 0])
    result = fidelity(candidate, reference)
    assert result["psnr"] == pytest.approx((10 * math.log10(25) + PSNR_CAP_DB) / 2, abs=1e-4)
    assert result["ssim"] == pytest.approx(np.mean(result["ssim_frames"]))


def test_videos_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        psnr_frames(_constant([0, 0]), _constant([0]))


def test_lpips_is_unavailable_without_torchvision_and_says_why():
    pytest.importorskip("torchmetrics")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "torchvision is not installed" in lpips_unavailable()
    else:
        reason = lpips_unavailable()
        assert reason is None or "AlexNet weights" in reason
