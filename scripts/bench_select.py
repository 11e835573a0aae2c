"""Time the top-k mask selection and work plan, the torch operations against the Triton kernels that replace them on
the GPU, and the whole attention call against its kernel, at Wan2.1 shapes on one GPU (issue 19, deliverable 2:
whole call <= 1.1× kernel).

    python scripts/bench_select.py --shapes 480p,720p \
        --schedules configs/fps/default.yaml,configs/fps/sparse.yaml --out docs/bench_select_h200.json

(about a minute on an H200). `--dry-run` runs every code path on the CPU at a tiny shape, the Triton kernels in
Triton's interpreter, with one call per timing (numbers meaningless): `python scripts/bench_select.py --dry-run
--out /tmp/bench_select.json`.

Per shape (bench_attention.py's: 480p B=1 H=12, 720p B=1 H=40, D=128, 6×8×8 tiles), per regime of each schedule,
on the `peaked` test inputs (video-like, so top-k picks are spread as on real activations):
- `torch` (top-k regimes): `select_keep(..., fused=False)` (pooled scores, `topk_keep` ∪ window in torch) then
  `tile_plan_torch`, what every call ran before: `torch` is its time (`triton.testing.do_bench`, median: host
  stalls included), `torch_gpu` the GPU time of its kernels alone (profiler, summed), `torch_host` the host time
  to queue one call without waiting;
- `fused`: the same with the Triton kernels, `select_keep(..., fused=True)` then `tile_plan_triton` (what
  `fps_attention` runs on a GPU now); `fused_gpu`, `fused_host` as above; `pool_gpu`: the GPU time of the pooled
  scores alone (torch in both routes);
- `identical`: the two produce the same keep mask from the same scores and the same plans (forward, and the
  backward's transposed plan) from the same mask, every tensor equal; `routes_equal`: the whole routes' masks
  agree too (informational: `pooled_tile_scores` adds with atomics on a GPU, so two calls may differ in the last
  bit of a score);
- `kernel`: the forward kernel alone on a ready plan and quantized inputs; `prepass`: the quantization alone;
  `call`: the whole `fps_attention` call (pre-pass, selection, plan, kernel) and `call / kernel`, the target ratio,
  all with the Triton forward (64 × 128); `kernel_gluon`, `call_gluon`, `call_over_kernel_gluon`: the same with the
  Gluon forward (128 × 128 plans; not in --dry-run).
Prints a markdown table and writes it (`.md`), the raw numbers (`--out`, JSON) and a plot (`.png`) of each call's
parts over its kernel; `--plot-from <json>` redraws the plot of an earlier run. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import REPO, SHAPES, TILE, load_schedule  # noqa: E402

from fpsa_kernels import KernelConfig, quantize_qkv  # noqa: E402
from fpsa_kernels.attention import attention_forward  # noqa: E402
from fpsa_kernels.numerics import LOG2E  # noqa: E402
from fpsa_kernels.plan import tile_plan_torch, tile_plan_triton, tile_spans  # noqa: E402
from fpsa_kernels.select import topk_keep_triton  # noqa: E402
from fpsa_train.fps.kernel import fps_attention, plan_for, quant_groups  # noqa: E402
from fpsa_train.fps.masks import pooled_tile_scores, select_keep, token_ranges, topk_keep, window_keep  # noqa: E402
from fpsa_train.models.token_order import TokenLayout  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.kernels.helpers import make_inputs  # noqa: E402

DYNAMIC = ("topk", "window_topk")
PLAN_FIELDS = ("item_group", "item_row", "item_rows", "chunk_start", "chunk_lo", "chunk_hi", "chunk_count", "chunks")
DRY_SHAPE = ("tiny (dry run)", 2, (3, 8, 20))
"""--dry-run's shape: 1×1×3 tiles of 192, 192 and 96 tokens, 2 heads."""


class Timer:
    """The timings, on a GPU; with `dry`, one call each on the CPU (the code paths run, the numbers mean nothing)."""

    def __init__(self, dry: bool):
        self.dry = dry

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def bench(self, fn) -> float:
        """Median milliseconds per call, host stalls included (do_bench)."""
        if self.dry:
            return self.host(fn, calls=1)
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    def gpu(self, fn, calls: int = 10) -> float | None:
        """GPU time of fn's kernels per call: the profiler's device time, summed (host gaps excluded)."""
        if self.dry:
            return None
        fn()
        self.sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            self.sync()
        return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3

    def host(self, fn, calls: int = 5) -> float:
        """Host time to queue one call of fn, not waiting for the GPU afterwards (few calls: the launch queue is
        finite, and a full one would make the host wait for the GPU too)."""
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = (time.perf_counter() - start) / calls * 1e3
        self.sync()
        return elapsed


def same_plan(a, b) -> list[str]:
    """The plan fields where a and b differ (dtype, shape or a value)."""
    return [name for name in PLAN_FIELDS
            if getattr(a, name).dtype != getattr(b, name).dtype or not torch.equal(getattr(a, name), getattr(b, name))]


def check(q, k, layout: TokenLayout, spans, topk: int, window) -> dict:
    """Whether the Triton selection and plans equal the torch ones on the same inputs (see the module docstring)."""
    scores = pooled_tile_scores(q, k, layout)
    static = None if window is None else window_keep(layout.tile_grid, window, q.device)
    want = topk_keep(scores, topk)
    want = want if static is None else want.union(static)
    keep_equal = torch.equal(topk_keep_triton(scores, topk, None if static is None else static.keep), want.keep)
    n, bound = want.num_kv_tiles, want.max_kept
    differ = same_plan(tile_plan_triton(want.keep, spans, bound), tile_plan_torch(want.keep, spans, bound))
    keep_t = want.keep.transpose(-1, -2)
    differ += [f"transposed {name}" for name in same_plan(tile_plan_triton(keep_t, spans, n, allow_empty=True),
                                                           tile_plan_torch(keep_t, spans, n, allow_empty=True))]
    routes = torch.equal(select_keep(q, k, layout, topk, window, fused=True).keep,
                         select_keep(q, k, layout, topk, window, fused=False).keep)
    return {"identical": keep_equal and not differ, "keep_equal": keep_equal, "plan_differs": differ,
            "routes_equal": routes}


def run_shape(key: str, schedules: dict, timer: Timer, log) -> list[dict]:
    name, heads, grid = DRY_SHAPE if timer.dry else SHAPES[key]
    device = "cpu" if timer.dry else "cuda"
    layout = TokenLayout(grid, "tile", TILE)
    n = len(layout.tile_sizes())
    bm, bn = KernelConfig.block_m, KernelConfig.block_n  # the defaults fps_attention runs at
    spans = tile_spans(tuple(token_ranges(layout).tolist()), bm, bn, device)
    q, k, v = make_inputs("peaked", 1, heads, layout, 128, seed=0, device=device)
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

                def route(fused: bool):
                    def run():
                        chosen = select_keep(q, k, layout, topk, regime.window, fused=fused)
                        planner = tile_plan_triton if fused else tile_plan_torch
                        return planner(chosen.keep, spans, chosen.max_kept)
                    return run

                for label, fn in (("torch", route(False)), ("fused", route(True))):
                    row.update({label: timer.bench(fn), f"{label}_gpu": timer.gpu(fn), f"{label}_host": timer.host(fn)})
                row["pool_gpu"] = timer.gpu(lambda: pooled_tile_scores(q, k, layout))
                row.update(check(q, k, layout, spans, topk, regime.window))
                mask = select_keep(q, k, layout, topk, regime.window)
                row["density"] = float(mask.density().mean())
                row["max_kept"], row["kept_max"] = mask.max_kept, int(mask.keep.sum(-1).max())
            plan = plan_for(mask, layout, regime, bm, bn, q.device)
            row["chunk_slots"], row["chunks_max"] = plan.chunks.shape[-1], int(plan.chunk_count.max())
            groups = quant_groups(layout, regime.quant, q.device)
            qkv = quantize_qkv(q, k, v, groups, q_mult=LOG2E / math.sqrt(q.shape[-1]))
            row["kernel"] = timer.bench(lambda: attention_forward(qkv, plan))
            row["prepass"] = timer.bench(lambda: quantize_qkv(q, k, v, quant_groups(layout, regime.quant, q.device)))
            row["call"] = timer.bench(lambda: fps_attention(q, k, v, layout, regime))
            row["call_over_kernel"] = row["call"] / row["kernel"]
            if not timer.dry:  # the Gluon forward (inference, 128 × 128 plans; Gluon has no CPU interpreter)
                from fpsa_kernels.attention import GLUON_BLOCK
                from fpsa_kernels.gluon_forward import gluon_forward

                gplan = plan_for(mask, layout, regime, GLUON_BLOCK, GLUON_BLOCK, q.device)
                row["kernel_gluon"] = timer.bench(lambda: gluon_forward(qkv, gplan))
                row["call_gluon"] = timer.bench(lambda: fps_attention(q, k, v, layout, regime, forward="gluon"))
                row["call_over_kernel_gluon"] = row["call_gluon"] / row["kernel_gluon"]
            log(f"{key} {sched_name}/{regime.name}: " + ", ".join(
                f"{field}={value:.3f}" if isinstance(value, float) else f"{field}={value}"
                for field, value in row.items() if field not in ("shape", "model", "schedule", "regime")))
            if row.get("identical") is False:
                log(f"MISMATCH {key} {sched_name}/{regime.name}: keep equal {row['keep_equal']}, plan fields that "
                    f"differ: {row['plan_differs']}")
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = [("shape", "shape"), ("schedule", "schedule"), ("regime", "regime"), ("pattern", "pattern"),
            ("density", "density"), ("torch", "select+plan, torch (ms)"), ("torch_gpu", "its GPU time (ms)"),
            ("torch_host", "its host time (ms)"), ("fused", "select+plan, Triton (ms)"),
            ("fused_gpu", "its GPU time (ms)"), ("fused_host", "its host time (ms)"),
            ("pool_gpu", "of which pooling, GPU (ms)"), ("identical", "identical"), ("kernel", "kernel (ms)"),
            ("prepass", "pre-pass (ms)"), ("call", "whole call (ms)"), ("call_over_kernel", "call / kernel"),
            ("kernel_gluon", "Gluon kernel (ms)"), ("call_gluon", "its whole call (ms)"),
            ("call_over_kernel_gluon", "call / kernel, Gluon")]

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "**NO**"
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
        select = [(row.get("fused_gpu") or 0.0) / row["kernel"] for row in mine]
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
    parser.add_argument("--dry-run", action="store_true",
                        help="every code path on the CPU at a tiny shape, Triton interpreted, one call per timing")
    args = parser.parse_args()
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text())["rows"], Path(args.plot_from).with_suffix(".png"))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_select.py needs a CUDA GPU (or --dry-run)")
    schedules = {Path(f).stem: load_schedule(REPO / f) for f in args.schedules.split(",") if f}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    timer = Timer(args.dry_run)
    shapes = ["tiny"] if args.dry_run else args.shapes.split(",")
    rows = [row for shape in shapes for row in run_shape(shape, schedules, timer, print)]
    device = "CPU, Triton interpreter (dry run)" if args.dry_run else torch.cuda.get_device_name()
    header = (f"{device}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}, Python {platform.python_version()}, {started}; "
              f"`python scripts/bench_select.py {' '.join(sys.argv[1:])}`")
    text = f"{header}\n\n{table(rows)}\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)
    failed = [f"{row['shape']} {row['schedule']}/{row['regime']}" for row in rows if row.get("identical") is False]
    if failed:
        raise SystemExit(f"the Triton selection or plan differs from the torch one: {', '.join(failed)}")


if __name__ == "__main__":
    main()
