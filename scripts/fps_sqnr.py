"""Attention error of each regime of a schedule: SQNR (dB) of FPS attention against dense attention.

Two kinds of inputs:
- `synthetic`: q, k, v with 3D locality, as video attention has: scores peak at nearby tokens (an RBF in
  token distance, per-head length scales of 2–6 tokens) on top of content noise (see `synthetic_qkv`).
  head_dim 128 like Wan; the grid is cut by 6×8×8 tiles with partial edge tiles.
- `--weights run/checkpoints/last.ckpt`: q, k, v captured from every layer of a trained model (the training
  config of the run: `--overrides +experiment=tiny`) at σ in the middle of each regime's interval.

Prints a markdown table: regime, σ, realised density, SQNR vs dense bf16 and vs dense fp32 (worst layer / head).

  python scripts/fps_sqnr.py --synthetic --grid 12 24 32
  python scripts/fps_sqnr.py --weights outputs/tiny/<run>/checkpoints/last.ckpt
  python scripts/fps_sqnr.py --weights <deploy>/diffusion_pytorch_model.safetensors --overrides +experiment=proving \
      --smooth-k
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.fps.reference import attention_tiles
from fpsa_train.fps.schedule import Schedule
from fpsa_train.models.token_order import TokenLayout


def smooth_field(grid, channels: int, blur: float, g: torch.Generator) -> torch.Tensor:
    """(T·H·W, C) white noise blurred by a separable Gaussian of `blur` tokens, unit variance per channel."""
    x = torch.randn(channels, *grid, generator=g)  # (C, T, H, W)
    for axis in (1, 2, 3):
        radius = int(3 * blur)
        kernel = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * blur**2))
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        moved = x.movedim(axis, -1)  # (..., n)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        x = F.conv1d(flat, kernel).reshape(shape).movedim(-1, axis)
    x = x / x.std(dim=(1, 2, 3), keepdim=True)
    return x.flatten(1).T  # (L, C), raster order


def synthetic_qkv(grid, heads: int, head_dim: int, seed: int, peak: float = 8.0):
    """q, k, v (1, H, L, D) in tile-major order for tile 6×8×8, with explicit 3D locality.

    q·k/√D ≈ peak·exp(−Σ_axis Δ²/(2ℓ²)) + N(0, 1): random Fourier features of each token's (t, h, w) position
    (an RBF kernel in token distance) plus independent content noise, with a per-head length scale ℓ from
    (2, 3, 3) to (4, 6, 6) tokens. v is a smooth random field (blur 2 tokens), so outputs vary smoothly too.
    """
    g = torch.Generator().manual_seed(seed)
    layout = TokenLayout(tuple(grid), "tile", (6, 8, 8))
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    pos = torch.stack([t, h, w], dim=-1).reshape(-1, 3)  # (L, 3), raster
    qs, ks = [], []
    for head in range(heads):
        ell = torch.tensor([2.0, 3.0, 3.0]) * (1 + head / max(1, heads - 1))
        omega = torch.randn(head_dim // 2, 3, generator=g) / ell  # (D/2, 3)
        phase = pos @ omega.T  # (L, D/2)
        phi = torch.cat([phase.cos(), phase.sin()], dim=-1) / (head_dim // 2) ** 0.5  # φ(x)·φ(y) ≈ RBF(x − y)
        amp = (peak * head_dim**0.5) ** 0.5
        qs.append(amp * phi + torch.randn(phi.shape, generator=g))
        ks.append(amp * phi + torch.randn(phi.shape, generator=g))
    q, k = torch.stack(qs), torch.stack(ks)  # (H, L, D)
    field = smooth_field(grid, 32, blur=2.0, g=g)  # (L, 32)
    v = torch.einsum("lc,hcd->hld", field, torch.randn(heads, 32, head_dim, generator=g) / 32**0.5)
    perm = layout.permutation()
    return [x[None][:, :, perm] for x in (q, k, v)], layout  # (1, H, L, D) tile-major


def report(schedule: Schedule, layers_at, smooth_k: bool = False) -> list[str]:
    """One row per regime: worst layer's SQNR vs dense bf16 and fp32; with `smooth_k` also the fp32 SQNR when K
    has its per-head mean over tokens subtracted before quantization (exact for softmax: it shifts each query's
    scores by one constant), and the mean over layers of both."""
    head = "| regime | σ | density | SQNR vs dense bf16 (dB) | SQNR vs dense fp32 (dB) |"
    rule = "|---|---|---|---|---|"
    if smooth_k:
        head += " fp32, K smoothed (dB) | mean over layers: plain / K smoothed (dB) |"
        rule += "---|---|"
    rows = [head, rule]
    for regime in schedule.regimes:
        sigma = (regime.lo + regime.hi) / 2
        worst_bf16 = worst_fp32 = worst_smooth = float("inf")
        dens, plain, smoothed = [], [], []
        for q, k, v, layout in layers_at(sigma):
            ref32 = F.scaled_dot_product_attention(q, k, v)
            ref16 = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
            out, sel = attention_tiles(q, k, v, layout, regime)
            worst_bf16 = min(worst_bf16, sqnr_db(ref16, out))
            plain.append(sqnr_db(ref32, out))
            worst_fp32 = min(worst_fp32, plain[-1])
            dens.append(float(sel.mask.density().mean()))
            if smooth_k:
                out_s, _ = attention_tiles(q, k - k.mean(dim=-2, keepdim=True), v, layout, regime)
                smoothed.append(sqnr_db(ref32, out_s))
                worst_smooth = min(worst_smooth, smoothed[-1])
        row = (f"| {regime.describe()} | {sigma:.2f} | {sum(dens) / len(dens):.2f} | {worst_bf16:.1f} | "
               f"{worst_fp32:.1f} |")
        if smooth_k:
            row += (f" {worst_smooth:.1f} | {sum(plain) / len(plain):.1f} / "
                    f"{sum(smoothed) / len(smoothed):.1f} |")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--grid", type=int, nargs=3, default=[12, 24, 32])
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--peak", type=float, default=8.0, help="locality: score bump of nearby tokens (synthetic)")
    ap.add_argument("--weights", help="a training checkpoint (.ckpt) or exported weights (.safetensors, Wan "
                                      "layout) to capture q, k, v from")
    ap.add_argument("--smooth-k", action="store_true",
                    help="also measure K smoothing (K minus its per-head mean over tokens before quantization)")
    ap.add_argument("--overrides", nargs="*", default=["+experiment=tiny"], help="training config of --weights")
    ap.add_argument("--fps", default="default", help="the fps config option whose schedule is measured")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from fpsa_train.config import resolve
    from pathlib import Path

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        conf = resolve(compose(config_name="train", overrides=[*args.overrides, f"fps={args.fps}", "run_dir=/tmp"]))
    if args.synthetic:
        (q, k, v), layout = synthetic_qkv(args.grid, args.heads, 128, seed=0, peak=args.peak)
        schedule = Schedule.from_config(conf.fps, (6, 8, 8))
        print(f"synthetic 3D-locality q/k/v: grid {tuple(args.grid)} ({layout.seq_len} tokens), tile 6×8×8 "
              f"(tile grid {layout.tile_grid}), {args.heads} heads × 128, peak {args.peak}")
        print("\n".join(report(schedule, lambda sigma: [(q, k, v, layout)], args.smooth_k)))
    if args.weights:
        from fpsa_train.calibrate import capture_qkv, load_weights
        from fpsa_train.lit.datamodule import validation_batch
        from fpsa_train.models.build import build_model

        if args.weights.endswith(".safetensors"):  # exported weights: loaded as model.weights is
            conf.model.weights = args.weights
            model, which = build_model(conf.model).eval(), "exported"
        else:
            model = build_model(conf.model).eval()
            which = load_weights(model, args.weights, "auto")
        batch = validation_batch(conf.data, conf.model.text_len, 4)
        schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
        print(f"q/k/v of {args.weights} ({which} weights), {len(model.blocks)} layers, 4 validation clips")
        print("\n".join(report(schedule, lambda sigma: capture_qkv(model, batch, sigma, seed=0), args.smooth_k)))


if __name__ == "__main__":
    main()
