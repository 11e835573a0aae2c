"""Gather thesis rounds into one table (the paper's Table 1 form) and a plot of quality vs density, PTQ and QAT.

    python scripts/thesis_report.py --source "150 steps, lr 1e-4=<dir>" --source "300 steps, lr 1e-4=<dir>" \
        --bench bench_attention.json --out docs/figures

Each --source is LABEL=DIR, DIR an unpacked `thesis_results.tar.gz` arm of scripts/thesis_device.sh (its
eval/group*/results.json, report.json when the run finished, schedules/). Per row: PSNR and SSIM against the dense
model's videos, prompt following, the schedule's mean density over Wan's 50 sampling steps on the proving ground's
3×4×4 tile grid (top-k k/48, windows as clipped there; learned: the density it realised in the evaluation), and the
attention speedup over cuDNN bf16 expected at 720p: each step's whole-call time read off the kernel's measured
density curve (bench_attention.py's uniform top-k schedules and its dense FP8 call, interpolated linearly in
density), averaged over the 50 steps; today's default schedule is measured as it is. Writes thesis_table.md,
thesis_rows.json and thesis_quality_vs_density.png to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import thesis  # noqa: E402

from fpsa_train.flow import sampling_sigmas  # noqa: E402
from fpsa_train.fps.masks import window_mask  # noqa: E402
from fpsa_train.fps.schedule import FPSConfig, Schedule, regimes_from_data  # noqa: E402

PROVING_TILES = (3, 4, 4)  # tile grid of the proving ground (256×256×17); tiles of 2×4×4 tokens
TILE = (2, 4, 4)


def variant_of(key: str) -> tuple[str, str, int | None]:
    """('ptq'|'qat'|'dense', variant name, curve step or None) of a row key such as qat_fp8_k12_100."""
    if key == "dense":
        return "dense", "dense", None
    kind, name = key.split("_", 1)
    m = re.fullmatch(r"(.*)_(\d+)", name)
    if m and m.group(1) in thesis.VARIANTS:
        return kind, m.group(1), int(m.group(2))
    return kind, name, None


def regime_density(regime, realised: float) -> float:
    n = PROVING_TILES[0] * PROVING_TILES[1] * PROVING_TILES[2]
    if regime.pattern == "dense":
        return 1.0
    if regime.pattern == "topk":
        return regime.topk_of(n) / n
    if regime.pattern in ("window", "window_topk"):
        w = window_mask(PROVING_TILES, regime.window).counts.float().mean().item() / n
        # window ∪ top-k: the top-k tiles outside the window, counted as if chosen independently of it (an estimate)
        return w if regime.pattern == "window" else w + (1 - w) * regime.topk_of(n) / n
    return realised  # learned: what the evaluation measured


def schedule_of(name: str, folder: Path) -> Schedule | None:
    if name in (thesis.CONTROL, "dense"):
        return None
    path = folder / "schedules" / f"{name}.yaml"
    if path.exists():
        return Schedule.from_config(FPSConfig(schedule_file=str(path)), TILE)
    spec = thesis.VARIANTS.get(name)  # not written by that run: the variant as thesis.py defines it
    if spec is None:
        return None
    if isinstance(spec, str):
        return Schedule.from_config(FPSConfig(schedule_file=str(thesis.REPO / spec)), TILE)
    return Schedule.from_config(FPSConfig(regimes=regimes_from_data(spec)), TILE)


def speedup_720p(schedule: Schedule | None, densities: list[float], bench: dict, name: str) -> float | None:
    """Expected 50-step attention speedup over cuDNN bf16 at 720p from the measured whole-call density curve."""
    r = next(x for x in bench["results"] if "720p" in x["name"])
    cudnn = r["sdpa_cudnn"]
    if name == "default" and "default" in r["schedules"]:
        return r["schedules"]["default"]["call_speedup_cudnn"]
    if schedule is None:  # the dense model and the dense control: bf16 SDPA, the baseline itself
        return 1.0
    curve = sorted([(e["avg_density"], e["avg_call_ms"]) for k, e in r["schedules"].items() if k.startswith("uniform")]
                   + [(1.0, r["dense"][r["best_dense_config"]])])

    def ms(d: float) -> float:
        for (d0, t0), (d1, t1) in zip(curve, curve[1:]):
            if d <= d1:
                return t0 + (t1 - t0) * (max(d, d0) - d0) / (d1 - d0)
        return curve[-1][1]

    return cudnn / (sum(ms(d) for d in densities) / len(densities))


def gather(sources: list[tuple[str, Path]], bench: dict | None) -> list[dict]:
    rows = []
    for label, folder in sources:
        report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
        done = report.get("qat_steps_done", {})
        for results in sorted(folder.glob("eval/group*/results.json")):
            for v in json.loads(results.read_text())["variants"]:
                key = "dense" if v["reference"] else Path(v["deploy"]).name
                kind, name, step = variant_of(key)
                schedule = schedule_of(name, folder)
                if schedule is None:
                    per_step = [1.0] * 50
                else:
                    per_step = [regime_density(schedule.regime_for(s), v["density_mean"]) for s in sampling_sigmas()]
                rows.append({
                    "source": label, "key": key, "kind": kind, "variant": name,
                    "steps": done.get(key) or step or (None if kind != "qat" else report.get("qat_steps")),
                    "psnr": v["psnr"], "ssim": v["ssim"], "accuracy": v["accuracy"],
                    "density_eval": v["density_mean"], "density_50": sum(per_step) / len(per_step),
                    "speedup_720p": None if bench is None else speedup_720p(schedule, per_step, bench, name)})
    unique = {}
    for r in rows:  # the dense reference and training-free rows are the same in every source: keep the first
        unique.setdefault((None if r["kind"] in ("dense", "ptq") else r["source"], r["key"]), r)
    return list(unique.values())


def table(rows: list[dict]) -> str:
    lines = ["| source | variant | method | QAT steps | PSNR (dB) | SSIM | colour | shape | direction | all 5 | "
             "density (50 steps) | expected attention speedup, 720p |", "|---" * 12 + "|"]
    order = {"dense": 0, "ptq": 1, "qat": 2}
    for r in sorted(rows, key=lambda r: (order[r["kind"]], r["variant"], r["source"], r["steps"] or 0)):
        a = r["accuracy"] or {}
        psnr = "—" if r["psnr"] is None else f"{r['psnr']:.2f}"
        ssim = "—" if r["ssim"] is None else f"{r['ssim']:.3f}"
        speed = "—" if r["speedup_720p"] is None else f"{r['speedup_720p']:.2f}×"
        lines.append(f"| {r['source']} | {r['variant']} | {r['kind'].upper()} | {r['steps'] or '—'} | {psnr} | "
                     f"{ssim} | {a.get('colour', 0):.2f} | {a.get('shape', 0):.2f} | {a.get('direction', 0):.2f} | "
                     f"{a.get('all', 0):.2f} | {r['density_50']:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Per variant: its training-free point, an arrow to its longest QAT run (the learned selector has no PTQ
    point); the one-regime variants of the default schedule and the dense control are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ptq = {r["variant"]: r for r in rows if r["kind"] == "ptq" and not r["variant"].startswith("default_")}
    qat: dict[str, dict] = {}
    for r in rows:
        if r["kind"] == "qat" and r["variant"] != thesis.CONTROL and (r["steps"] or 0) > (
                qat.get(r["variant"], {}).get("steps") or 0):
            qat[r["variant"]] = r
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, label, value in ((axes[0], "PSNR vs the dense model's videos (dB)", lambda r: r["psnr"]),
                             (axes[1], "prompt following: all five attributes right", lambda r: r["accuracy"]["all"])):
        for name in sorted(set(ptq) | set(qat)):
            a, b = ptq.get(name), qat.get(name)
            if a:
                ax.scatter(a["density_50"], value(a), color="tab:red", marker="o", zorder=3)
            if b:
                ax.scatter(b["density_50"], value(b), color="tab:blue", marker="s", zorder=3)
            if a and b:
                ax.annotate("", (b["density_50"], value(b)), (a["density_50"], value(a)),
                            arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8})
            top = b or a
            ax.annotate(name + (f" ({b['steps']} steps)" if b else ""), (top["density_50"], value(top)), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
        if dense and value(dense) is not None:  # (the dense model's PSNR against itself is not plotted)
            ax.axhline(value(dense), color="grey", ls="--", lw=0.8)
        ax.scatter([], [], color="tab:red", marker="o", label="training-free (PTQ)")
        ax.scatter([], [], color="tab:blue", marker="s", label="trained in the loop (QAT)")
        ax.set_xscale("log")
        ax.set_xlabel("mean tile-pair density over 50 sampling steps (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[1].set_title("dashed: the dense model", fontsize=8)
    fig.suptitle("Proving ground: FP8 + sparse attention applied after training (red) vs trained in the loop (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--bench", help="bench_attention.json with uniform top-k schedules (scripts/bench_device.sh)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    sources = [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.source]
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    rows = gather(sources, bench)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thesis_table.md").write_text(table(rows))
    (out / "thesis_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "thesis_quality_vs_density.png")
    print(table(rows))


if __name__ == "__main__":
    main()
