"""Brief training of the tiny Wan VAE on the synthetic clips (CPU, or a GPU when present), so the demo decodes to
recognisable video.

A few hundred steps from diffusers' default init leave a decoder that ignores its latents (~15 dB). Starting from a
smooth near-identity (`init_for_short_training`) and training on random crops with L1 + MSE of the unclamped
decoder output reaches ~23 dB on held-out clips in the same steps. `train_vae` also sets the latent statistics
that preprocessing normalises with. Used by fpsa_train/data/tiny_models.py.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

CROP = (5, 40, 40)  # (frames, height, width): one causal first frame + one 4-frame chunk; sized for the CPU budget
BATCH = 2
LR = 2e-4  # 1e-3 and above is unstable with the RMS norms; measured best of 1e-4 .. 2e-3
EVAL_FRAMES = 17  # full-clip evaluation: 17 frames → 5 latent frames


@torch.no_grad()
def init_for_short_training(vae, mean_rgb: torch.Tensor) -> None:
    """Start the VAE as a smooth near-identity, so a few hundred steps suffice (from diffusers' init they do not).

    Every conv: N(0, 1/fan_in), zero bias, and only its current-frame tap (causal 3D convs act per frame, so
    appearance is learnt before motion). Residual branches (second conv) and attention outputs: zero, so each block
    starts as its shortcut. Spatial resampling: 2×2 average down, bilinear up; temporal resampling: keep the
    current frame (down) or repeat it (up). Input and output are centred on the clips' mean colour (dark
    backgrounds), so the RMS norms see colour differences rather than one large common offset.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            m.bias.zero_()
            if m.weight.dim() == 5 and m.weight.shape[2] == 3 and m.weight.shape[3] > 1:
                m.weight[:, :, :2] = 0.0  # (C_out, C_in, kt, kh, kw): causal taps t-2, t-1 off
                m.weight[:, :, 2] *= math.sqrt(3.0)
    bilinear = torch.tensor([0.25, 0.5, 0.25])
    for m in vae.modules():
        if isinstance(m, WanResidualBlock):
            m.conv2.weight.zero_()
        elif isinstance(m, WanAttentionBlock):
            m.proj.weight.zero_()
        elif isinstance(m, WanResample) and m.mode != "none":
            if hasattr(m, "time_conv"):  # (C_out, C_in, 3, 1, 1); upsampling has C_out = 2 C_in (two frames)
                w = m.time_conv.weight
                w.zero_()
                for k in range(w.shape[0] // w.shape[1]):
                    w[k * w.shape[1]:(k + 1) * w.shape[1], :, 2, 0, 0] = torch.eye(w.shape[1])
            w = m.resample[1].weight  # Conv2d (C_out, C_in, 3, 3): after nearest ×2 up, or stride 2 after a pad
            w.zero_()
            idx = torch.arange(min(w.shape[:2]))  # up halves the channels: keep the first half
            if m.mode.startswith("up"):
                w[idx, idx] = torch.outer(bilinear, bilinear)  # nearest ×2 then this = bilinear ×2
            else:
                w[idx, idx, :2, :2] = 0.25  # stride 2 after a right/bottom pad: the 2×2 block average
    conv_in = vae.encoder.conv_in
    conv_in.bias.copy_(-conv_in.weight.sum((2, 3, 4)) @ mean_rgb)
    vae.decoder.conv_out.bias.copy_(mean_rgb)


def train_vae(vae, videos: list[Path], seed: int, steps: int, eval_clips: int, stats_clips: int,
              device: str | torch.device = "cpu") -> dict:
    """Train `vae` in place on `device` (the crops are drawn on the CPU by a seeded generator, so the sequence of
    batches is the same everywhere); it is returned to the CPU with its latent statistics set."""
    device = torch.device(device)
    clips = [_load_video(p) for p in videos]  # each (3, T, H, W) uint8
    n_eval = eval_clips if len(clips) > eval_clips else 0
    train, held_out = clips[: len(clips) - n_eval], clips[len(clips) - n_eval:] or clips[:eval_clips]
    init_for_short_training(vae, torch.stack([_signed(c).mean((1, 2, 3)) for c in train]).mean(0))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    warmup, total = max(1, steps // 20), max(1, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay to 5 %
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / total))))
    # A second OpenMP thread makes a step at most ~15 % faster (0.235 vs 0.27 s, 2 cores), but stalls 10-50× when
    # another process holds a core (seen on a busy box): so one thread when the load average says the cores are busy.
    threads, losses, t0 = torch.get_num_threads(), [], time.perf_counter()
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 1
    train_threads = 1 if busy else threads
    torch.set_num_threads(train_threads)
    vae.to(device)
    try:
        vae.train()
        for _ in range(steps):
            x = torch.stack([_random_crop(train, g) for _ in range(BATCH)]).to(device)  # (B, 3, T, h, w)
            recon = _decode_unclamped(vae, vae.encode(x).latent_dist.mode())  # (B, 3, T, h, w)
            loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
        vae.eval()
    train_seconds = time.perf_counter() - t0
    mean, std = _latent_stats(vae, train[:stats_clips])
    vae.register_to_config(latents_mean=mean, latents_std=std)
    psnr = _psnr(vae, held_out)
    vae.to("cpu")
    return {"vae_training": f"{steps} steps, batch {BATCH} of {list(CROP)} crops from {len(train)} clips on {device}",
            "psnr_db": psnr, "held_out_clips": n_eval,
            "train_seconds": round(train_seconds, 2), "train_threads": train_threads,
            "latents_mean": mean, "latents_std": std,
            "loss_first_last": [round(float(np.mean(part or [0.0])), 4) for part in (losses[:10], losses[-10:])]}


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` before its final clamp to [-1, 1]: through the clamp, an output channel that starts beyond
    the range (dark backgrounds are near -1) gets no gradient and stays stuck there. The decoder runs once per
    latent frame (causal cache), so the hook collects the chunks in order."""
    chunks: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: chunks.append(out))
    try:
        vae.decode(z)
    finally:
        hook.remove()
    return torch.cat(chunks, dim=2)  # (B, 3, T, H, W)


def _random_crop(clips: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """A CROP-sized piece of a random clip, at frame stride 1 or 2 (preprocessing resamples 24 fps clips to 16 fps,
    so the VAE meets faster motion than the files hold), flipped left-right half the time."""
    clip = clips[int(torch.randint(len(clips), (1,), generator=g))]
    _, t_, h_, w_ = clip.shape
    stride = 1 + int(torch.randint(2, (1,), generator=g)) if t_ >= 2 * CROP[0] - 1 else 1
    t = min(CROP[0], 1 + ((t_ - 1) // stride) // 4 * 4)
    h, w, span = min(CROP[1], h_ // 8 * 8), min(CROP[2], w_ // 8 * 8), (t - 1) * stride + 1
    t0, y0, x0 = (int(torch.randint(n - m + 1, (1,), generator=g)) for n, m in ((t_, span), (h_, h), (w_, w)))
    crop = _signed(clip[:, t0:t0 + span:stride, y0:y0 + h, x0:x0 + w])  # (3, t, h, w)
    return crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop


def _full(clip: torch.Tensor) -> torch.Tensor:
    """The clip's first 4n+1 <= EVAL_FRAMES frames, cropped to multiples of 8: (1, 3, T, H, W)."""
    _, t_, h_, w_ = clip.shape
    t = 1 + (min(t_, EVAL_FRAMES) - 1) // 4 * 4
    return _signed(clip[None, :, :t, : h_ // 8 * 8, : w_ // 8 * 8])


@torch.no_grad()
def _psnr(vae, clips: list[torch.Tensor]) -> float:
    """PSNR (dB) on the [0, 1] scale of full-clip reconstructions, pooled over the clips."""
    se, n = 0.0, 0
    for clip in clips:
        x = _full(clip).to(vae.device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        se += ((recon - x) / 2).pow(2).sum().item()
        n += x.numel()
    return round(10 * math.log10(n / max(se, 1e-12)), 2)


@torch.no_grad()
def _latent_stats(vae, clips: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the latent means (what preprocessing normalises with)."""
    mu = torch.cat([vae.encode(_full(c).to(vae.device)).latent_dist.mode().flatten(2).cpu() for c in clips],
                   dim=2)  # (1, C, N)
    std = mu.std((0, 2)).clamp_min(1e-3)  # a dead channel must not blow up the normalised latents
    return [round(v, 5) for v in mu.mean((0, 2)).tolist()], [round(v, 5) for v in std.tolist()]


def _load_video(path: Path) -> torch.Tensor:
    """(3, T, H, W) uint8: kept as bytes (a quarter of float32) until a crop is taken."""
    import decord

    reader = decord.VideoReader(str(path))
    return torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy()).permute(3, 0, 1, 2)


def _signed(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 127.5 - 1.0  # uint8 → [-1, 1], the VAE's input range
