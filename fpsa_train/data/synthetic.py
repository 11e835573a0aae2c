"""Structured synthetic latents and caption embeddings, generated in-process.

Until the video pipeline produces cached VAE latents, the tiny default trains on clips that have something to
learn: each caption (one of `num_prompts`) fixes a colour (a direction in latent-channel space), a blob size, a
background tint and a velocity; each clip is a soft blob of that colour moving with that velocity from a random
start, wrapping at the borders. A denoiser that reads the caption can predict the colour and motion, so the loss
falls well below what an unconditional model reaches. Captions are random but fixed token embeddings of varying
length (unpadded, as the text cache stores them).

Every sample is a pure function of (seed, index): no storage, identical across workers and runs.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from fpsa_train.data.config import DataConfig


class SyntheticLatents(Dataset):
    def __init__(self, cfg: DataConfig, split: str = "train"):
        self.cfg = cfg
        self.length = cfg.num_samples if split == "train" else cfg.val_samples
        self.offset = 0 if split == "train" else 10**6  # validation clips start elsewhere
        g = torch.Generator().manual_seed(cfg.seed)
        c, k = cfg.latent_channels, cfg.num_prompts
        colour = torch.randn(k, c, generator=g)
        self.colour = colour / colour.norm(dim=1, keepdim=True) * math.sqrt(c) * 1.5  # (K, C)
        self.tint = 0.3 * torch.randn(k, c, generator=g)  # (K, C)
        speed = 0.5 + torch.rand(k, generator=g) * 1.5  # latent pixels per latent frame
        angle = torch.rand(k, generator=g) * 2 * math.pi
        self.velocity = torch.stack([speed * angle.sin(), speed * angle.cos()], dim=1)  # (K, 2) (vy, vx)
        self.radius = 1.5 + torch.rand(k, generator=g) * 2.0  # (K,)
        lengths = torch.randint(max(1, cfg.text_tokens // 4), cfg.text_tokens + 1, (k,), generator=g)
        self.captions = [torch.randn(int(n), cfg.text_dim, generator=g) for n in lengths]  # unpadded (L_k, D)

    def __len__(self) -> int:
        return self.length

    def prompt_of(self, index: int) -> int:
        return index % self.cfg.num_prompts

    def __getitem__(self, index: int) -> dict:
        cfg = self.cfg
        k = self.prompt_of(index)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.offset + index)
        t_, h_, w_ = cfg.latent_frames, cfg.latent_height, cfg.latent_width
        start = torch.rand(2, generator=g) * torch.tensor([h_, w_])  # (y0, x0)
        t = torch.arange(t_, dtype=torch.float32)[:, None]  # (T, 1)
        centre = start[None] + t * self.velocity[k][None]  # (T, 2)
        ys = torch.arange(h_, dtype=torch.float32)
        xs = torch.arange(w_, dtype=torch.float32)
        dy = _wrap(ys[None, :] - centre[:, :1], h_)  # (T, H)
        dx = _wrap(xs[None, :] - centre[:, 1:], w_)  # (T, W)
        blob = torch.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / (2 * self.radius[k] ** 2))  # (T, H, W)
        latent = self.colour[k][:, None, None, None] * blob[None] + self.tint[k][:, None, None, None]  # (C, T, H, W)
        latent = latent + 0.05 * torch.randn(latent.shape, generator=g)
        return {"latents": latent, "context": self.captions[k], "prompt": k}


def _wrap(d: torch.Tensor, n: int) -> torch.Tensor:
    """Signed distance on a ring of length n."""
    return torch.remainder(d + n / 2, n) - n / 2


def collate(samples: list[dict], text_len: int) -> dict:
    """Stack latents (all one shape) and zero-pad captions to `text_len` (no mask, as Wan trains)."""
    latents = torch.stack([s["latents"] for s in samples])  # (B, C, T, H, W)
    dim = samples[0]["context"].shape[1]
    context = latents.new_zeros(len(samples), text_len, dim)  # (B, text_len, D)
    for i, s in enumerate(samples):
        context[i, : s["context"].shape[0]] = s["context"]
    return {"latents": latents, "context": context, "prompt": torch.tensor([s["prompt"] for s in samples])}
