"""Benchmark FPS attention for training on a Hopper GPU: forward + backward, and a whole Wan-1.3B training step.

In one run, all ratios against baselines timed in the same run:
1. attention forward + backward at (1, 12, 32760, 128) (Wan 1.3B, 480p) and (1, 40, 75600, 128) (14B, 720p), bf16
   inputs and output gradient: SDPA FLASH and SDPA cuDNN, and ours (`fps_attention`, FP8 forward + Triton backward,
   pre-pass and plans included) for each regime of configs/fps/default.yaml plus plain dense FP8; a few backward
   block configurations are tried on dense and the fastest is used for the regimes. Dynamic (top-k) regimes are
   timed with their mask given (`op`) and with the mask selected from q, k inside the call (`whole`). Peak extra
   memory of one forward + backward is recorded for each.
2. the schedule's mean fwd+bwd time under two weightings of its regimes: training's σ distribution
   (configs/train.yaml: logit-normal, shift 3) and Wan's 50-step sampler (shift 5).
3. whole training steps (forward, backward, AdamW; activation checkpointing; bf16 autocast) of a Wan-1.3B-size DiT
   (random weights, synthetic latents 21×60×104 = 32,760 tokens): dense bf16 SDPA against FPS attention with the
   default schedule, one σ per regime, and the training-weighted mean; peak memory of each run.

  python scripts/bench_training.py --out results/   (writes bench_training.md and bench_training.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SHAPES, TILE, default_schedule  # noqa: E402
from bench_train_step import step_bench  # noqa: E402

from fpsa_train.config import ObjectiveConfig  # noqa: E402
from fpsa_train.flow import sample_sigma, sampling_sigmas  # noqa: E402
from fpsa_train.fps.fp8 import QuantGranularity  # noqa: E402
from fpsa_train.fps.kernel import fps_attention  # noqa: E402
from fpsa_train.fps.reference import select_tiles  # noqa: E402
from fpsa_train.fps.schedule import Regime  # noqa: E402
from fpsa_train.models.token_order import TokenLayout  # noqa: E402

BWD_CONFIGS = ["64x128x64x32w4s2", "64x64x64x64w4s2", "64x128x128x64w8s2"]
"""dQ rows x dQ key chunk x dK/dV key rows x dK/dV query chunk, warps, stages."""


def parse_bwd(text: str) -> dict:
    blocks, rest = text.split("w")
    warps, stages = (int(x) for x in rest.split("s"))
    return {"bwd_blocks": tuple(int(x) for x in blocks.split("x")), "bwd_warps": warps, "bwd_stages": stages}


def fwd_bwd(fn, q, k, v, dout):
    """Milliseconds (median) and peak extra memory (GiB) of out = fn(q, k, v); out.backward(dout)."""
    def step():
        fn(q, k, v).backward(dout)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=[q, k, v], return_mode="median")
    return ms, peak


def regime_weights() -> dict:
    """Share of each default regime under training's σ distribution and over Wan's 50 sampling steps."""
    schedule = default_schedule()
    train_sigma = sample_sigma(200_000, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    idx = schedule.regime_index(train_sigma)
    weights = {"training": {r.name: float((idx == i).float().mean()) for i, r in enumerate(schedule.regimes)}}
    steps = [schedule.regime_for(s).name for s in sampling_sigmas()]
    weights["sampling"] = {r.name: steps.count(r.name) / len(steps) for r in schedule.regimes}
    return weights


def run_shape(key: str, log) -> dict:
    name, heads, grid = SHAPES[key]
    layout = TokenLayout(grid, "tile", TILE)
    seq, d = layout.seq_len, 128
    flops = 4.0 * heads * seq * seq * d * 3.5  # forward (2 products) + backward (5 products)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    res: dict = {"name": name, "shape": [1, heads, seq, d], "dense_flops_fwd_bwd": flops}
    for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        with sdpa_kernel(backend):
            ms, mem = fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout)
        res[label] = {"ms": ms, "peak_gib": mem}
        log(f"{name} {label} fwd+bwd: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s), peak +{mem:.2f} GiB")
    cudnn = res["sdpa_cudnn"]["ms"]

    dense = Regime(name="dense", quant=QuantGranularity("tile"))  # σ ∈ [0, 1], dense
    res["bwd_configs"] = {}
    for text in BWD_CONFIGS:
        opts = parse_bwd(text)
        try:
            ms, mem = fwd_bwd(lambda a, b, c: fps_attention(a, b, c, layout, dense, **opts)[0], q, k, v, dout)
        except Exception as err:  # a config that does not compile or fit is reported, not fatal
            log(f"{name} dense FP8 {text}: failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        res["bwd_configs"][text] = {"ms": ms, "peak_gib": mem}
        log(f"{name} dense FP8 fwd+bwd {text}: {ms:.2f} ms, {cudnn / ms:.2f}× cuDNN, peak +{mem:.2f} GiB")
    best = min(res["bwd_configs"], key=lambda c: res["bwd_configs"][c]["ms"])
    res["bwd_config"] = best
    opts = parse_bwd(best)

    res["regimes"] = {}
    for regime in default_schedule().regimes:
        mask = None if regime.pattern in ("dense", "window") else select_tiles(q, k, layout, regime).mask
        ms, mem = fwd_bwd(lambda a, b, c: fps_attention(a, b, c, layout, regime, mask, **opts)[0], q, k, v, dout)
        entry = {"describe": regime.describe(), "op_ms": ms, "peak_gib": mem, "speedup_cudnn": cudnn / ms}
        if mask is not None:
            entry["density"] = float(mask.density().mean())
            entry["whole_ms"], _ = fwd_bwd(lambda a, b, c: fps_attention(a, b, c, layout, regime, **opts)[0],
                                           q, k, v, dout)
        else:
            entry["density"] = 1.0 if regime.pattern == "dense" else float(
                select_tiles(q, k, layout, regime).mask.density().mean())
        entry["call_ms"] = entry.get("whole_ms", ms)
        res["regimes"][regime.name] = entry
        log(f"{name} {regime.describe()}: op {ms:.2f} ms, whole {entry['call_ms']:.2f} ms, density "
            f"{entry['density']:.3f}, {cudnn / entry['call_ms']:.2f}× cuDNN, peak +{mem:.2f} GiB")

    res["schedule"] = {}
    for label, w in regime_weights().items():
        mean_ms = sum(w[r] * res["regimes"][r]["call_ms"] for r in w)
        density = sum(w[r] * res["regimes"][r]["density"] for r in w)
        res["schedule"][label] = {"weights": w, "mean_ms": mean_ms, "mean_density": density,
                                  "speedup_cudnn": cudnn / mean_ms, "speedup_flash": res["sdpa_flash"]["ms"] / mean_ms}
        log(f"{name} schedule mean ({label} weights {w}): {mean_ms:.2f} ms, density {density:.3f}, "
            f"{cudnn / mean_ms:.2f}× cuDNN")
    return res


def run_step(log, steps: int) -> dict:
    regimes = {"early": 0.95, "middle": 0.6, "late": 0.2}
    dense = step_bench(steps=steps, sigmas={"dense": 0.6})
    log(f"1.3B step dense bf16: {dense['groups']['dense']['step_s']:.3f} s, peak {dense['peak_gib']:.1f} GiB")
    fps = step_bench(steps=steps, fps="default", sigmas=regimes)
    for name, g in fps["groups"].items():
        log(f"1.3B step FPS {name} (σ {g['sigma']}): {g['step_s']:.3f} s")
    log(f"1.3B FPS peak {fps['peak_gib']:.1f} GiB")
    return {"dense": dense, "fps": fps}


def markdown(results: dict) -> str:
    lines = [f"Run {results['date']} on {results['gpu']} (torch {results['torch']}, triton {results['triton']}, "
             f"CUDA {results['cuda']}): `python scripts/bench_training.py`.", "",
             "| shape | what | ms (fwd+bwd) | vs cuDNN | vs FLASH | density | peak extra GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["attention"]:
        cudnn, flash = r["sdpa_cudnn"]["ms"], r["sdpa_flash"]["ms"]

        def row(what, ms, density="", mem=""):
            lines.append(f"| {r['name']} | {what} | {ms:.2f} | {cudnn / ms:.2f}× | {flash / ms:.2f}× | {density} "
                         f"| {mem} |")

        row("SDPA FLASH bf16", flash, 1.0, f"{r['sdpa_flash']['peak_gib']:.2f}")
        row("SDPA cuDNN bf16", cudnn, 1.0, f"{r['sdpa_cudnn']['peak_gib']:.2f}")
        for c, e in r["bwd_configs"].items():
            row(f"ours dense FP8 (tile scales), backward {c}", e["ms"], 1.0, f"{e['peak_gib']:.2f}")
        for name, e in r["regimes"].items():
            row(f"ours `{e['describe']}` op", e["op_ms"], f"{e['density']:.3f}", f"{e['peak_gib']:.2f}")
            if "whole_ms" in e:
                row(f"ours `{name}` with mask selection", e["whole_ms"], f"{e['density']:.3f}")
        for label, s in r["schedule"].items():
            row(f"schedule mean, {label} weights {s['weights']}", s["mean_ms"], f"{s['mean_density']:.3f}")
    step = results.get("step")
    if step:
        d = step["dense"]
        lines += ["", f"Training step, Wan-1.3B size ({d['layers']} layers, {d['params'] / 1e9:.3f} B params), latent "
                  f"{'×'.join(map(str, d['latent']))} = {d['tokens']} tokens, batch 1, activation checkpointing, bf16 "
                  "autocast, AdamW:", "", "| attention | σ | s/step | tokens/s | vs dense | peak GiB |",
                  "|---|---|---|---|---|---|"]
        base = d["groups"]["dense"]["step_s"]
        lines.append(f"| dense bf16 SDPA | any | {base:.3f} | {d['tokens'] / base:,.0f} | 1.00× "
                     f"| {d['peak_gib']:.1f} |")
        f = step["fps"]
        for name, g in f["groups"].items():
            lines.append(f"| FPS default, `{name}` regime | {g['sigma']} | {g['step_s']:.3f} | "
                         f"{f['tokens'] / g['step_s']:,.0f} | {base / g['step_s']:.2f}× | {f['peak_gib']:.1f} |")
        mean = step.get("fps_training_mean_s")
        if mean:
            lines.append(f"| FPS default, training σ mix | {step['weights']} | {mean:.3f} "
                         f"| {f['tokens'] / mean:,.0f} | {base / mean:.2f}× | {f['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--shapes", nargs="*", default=["480p", "720p"], choices=list(SHAPES))
    ap.add_argument("--step-steps", type=int, default=4, help="timed training steps per σ (0: skip the step bench)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "cuda": torch.version.cuda, "host": platform.node(), "attention": []}
    for key in args.shapes:
        results["attention"].append(run_shape(key, log))
        (args.out / "bench_training.json").write_text(json.dumps(results, indent=1))
    if args.step_steps:
        results["step"] = run_step(log, args.step_steps)
        w = regime_weights()["training"]
        groups = results["step"]["fps"]["groups"]
        results["step"]["weights"] = w
        results["step"]["fps_training_mean_s"] = sum(w[r] * groups[r]["step_s"] for r in w)
    (args.out / "bench_training.json").write_text(json.dumps(results, indent=1))
    (args.out / "bench_training.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
