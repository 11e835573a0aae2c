"""Time the top-k mask selection and work plan, host-synchronising against sync-free, and the whole attention call
against its kernel, at Wan2.1 shapes on one GPU (issue 19, deliverable 2: whole call <= 1.1× kernel).

    python scripts/bench_select.py [--shapes 480p,720p] [--schedules configs/fps/default.yaml,...]
                                   [--out docs/bench_select_h200.json]

Per shape (bench_attention.py's: 480p B=1 H=12, 720p B=1 H=40, D=128, 6×8×8 tiles), per regime of each schedule,
on the `peaked` test inputs (video-like, so top-k picks are spread as on real activations):
- `sync` (top-k regimes): the TileMask route, `select_tiles` (its TileMask reads the largest count on the host)
  then `sparse_plan` (reads the mask to check it and size the plan): what the kernel call did before;
- `free`: `select_keep` then `plan_for`, which never read the mask on the host; `free_gpu` is the GPU time of its
  kernels alone (profiler, summed), `free_host` the host time to queue one call without waiting;
- `kernel`: the forward kernel alone on a ready plan and quantized inputs; `prepass`: the quantization alone;
  `call`: the whole `fps_attention` call (pre-pass, selection, plan, kernel) and `call / kernel`, the target ratio.
Times are medians of `triton.testing.do_bench` (host stalls included: a synchronising step leaves the GPU idle).
Prints a markdown table and writes it (`.md`), the raw numbers (`--out`, JSON) and a plot (`.png`) of each call's
parts over its kernel; `--plot-from <json>` redraws the plot of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import REPO, SHAPES, TILE, bench, load_schedule  # noqa: E402

from fpsa_kernels import KernelConfig, quantize_qkv, sparse_plan  # noqa: E402
from fpsa_kernels.attention import attention_forward  # noqa: E402
from fpsa_kernels.numerics import LOG2E  # noqa: E402
from fpsa_train.fps.kernel import fps_attention, plan_for, quant_groups  # noqa: E402
from fpsa_train.fps.masks import select_keep, token_ranges  # noqa: E402
from fpsa_train.fps.reference import select_tiles  # noqa: E402
from fpsa_train.models.token_order import TokenLayout  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.kernels.helpers import make_inputs  # noqa: E402

DYNAMIC = ("topk", "window_topk")


def gpu_ms(fn, calls: int = 10) -> float:
    """GPU time of fn's kernels per call: the profiler's device time, summed (host gaps excluded)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3


def host_ms(fn, calls: int = 5) -> float:
    """Host time to queue one call of fn, not waiting for the GPU afterwards (few calls: the launch queue is
    finite, and a full one would make the host wait for the GPU too)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return elapsed


def run_shape(key: str, schedules: dict, log) -> list[dict]:
    name, heads, grid = SHAPES[key]
    layout = TokenLayout(grid, "tile", TILE)
    n = len(layout.tile_sizes())
    bm, bn = KernelConfig.block_m, KernelConfig.block_n  # the defaults fps_attention runs at
    q, k, v = make_inputs("peaked", 1, heads, layout, 128, seed=0, device="cuda")
    rows = []
    for sched_name, schedule in schedules.items():
        for regime in schedule.regimes:
            if not regime.quantized or regime.pattern == "learned":
                continue
            row = {"shape": key, "model": name, "schedule": sched_name, "regime": regime.name,
                   "pattern": regime.pattern}
            mask = None
            if regime.pattern in DYNAMIC:
                topk = regime.topk_of(n)

                def sync_route():
                    tiles = select_tiles(q, k, layout, regime).mask
                    return sparse_plan(tiles.to_dense(), token_ranges(layout), bm, bn)

                def free_route():
                    return plan_for(select_keep(q, k, layout, topk, regime.window), layout, regime, bm, bn, q.device)

                row.update(sync=bench(sync_route), free=bench(free_route), free_gpu=gpu_ms(free_route),
                           free_host=host_ms(free_route))
                mask = select_keep(q, k, layout, topk, regime.window)
                row["density"] = float(mask.density().mean())
                row["max_kept"], row["kept_max"] = mask.max_kept, int(mask.keep.sum(-1).max())
            plan = plan_for(mask, layout, regime, bm, bn, q.device)
            row["chunk_slots"], row["chunks_max"] = plan.chunks.shape[-1], int(plan.chunk_count.max())
            groups = quant_groups(layout, regime.quant, q.device)
            qkv = quantize_qkv(q, k, v, groups, q_mult=LOG2E / math.sqrt(q.shape[-1]))
            row["kernel"] = bench(lambda: attention_forward(qkv, plan))
            row["prepass"] = bench(lambda: quantize_qkv(q, k, v, quant_groups(layout, regime.quant, q.device)))
            row["call"] = bench(lambda: fps_attention(q, k, v, layout, regime))
            row["call_over_kernel"] = row["call"] / row["kernel"]
            log(f"{key} {sched_name}/{regime.name}: " + ", ".join(
                f"{field}={value:.3f}" if isinstance(value, float) else f"{field}={value}"
                for field, value in row.items() if field not in ("shape", "model", "schedule", "regime")))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = [("shape", "shape"), ("schedule", "schedule"), ("regime", "regime"), ("pattern", "pattern"),
            ("density", "density"), ("sync", "select+plan, sync (ms)"), ("free", "select+plan, sync-free (ms)"),
            ("free_gpu", "its GPU time (ms)"), ("free_host", "its host time (ms)"), ("kernel", "kernel (ms)"),
            ("prepass", "pre-pass (ms)"), ("call", "whole call (ms)"), ("call_over_kernel", "call / kernel")]

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in cols) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per shape, each regime's whole call as stacked GPU parts (kernel, pre-pass, selection + plan, the rest), with
    the 1.1 × kernel target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [row for row in rows if row["shape"] == shape]
        labels = [f"{row['schedule']}\n{row['regime']}" for row in mine]
        kernel = [1.0 for _ in mine]
        prepass = [row["prepass"] / row["kernel"] for row in mine]
        select = [row.get("free_gpu", 0.0) / row["kernel"] for row in mine]
        rest = [max(row["call_over_kernel"] - 1 - p - q, 0.0) for row, p, q in zip(mine, prepass, select)]
        bottom = [0.0] * len(mine)
        for part, label in ((kernel, "kernel"), (prepass, "pre-pass"), (select, "selection + plan (GPU)"),
                            (rest, "rest of the call")):
            ax.bar(range(len(mine)), part, bottom=bottom, label=label)
            bottom = [b + x for b, x in zip(bottom, part)]
        ax.axhline(1.1, color="black", linestyle="--", linewidth=1, label="target: 1.1 × kernel")
        for i, row in enumerate(mine):
            ax.text(i, row["call_over_kernel"], f"{row['call_over_kernel']:.2f}×", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_ylim(0.9, max(1.5, max(bottom) + 0.1))
        ax.set_ylabel("whole call / kernel")
        ax.set_title(f"{mine[0]['model']}: the whole attention call over its kernel")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--schedules", default="configs/fps/default.yaml,configs/fps/sparse.yaml",
                        help="comma-separated schedule files (fps.schedule_file form); each is named by its stem")
    parser.add_argument("--out", default="bench_select.json",
                        help="the JSON file to write (the table and the plot beside it)")
    parser.add_argument("--plot-from", help="only redraw the plot (beside this file) from a JSON this script wrote")
    args = parser.parse_args()
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text())["rows"], Path(args.plot_from).with_suffix(".png"))
        return
    schedules = {Path(f).stem: load_schedule(REPO / f) for f in args.schedules.split(",") if f}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [row for shape in args.shapes.split(",") for row in run_shape(shape, schedules, print)]
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}, Python {platform.python_version()}, {started}; "
              f"`python scripts/bench_select.py {' '.join(sys.argv[1:])}`")
    text = f"{header}\n\n{table(rows)}\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
