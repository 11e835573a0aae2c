"""Time whole training steps (forward, backward, AdamW) of a Wan DiT on synthetic latents.

Random weights, dense bf16 SDPA attention, bf16 autocast with fp32 master weights, activation checkpointing on
(as the wan experiments train). Prints one table row per configuration: median step time, tokens/s and peak
CUDA memory. The baseline for later attention variants, which are timed against it in the same run.

  python scripts/bench_train_step.py --model wan1_3b --latent 21 60 104 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fpsa_train.models.config import WAN_1_3B, WAN_14B, WanConfig
from fpsa_train.models.wan import WanModel

SIZES = {"wan1_3b": WAN_1_3B, "wan14b": WAN_14B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=SIZES, default="wan1_3b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (to fit a 14B probe)")
    ap.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--token-order", choices=["raster", "tile"], default="tile")
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_step.py needs a CUDA GPU")

    sizes = dict(SIZES[args.model])
    if args.layers:
        sizes["num_layers"] = args.layers
    cfg = WanConfig(**sizes, token_order=args.token_order, activation_checkpointing=not args.no_checkpointing)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        model = WanModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    t, h, w = args.latent
    x0 = torch.randn(args.batch, cfg.in_dim, t, h, w, device=dev)
    context = torch.randn(args.batch, 64, cfg.text_dim, device=dev)
    tokens = args.batch * t * (h // 2) * (w // 2)

    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sigma = torch.rand(args.batch, device=dev)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model((1 - s) * x0 + s * noise, sigma * 1000, context)
        loss = F.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    print(f"| {args.model} ({cfg.num_layers} layers, {params / 1e9:.3f} B) | latent {t}×{h}×{w} | {tokens} tokens "
          f"| {med:.3f} s/step | {tokens / med:,.0f} tokens/s "
          f"| peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
          f"| {torch.cuda.get_device_name()} | torch {torch.__version__} |")


if __name__ == "__main__":
    main()
