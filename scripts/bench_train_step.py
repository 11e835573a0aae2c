"""Time whole training steps (forward, backward, AdamW) of a Wan DiT on synthetic latents.

Random weights, dense bf16 SDPA attention (or FPS attention: `--fps default`), bf16 autocast with fp32 master
weights, activation checkpointing on (as the wan experiments train). Prints one table row: median step time,
tokens/s and peak CUDA memory. scripts/bench_training.py times dense and FPS steps against each other in one run.

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


def fps_schedule(name: str, tile_shape):
    """The schedule of configs/fps/<name>.yaml (backend auto: the Hopper kernels on H100/H200)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from fpsa_train.fps.schedule import FPSConfig, Schedule

    path = Path(__file__).resolve().parents[1] / "configs" / "fps" / f"{name}.yaml"
    cfg = OmegaConf.merge(OmegaConf.structured(FPSConfig), OmegaConf.load(path))
    return Schedule.from_config(OmegaConf.to_object(cfg), tuple(tile_shape))


def step_bench(model: str = "wan1_3b", latent=(21, 60, 104), steps: int = 6, batch: int = 1, fps: str | None = None,
               layers: int | None = None, token_order: str = "tile", checkpointing: bool = True,
               sigmas: dict[str, float] | None = None, warmup: int = 2) -> dict:
    """Median step time, tokens/s and peak memory of `steps` training steps (after `warmup` steps), per σ group.

    fps: None for dense bf16 SDPA, or a configs/fps schedule name. sigmas: name → the σ every step of that group
    uses (one model, groups run one after the other; default one group with σ = 0.5)."""
    sizes = dict(SIZES[model])
    if layers:
        sizes["num_layers"] = layers
    cfg = WanConfig(**sizes, token_order=token_order, activation_checkpointing=checkpointing)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        net = WanModel(cfg).train()
    if fps:
        from fpsa_train.fps.transform import apply_fps_attention

        apply_fps_attention(net, fps_schedule(fps, cfg.tile_shape))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    t, h, w = latent
    x0 = torch.randn(batch, cfg.in_dim, t, h, w, device=dev)
    context = torch.randn(batch, 64, cfg.text_dim, device=dev)
    tokens = batch * t * (h // 2) * (w // 2)
    result = {"model": model, "layers": cfg.num_layers, "params": sum(p.numel() for p in net.parameters()),
              "latent": list(latent), "tokens": tokens, "fps": fps, "groups": {}}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for name, value in (sigmas or {"all": 0.5}).items():
        times = []
        for step in range(steps + warmup):
            torch.cuda.synchronize()
            start = time.perf_counter()
            sigma = torch.full((batch,), value, device=dev)
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1, 1, 1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = net((1 - s) * x0 + s * noise, sigma * 1000, context, attn_kwargs={"sigma": sigma})
            loss = F.mse_loss(pred.float(), noise - x0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        med = statistics.median(times)
        result["groups"][name] = {"sigma": value, "step_s": med, "step_times": times, "tokens_per_s": tokens / med}
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del net, opt
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=SIZES, default="wan1_3b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (to fit a 14B probe)")
    ap.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--token-order", choices=["raster", "tile"], default="tile")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--fps", default=None, help="FPS attention with configs/fps/<name>.yaml (default: dense bf16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_step.py needs a CUDA GPU")
    r = step_bench(args.model, args.latent, args.steps, args.batch, args.fps, args.layers, args.token_order,
                   not args.no_checkpointing)
    t, h, w = r["latent"]
    g = r["groups"]["all"]
    print(f"| {args.model} ({r['layers']} layers, {r['params'] / 1e9:.3f} B) | latent {t}×{h}×{w} | {r['tokens']} "
          f"tokens | {args.fps or 'dense bf16'} σ 0.5 | {g['step_s']:.3f} s/step | {g['tokens_per_s']:,.0f} tokens/s "
          f"| peak {r['peak_gib']:.1f} GiB | {torch.cuda.get_device_name()} | torch {torch.__version__} |")


if __name__ == "__main__":
    main()
