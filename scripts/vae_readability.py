"""How well the synthetic world's analyzer reads generator clips after a VAE round trip (encode mean → decode).

    python scripts/vae_readability.py assets/world_components --clips 100 --frames 17 --size 128

Why: a model is decoded by its VAE, so the VAE caps the prompt-following score any model can reach; a VAE that
shifts colours makes the analyzer's verdict meaningless. Prints the round trip's PSNR and the per-attribute
accuracy (clips drawn with seed 777, never the training seed). CPU is enough (~3 s per 17×128×128 clip on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fpsa_train.data.synthetic_video import caption, clip_spec, parse_caption, render
from fpsa_train.data.tiny_models import load_components
from fpsa_train.eval.analyzer import ATTRIBUTES, analyze, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("components", help="a Wan2.1 diffusers-layout folder with vae/")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    vae = load_components(args.components)[0]
    hits, squared, start = dict.fromkeys(ATTRIBUTES, 0), 0.0, time.perf_counter()
    for i in range(args.clips):
        spec = clip_spec(777, i)
        video = render(spec, args.frames, (args.size, args.size))  # (T, H, W, 3) uint8
        x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        out = ((recon[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        squared += float(((out.astype(np.float32) - video) ** 2).mean())
        for name, ok in score(parse_caption(caption(spec)), analyze(out)).items():
            hits[name] += bool(ok)
    psnr = 10 * np.log10(255**2 / (squared / args.clips))
    accuracy = {k: round(v / args.clips, 3) for k, v in hits.items()}
    print(f"{args.components}: {args.clips} clips {args.frames}×{args.size}×{args.size}, round-trip PSNR "
          f"{psnr:.1f} dB, accuracy {accuracy} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
