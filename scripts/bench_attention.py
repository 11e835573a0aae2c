"""Benchmark the FP8 tile-sparse attention forward against PyTorch SDPA (FLASH, cuDNN) at Wan2.1 shapes, on one GPU.

    python scripts/bench_attention.py [--shapes 480p,720p] [--configs 128x128w4s2,...,gluon] [--out DIR]
                                      [--schedules configs/fps/default.yaml,configs/fps/sparse.yaml]

Per shape (wan1.3B-480p: B=1, H=12, grid 21×30×52 = 32,760 tokens; wan14B-720p: B=1, H=40, grid 21×45×80 = 75,600;
D = 128, tiles 6×8×8), median times from `triton.testing.do_bench`, random normal bf16 inputs:
- SDPA FLASH_ATTENTION and CUDNN_ATTENTION in bf16 (the baselines, timed in the same run);
- our kernel, dense with per-tile scales, for each block config (`gluon`: the Gluon forward; the best is used for
  the rest);
- each regime of each schedule in --schedules (default: configs/fps/default.yaml): the forward kernel alone, and
  the whole call (pre-pass + mask selection + plan for dynamic masks + forward), each with its best block config;
- the pre-pass alone (Q, K, V quantization);
- sparse efficiency: top-k masks at tile-pair density d ∈ {0.5, 0.25, 0.1}: time / (d · dense time);
- each schedule averaged over Wan's 50-step sampling (UniPC, shift 5): mean whole-call time over the steps'
  regimes, and its mean density.
TFLOP/s: actual = 4·D·(kept query-key pairs)/time; dense-equivalent = 4·B·H·L²·D/time. Writes a markdown table
(bench_attention.md), the raw numbers (bench_attention.json) and a plot (bench_attention.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fpsa_kernels import quantize_qkv, sparse_plan
from fpsa_kernels.attention import GLUON_BLOCK, attention_forward
from fpsa_kernels.numerics import LOG2E
from fpsa_train.flow import sampling_sigmas
from fpsa_train.fps.fp8 import QuantGranularity
from fpsa_train.fps.kernel import fps_attention, plan_for, quant_groups
from fpsa_train.fps.masks import token_ranges, topk_mask
from fpsa_train.fps.reference import select_tiles
from fpsa_train.fps.schedule import FPSConfig, Regime, Schedule
from fpsa_train.models.token_order import TokenLayout

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"480p": ("wan1.3B-480p", 12, (21, 30, 52)), "720p": ("wan14B-720p", 40, (21, 45, 80))}
TILE = (6, 8, 8)


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def parse_config(text: str) -> dict:
    """BMxBNwWARPSsSTAGES[aN]: aN promotes Q·Kᵀ's FP8 accumulation to fp32 every N products; `gluon`: the Gluon
    forward (kernels/gluon_forward.py, its default variant, 128 × 128 plans)."""
    if text == "gluon":
        return {"block_m": GLUON_BLOCK, "block_n": GLUON_BLOCK, "num_warps": None, "num_stages": None, "name": text,
                "qk_imprecise_acc": None, "forward": "gluon"}
    blocks, rest = text.split("w")
    rest, _, acc = rest.partition("a")
    bm, bn = (int(x) for x in blocks.split("x"))
    warps, stages = (int(x) for x in rest.split("s"))
    return {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages, "name": text,
            "qk_imprecise_acc": int(acc) if acc else None}


def forward_opts(cfg: dict) -> dict:
    """attention_forward's keyword arguments for a parsed config."""
    return {key: cfg[key] for key in ("num_warps", "num_stages", "qk_imprecise_acc")}


def run_forward(qkv, plan, cfg: dict, out=None):
    """The forward kernel alone, as the config names it (Triton's attention_forward or the Gluon forward)."""
    if cfg.get("forward") == "gluon":
        from fpsa_kernels.gluon_forward import gluon_forward

        return gluon_forward(qkv, plan, out)
    return attention_forward(qkv, plan, out, **forward_opts(cfg))


def load_schedule(path: str | Path = REPO / "configs/fps/default.yaml") -> Schedule:
    return Schedule.from_config(FPSConfig(schedule_file=str(path)), TILE)


def default_schedule() -> Schedule:
    return load_schedule()


def run_shape(key: str, configs: list[dict], log, schedules: dict[str, Schedule] | None = None,
              dense_only: bool = False) -> dict:
    schedules = schedules or {"default": default_schedule()}
    name, heads, grid = SHAPES[key]
    layout = TokenLayout(grid, "tile", TILE)
    seq, d, batch = layout.seq_len, 128, 1
    dense_flops = 4.0 * batch * heads * seq * seq * d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    res: dict = {"name": name, "shape": [batch, heads, seq, d], "grid": list(grid), "dense_flops": dense_flops}

    for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        with sdpa_kernel(backend):
            res[label] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        log(f"{name} {label}: {res[label]:.2f} ms, {dense_flops / res[label] / 1e9:.0f} TFLOP/s")
    cudnn = res["sdpa_cudnn"]

    def kernel_ms(regime: Regime, mask, cfg: dict, qkv=None) -> tuple[float, object]:
        plan = plan_for(mask, layout, regime, cfg["block_m"], cfg["block_n"], q.device)
        qkv = qkv or quantize_qkv(q, k, v, quant_groups(layout, regime.quant, q.device), q_mult=LOG2E / math.sqrt(d))
        out = torch.empty_like(q)
        ms = bench(lambda: run_forward(qkv, plan, cfg, out))
        return ms, plan

    dense = Regime(name="dense", quant=QuantGranularity("tile"))  # σ ∈ [0, 1], dense
    res["dense"] = {}
    for cfg in configs:
        try:
            ms, _ = kernel_ms(dense, None, cfg)
        except Exception as err:  # noqa: BLE001  a config that does not compile or fit is reported, not fatal
            log(f"{name} dense {cfg['name']}: failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        res["dense"][cfg["name"]] = ms
        log(f"{name} dense {cfg['name']}: {ms:.2f} ms, {dense_flops / ms / 1e9:.0f} TFLOP/s, "
            f"{cudnn / ms:.2f}× cuDNN")
    best_dense = min(res["dense"], key=res["dense"].get)
    dense_ms = res["dense"][best_dense]
    res["best_dense_config"] = best_dense
    if dense_only:
        return res

    tile = QuantGranularity("tile")
    qkv_tile = quantize_qkv(q, k, v, quant_groups(layout, tile, q.device), q_mult=LOG2E / math.sqrt(d))
    res["prepass"] = bench(lambda: quantize_qkv(q, k, v, quant_groups(layout, tile, q.device), q_mult=1.0))
    log(f"{name} pre-pass (tile scales): {res['prepass']:.3f} ms = {100 * res['prepass'] / dense_ms:.1f}% of dense")

    res["regimes"] = {}
    for label, regime in ((f"{sname}:{r.name}", r) for sname, sched in schedules.items() for r in sched.regimes):
        mask = None if regime.pattern == "dense" else select_tiles(q, k, layout, regime).mask
        best = None
        for cfg in configs:
            try:
                ms, plan = kernel_ms(regime, mask, cfg)
            except Exception as err:  # noqa: BLE001
                log(f"{name} {regime.name} {cfg['name']}: failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg, plan)
        ms, cfg, plan = best
        call = bench(lambda: fps_attention(q, k, v, layout, regime, block_m=cfg["block_m"], block_n=cfg["block_n"],
                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                           qk_imprecise_acc=cfg["qk_imprecise_acc"], forward=cfg.get("forward")))
        density = plan.useful / (seq * seq * (plan.chunk_count.shape[0] * plan.chunk_count.shape[1]))
        entry = {"describe": regime.describe(), "config": cfg["name"], "kernel_ms": ms, "call_ms": call,
                 "density": density, "waste": plan.waste, "actual_tflops": density * dense_flops / ms / 1e9,
                 "dense_equiv_tflops": dense_flops / ms / 1e9, "speedup_cudnn": cudnn / ms,
                 "speedup_flash": res["sdpa_flash"] / ms, "call_speedup_cudnn": cudnn / call}
        res["regimes"][label] = entry
        log(f"{name} {label} {regime.describe()}: kernel {ms:.2f} ms ({cfg['name']}), whole call {call:.2f} ms, "
            f"density {density:.3f}, waste {plan.waste:.3f}, {entry['speedup_cudnn']:.2f}× cuDNN "
            f"(whole call {entry['call_speedup_cudnn']:.2f}×)")

    n = len(layout.tile_sizes())
    res["sparse_efficiency"] = {}
    for target in (0.5, 0.25, 0.1):
        scores = torch.randn(batch, heads, n, n, device="cuda", generator=g)
        mask = topk_mask(scores, max(1, round(target * n)))
        rows = []
        for cfg in configs:  # the same block config as dense, and the best one for this density
            plan = sparse_plan(mask.to_dense(), token_ranges(layout), cfg["block_m"], cfg["block_n"])
            try:
                ms = bench(lambda: run_forward(qkv_tile, plan, cfg))
            except Exception:  # noqa: BLE001
                continue
            rows.append((ms, cfg["name"], plan))
        same = next(r for r in rows if r[1] == best_dense)
        best = min(rows)
        density = same[2].useful / (seq * seq * batch * heads)
        res["sparse_efficiency"][str(target)] = {
            "density": density, "ms_dense_config": same[0], "ratio_dense_config": same[0] / (density * dense_ms),
            "waste": same[2].waste, "best_config": best[1], "ms_best": best[0],
            "ratio_best": best[0] / (density * dense_ms)}
        log(f"{name} top-k density {density:.3f}: {same[0]:.2f} ms = {same[0] / (density * dense_ms):.2f}·d·dense "
            f"({best_dense}, waste {same[2].waste:.3f}); best {best[1]} {best[0]:.2f} ms = "
            f"{best[0] / (density * dense_ms):.2f}·d·dense")

    res["schedules"] = {}
    for sname, schedule in schedules.items():
        steps = [f"{sname}:{schedule.regime_for(s).name}" for s in sampling_sigmas()]
        entry = {"steps": {r.split(":", 1)[1]: steps.count(r) for r in dict.fromkeys(steps)},
                 "avg_call_ms": sum(res["regimes"][r]["call_ms"] for r in steps) / len(steps),
                 "avg_kernel_ms": sum(res["regimes"][r]["kernel_ms"] for r in steps) / len(steps),
                 "avg_density": sum(res["regimes"][r]["density"] for r in steps) / len(steps)}
        entry["call_speedup_cudnn"] = cudnn / entry["avg_call_ms"]
        entry["kernel_speedup_cudnn"] = cudnn / entry["avg_kernel_ms"]
        res["schedules"][sname] = entry
        log(f"{name} 50-step schedule {sname} {entry['steps']}: mean density {entry['avg_density']:.3f}, mean whole "
            f"call {entry['avg_call_ms']:.2f} ms = {entry['call_speedup_cudnn']:.2f}× cuDNN (kernel only "
            f"{entry['kernel_speedup_cudnn']:.2f}×)")
    return res


def table(results: list[dict]) -> str:
    lines = ["| shape | what | config | ms | actual TFLOP/s | dense-equiv. TFLOP/s | vs FLASH | vs cuDNN |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, flash, cudnn = r["dense_flops"], r["sdpa_flash"], r["sdpa_cudnn"]

        def row(what, cfg, ms, density=1.0):
            lines.append(f"| {r['name']} | {what} | {cfg} | {ms:.2f} | {density * f / ms / 1e9:.0f} | "
                         f"{f / ms / 1e9:.0f} | {flash / ms:.2f}× | {cudnn / ms:.2f}× |")

        row("SDPA FLASH bf16", "", flash)
        row("SDPA cuDNN bf16", "", cudnn)
        for cfg, ms in r["dense"].items():
            row("ours dense FP8 (tile scales)", cfg, ms)
        for name, e in r["regimes"].items():
            row(f"ours `{e['describe']}` kernel", e["config"], e["kernel_ms"], e["density"])
            row(f"ours `{name}` whole call (pre-pass, mask, plan, kernel)", e["config"], e["call_ms"], e["density"])
        lines.append(f"| {r['name']} | pre-pass alone (tile scales) | | {r['prepass']:.3f} | | | | "
                     f"{100 * r['prepass'] / r['dense'][r['best_dense_config']]:.1f}% of dense |")
        for sname, e in r["schedules"].items():
            ms = e["avg_call_ms"]
            lines.append(f"| {r['name']} | 50-step mean of `{sname}` {e['steps']}, density {e['avg_density']:.3f} "
                         f"| | {ms:.2f} | | {f / ms / 1e9:.0f} | {flash / ms:.2f}× | {cudnn / ms:.2f}× |")
    lines += ["", "| shape | top-k density d | ms (dense config) | time / (d · dense) | padding waste | best config: "
              "time / (d · dense) |", "|---|---|---|---|---|---|"]
    for r in results:
        for e in r["sparse_efficiency"].values():
            lines.append(f"| {r['name']} | {e['density']:.3f} | {e['ms_dense_config']:.2f} | "
                         f"{e['ratio_dense_config']:.2f} | {e['waste']:.3f} | {e['best_config']}: "
                         f"{e['ratio_best']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        labels = (["FLASH bf16", "cuDNN bf16", "ours dense"] + [f"ours {n}" for n in r["regimes"]]
                  + [f"ours {n} 50-step" for n in r["schedules"]])
        ms = [r["sdpa_flash"], r["sdpa_cudnn"], r["dense"][r["best_dense_config"]]]
        ms += [e["call_ms"] for e in r["regimes"].values()] + [e["avg_call_ms"] for e in r["schedules"].values()]
        speed = [r["sdpa_cudnn"] / t for t in ms]
        ax.bar(range(len(ms)), speed, color=["grey", "grey"] + ["tab:blue"] * (len(ms) - 2))
        ax.set_xticks(range(len(ms)), labels, rotation=30, ha="right")
        ax.set_ylabel("speedup over SDPA cuDNN bf16 (×)")
        ax.set_title(f"{r['name']} {r['shape']}")
        for i, s in enumerate(speed):
            ax.text(i, s, f"{s:.2f}×", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--configs", default="64x128w4s2,64x128w4s3,128x128w4s2,128x128w8s3,64x64w4s3,64x128w4s2a32")
    parser.add_argument("--out", default=".")
    parser.add_argument("--schedules", default="configs/fps/default.yaml",
                        help="comma-separated schedule files (fps.schedule_file form); each is named by its stem")
    parser.add_argument("--dense-only", action="store_true",
                        help="only the baselines and the dense kernel per config (a quick config sweep)")
    args = parser.parse_args()
    schedules = {Path(f).stem: load_schedule(REPO / f) for f in args.schedules.split(",") if f}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [parse_config(c) for c in args.configs.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = [run_shape(s, configs, log, schedules, args.dense_only) for s in args.shapes.split(",")]
    if args.dense_only:
        (out / "bench_attention_dense.json").write_text(json.dumps(results, indent=1))
        return
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}, Python {platform.python_version()}, {started}")
    text = f"{header}\n\n{table(results)}\n"
    (out / "bench_attention.md").write_text(text)
    (out / "bench_attention.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    plot(results, out / "bench_attention.png")
    print(text)


if __name__ == "__main__":
    main()
