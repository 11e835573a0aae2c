"""Fidelity of a candidate's video to the reference's video from the same prompt, seed and initial noise.

What the paper reports (reference/fpsattention.md §6, Table 2: PSNR, SSIM and LPIPS against the BF16 model's videos)
computed on what a viewer gets: the decoded uint8 frames, as float in [0, 1] (data range 1), RGB, frame by frame.
A video's score is the mean over its frames, a model's the mean over its videos.

- PSNR (torchmetrics `peak_signal_noise_ratio`): 10·log10(1 / MSE) per frame. Identical frames have MSE 0 and
  PSNR +inf, which would make every mean inf; each frame's PSNR is therefore capped at `PSNR_CAP_DB` = 100 dB.
  Why 100: one uint8 level of difference in one channel of one pixel is MSE = (1/255)²/(3·H·W), i.e. 48.1 dB +
  10·log10(3·H·W): 80 dB at 64×128, 107 dB at 480×832. So a capped frame is identical or differs by a few
  levels in a few pixels of a large frame; "100.00" in the results means indistinguishable, not measured.
- SSIM (torchmetrics `structural_similarity_index_measure`, its defaults: Gaussian window 11, σ 1.5, k1 0.01,
  k2 0.03) per frame over the three channels; identical frames give exactly 1.
- LPIPS (AlexNet, torchmetrics' bundled linear heads) only when torchvision and the AlexNet weights are already
  on this machine: they are never downloaded; otherwise the results say which is missing (`lpips_unavailable`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PSNR_CAP_DB = 100.0
CHUNK = 16  # frames per metric call: bounds the memory of SSIM's five filtered maps at 720p


def as_frames(video: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, H, W, 3) uint8 → (T, 3, H, W) fp32 in [0, 1]."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) uint8 video, got {video.dtype} {video.shape}")
    return torch.from_numpy(video).to(device).permute(0, 3, 1, 2).float() / 255.0


def _check_pair(candidate: np.ndarray, reference: np.ndarray) -> None:
    if candidate.shape != reference.shape:
        raise ValueError(f"videos of different shapes cannot be compared: {candidate.shape} vs {reference.shape}")


def psnr_frames(candidate: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """PSNR in dB of each frame (T,), capped at PSNR_CAP_DB."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(candidate, reference)
    out = []
    for i in range(0, len(candidate), CHUNK):
        x, y = as_frames(candidate[i:i + CHUNK], device), as_frames(reference[i:i + CHUNK], device)
        psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))  # (n,) inf if equal
        out.append(psnr.clamp(max=PSNR_CAP_DB).cpu())
    return torch.cat(out).double().numpy()


def ssim_frames(candidate: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """SSIM of each frame (T,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(candidate, reference)
    out = []
    for i in range(0, len(candidate), CHUNK):
        x, y = as_frames(candidate[i:i + CHUNK], device), as_frames(reference[i:i + CHUNK], device)
        out.append(structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").cpu())  # (n,)
    return torch.cat(out).double().numpy()


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot be computed here without downloading anything (None: it can)."""
    try:
        import torchvision
    except ImportError:
        return "torchvision is not installed (LPIPS's AlexNet backbone comes from torchvision)"
    weights = torchvision.models.AlexNet_Weights.DEFAULT
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not file.is_file():
        return f"the AlexNet weights {file} are not on this machine (never downloaded here; place that file)"
    return None


class Lpips:
    """LPIPS (AlexNet) per frame, built once; only construct when `lpips_unavailable()` is None."""

    def __init__(self, device: torch.device | str = "cpu"):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.device = device
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()

    @torch.no_grad()
    def frames(self, candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """LPIPS of each frame (T,); inputs in [0, 1] (normalize=True maps them to [-1, 1])."""
        _check_pair(candidate, reference)
        values = []
        for i in range(len(candidate)):
            x, y = as_frames(candidate[i:i + 1], self.device), as_frames(reference[i:i + 1], self.device)
            values.append(float(self.metric(x, y)))
            self.metric.reset()
        return np.asarray(values, dtype=np.float64)


def fidelity(candidate: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu",
             lpips: Lpips | None = None) -> dict:
    """{psnr, ssim, lpips (None without LPIPS)}: means over frames of one video pair, plus the per-frame values."""
    psnr, ssim = psnr_frames(candidate, reference, device), ssim_frames(candidate, reference, device)
    lp = lpips.frames(candidate, reference) if lpips is not None else None
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
            "lpips": float(lp.mean()) if lp is not None else None,
            "psnr_frames": psnr.round(4).tolist(), "ssim_frames": ssim.round(6).tolist(),
            "lpips_frames": lp.round(6).tolist() if lp is not None else None}
