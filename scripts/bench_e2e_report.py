"""Issue 19's end-to-end tables and plot from `scripts/bench_e2e.sh`'s bench_deploy JSON files (runs on CPU).

    python scripts/bench_e2e_report.py RUN.json... --out docs/bench_e2e_h200 [--date 2026-12-02]

Each JSON is one `scripts/bench_deploy.py` run: its own dense bf16 baseline (eager, PyTorch's SDPA, which picks
cuDNN on the H200) timed in the same process, then the deploy runtime per schedule, eager or compiled, with bf16 or
FP8 linears, in the kernel's Triton forward or (`--gluon`, a `-gluon` stage) its Gluon forward. Writes OUT.md (one
step per model and configuration, the whole 50-step sample, and what is missing), OUT.json (the runs, merged) and
OUT.png (schedule-mean speedup per configuration). Speedups are only ever taken against the baseline of the same
run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = {"wan1_3b": "Wan-1.3B 480p", "wan14b": "Wan-14B 720p"}
CONFIGS = (("eager", False, False), ("FP8 linears", False, True), ("compiled", True, False),
           ("compiled + FP8 linears", True, True))
"""(label, compile, fp8_linears): the issue's matrix per schedule."""
GLUON = " + Gluon forward"
"""Appended to the label of a run with `kernel_forward` gluon (bench_deploy.py --gluon): extra rows, outside the
matrix (never listed as missing)."""
PARTS = ("self-attention", "cross-attention", "linears", "other", "unattributed")
"""bench_deploy.py's step_breakdown parts."""


def config_label(run: dict) -> str:
    label = next(label for label, c, f in CONFIGS if c == run["compile"] and f == run["fp8_linears"])
    return label + GLUON if run.get("kernel_forward", "triton") == "gluon" else label


def shown_labels(rows: list[dict]) -> list[str]:
    """The configurations in display order: the matrix, then the Gluon-forward ones that were measured."""
    labels = [c[0] for c in CONFIGS]
    return labels + [label + GLUON for label in labels if any(r["config"] == label + GLUON for r in rows)]


def step_rows(runs: list[dict]) -> list[dict]:
    """One row per (model, schedule, configuration): schedule-mean step and its speedup over the run's dense."""
    rows = []
    for run in runs:
        for name, sched in run["schedules"].items():
            rows.append({"model": run["model"], "schedule": name, "config": config_label(run),
                         "dense_ms": run["dense_ms"], "mean_ms": sched["schedule_mean_ms"],
                         "speedup": sched["schedule_mean_speedup_vs_dense"],
                         "regimes": {r: (v["ms"], v["speedup_vs_dense"], v["sampling_steps_of_50"])
                                     for r, v in sched["regimes"].items()},
                         "first_step_s": max(v.get("first_step_seconds", 0.0) for v in sched["regimes"].values()),
                         "rel_diff": max(v["rel_diff_vs_dense"] for v in sched["regimes"].values())})
    return rows


def markdown(runs: list[dict], date: str) -> str:
    rows = step_rows(runs)
    lines = [f"# End to end on one H200 ({date})", "",
             "Made by `scripts/bench_e2e.sh` (device tool, one H200, torch 2.11, Triton 3.6; random weights) and "
             "`python scripts/bench_e2e_report.py`. One denoising step = one forward of the guidance batch (CFG "
             "batch 2). Every speedup is against the dense bf16 step of the same run (eager, SDPA: cuDNN). "
             "`mean` weights each regime by its share of Wan's 50 flow-UniPC steps (shift 5).", ""]
    for model, title in MODELS.items():
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        lines += [f"## {title}: one step, schedule mean", "",
                  "| schedule | configuration | dense bf16 ms (same run) | step ms | speedup | per regime: ms "
                  "(× dense, steps of 50) | first step s | output rel. diff vs dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["schedule"], shown_labels(rows).index(r["config"]))):
            regimes = "; ".join(f"{n} {ms:.0f} ({x:.2f}×, {k})" for n, (ms, x, k) in r["regimes"].items())
            lines.append(f"| {r['schedule']} | {r['config']} | {r['dense_ms']:.0f} | {r['mean_ms']:.0f} | "
                         f"**{r['speedup']:.2f}×** | {regimes} | {r['first_step_s']:.1f} | {r['rel_diff']:.3f} |")
        present = {(r["schedule"], r["config"]) for r in mine}
        schedules = sorted({r["schedule"] for r in mine} | {"default", "sparse"})
        missing = [f"{s} {c}" for s in schedules for c, _, _ in CONFIGS if (s, c) not in present]
        if missing:
            lines += ["", f"Not measured: {', '.join(missing)}."]
        for run in runs:
            if run["model"] == model and "dense_fp8_linears_ms" in run:
                lines += ["", f"Dense with FP8 linears ({config_label(run)} run): {run['dense_fp8_linears_ms']:.0f} ms "
                              f"against {run['dense_ms']:.0f} ms with bf16 linears "
                              f"({run['dense_ms'] / run['dense_fp8_linears_ms']:.2f}×)."]
                break
        for run in runs:
            if run["model"] == model and "dense_breakdown_ms" in run:
                lines += ["", f"### Where one step's GPU time goes ({config_label(run)}; ms, profiled)", "",
                          f"| step | {' | '.join(PARTS)} | total |", f"|---{'|---' * (len(PARTS) + 1)}|"]
                steps = [("dense bf16", run["dense_breakdown_ms"])] + [
                    (f"{name} {regime}", r["breakdown_ms"]) for name, sched in run["schedules"].items()
                    for regime, r in sched["regimes"].items()]
                for label, parts in steps:
                    lines.append(f"| {label} | {' | '.join(f'{parts.get(c, 0.0):.0f}' for c in PARTS)} | "
                                 f"{parts['total']:.0f} |")
            elif run["model"] == model and "breakdown_discarded" in run:
                lines += ["", f"The {config_label(run)} run's per-component split was discarded: "
                              f"{run['breakdown_discarded']}."]
        samples = [run for run in runs if run["model"] == model and run.get("sample_steps")]
        for run in samples:
            lines += ["", f"### Whole {run['sample_steps']}-step sample, one video ({config_label(run)})", "",
                      "| attention | seconds | speedup |", "|---|---|---|",
                      f"| dense SDPA bf16 | {run['dense_sample_seconds']:.1f} | 1.00× |"]
            for name, sched in run["schedules"].items():
                speedup = sched["sample_speedup_vs_dense"]
                lines.append(f"| {name} | {sched['sample_seconds']:.1f} | **{speedup:.2f}×** |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step_rows(runs)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        schedules = sorted({r["schedule"] for r in mine})
        labels = shown_labels(rows)
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs, ys = [], []
            for j, s in enumerate(schedules):
                hit = [r for r in mine if r["schedule"] == s and r["config"] == label]
                if hit:
                    xs.append(j + (i - (len(labels) - 1) / 2) * width)
                    ys.append(hit[0]["speedup"])
            if xs:  # a configuration keeps its colour in every panel
                bars = ax.bar(xs, ys, width, label=label, color=f"C{i}")
                ax.bar_label(bars, fmt="%.2f×", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(schedules)), schedules)
        ax.set_title(f"{MODELS[model]}: one step vs dense bf16 (same run)")
        ax.set_ylabel("speedup (schedule mean over 50 steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes .md, .json, .png")
    parser.add_argument("--date", default=None, help="the date of the runs (default: the first run's)")
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    date = args.date or runs[0].get("date", "date not recorded")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(runs, date))
    plot(runs, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
