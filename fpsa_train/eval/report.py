"""What an evaluation leaves for people: results.md (the table), results.json (everything, per video too),
contact_sheet.png (rows prompt × seed, columns the reference then each variant, a few evenly spaced frames each) and
plot.png (fidelity, prompt accuracy and attention density per step, per variant). All written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fpsa_train.atomic import write_bytes_atomic, write_text_atomic

RESULTS_MD, RESULTS_JSON, SHEET, PLOT = "results.md", "results.json", "contact_sheet.png", "plot.png"


def write_reports(results: dict, out: Path, store, variants: list, prompts: list[str], seeds: list[int],
                  cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = {name: str(out / name) for name in (RESULTS_MD, RESULTS_JSON, SHEET, PLOT)}
    write_text_atomic(out / RESULTS_MD, markdown(results))
    write_text_atomic(out / RESULTS_JSON, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    rows = [(p, s) for p in prompts for s in seeds][: cfg.sheet_rows]
    sheet = contact_sheet(store, [v.key for v in variants], rows, {p: i for i, p in enumerate(prompts)},
                          cfg.sheet_frames, cfg.sheet_height)
    write_bytes_atomic(out / SHEET, _png(sheet))
    write_bytes_atomic(out / PLOT, plot(results))


# ------------------------------------------------------------------------------------------------ results.md


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    s = results["settings"]
    names = results["following"]["attributes"]
    size = s["size"]
    lines = [
        f"# Evaluation: {', '.join(sorted({v['model'] for v in results['variants'] if not v['reference']}))} "
        f"against the reference: {s['reference_model']}, {s['reference_attention']}", "",
        f"{s['num_prompts']} prompts ({s['prompts']}) × seeds {s['seeds']}; {s['steps']} steps, guidance "
        f"{s['guidance']:g}, shift {s['shift']:g}, {size['height']}×{size['width']}, {size['frames']} frames; device "
        f"{s['device']}, backend {s['backend']}. Videos sampled now: {results['videos_sampled']}, reused from "
        f"earlier runs: {results['videos_reused']}.", "",
        "| candidate | regime / schedule | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ | "
        + " | ".join(names) + " | all | density | s/step | attention |",
        "|" + "---|" * (9 + len(names)),
    ]
    for v in results["variants"]:
        acc = v["accuracy"] or {}
        model = f"reference: {v['model']}" if v["reference"] else v["model"]
        lines.append(f"| {model} | {v['regime']} | {_num(v['psnr'], '.2f')} | {_num(v['ssim'], '.4f')} | "
                     f"{_num(v['lpips'], '.4f')} | " + " | ".join(_num(acc.get(n), '.2f') for n in names)
                     + f" | {_num(acc.get('all'), '.2f')} | {v['density_mean']:.3f} | {v['seconds_per_step']:.3f}"
                     f" | {'; '.join(v['attention'])} |")
    lpips, follow = results["lpips"], results["following"]
    lines += [
        "", "## How the columns are computed", "",
        "- **PSNR, SSIM**: against the reference's video from the same prompt, seed and initial noise, on the decoded "
        "uint8 frames as float in [0, 1] (data range 1), RGB, per frame; a video's value is the mean over its frames, "
        "the row's the mean over its videos. torchmetrics: `peak_signal_noise_ratio`; `structural_similarity_index_"
        f"measure` with its defaults (Gaussian window 11, σ 1.5). Identical frames (PSNR +inf) count as the cap, "
        f"{results['psnr_cap_db']:g} dB.",
        "- **LPIPS** (AlexNet): " + ("computed the same way." if lpips["available"]
                                    else f"not available: {lpips['reason']}."),
        "- **Prompt following** (" + ", ".join(names) + ", all = every attribute right): " + (
            "fraction of videos whose analysed scene (fpsa_train.eval.analyzer) matches the prompt's attributes, over "
            "the videos whose prompt is a caption of the synthetic world; others are not applicable, not wrong."
            if follow["available"] else f"not available: {follow['reason']}."),
        "- **density**: realised fraction of (query tile, key tile) pairs the self-attention computed, mean over "
        "layers, per denoising step; the column is the mean over steps and videos (dense SDPA: 1).",
        "- **s/step**: median over the row's videos of denoising seconds / steps, as recorded when each video was "
        "sampled (both guidance branches in one batch; the decode excluded).",
        "- **attention**: which implementation ran (`Deployed.backend`).",
        "- **VBench**: " + _vbench_line(results), "",
    ]
    if results["schedules"]:
        lines += ["## Schedules", ""]
        for key, regimes in results["schedules"].items():
            lines += [f"- {key}: " + ("; ".join(regimes) if regimes else "none (dense SDPA)")]
        lines.append("")
    lines += ["## Prompts", ""] + [f"{p['index']}. `{p['id']}` {p['prompt']}" for p in results["prompts"]] + [""]
    return "\n".join(lines)


def _vbench_line(results: dict) -> str:
    vbench = results["vbench"]
    if not vbench["dimensions"]:
        return f"not available: {vbench['reason']}."
    scores = "; ".join(f"{v['key']}: " + ", ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}"
                                                      for k, x in (v["vbench"] or {}).items())
                       for v in results["variants"])
    missing = f" Skipped: {vbench['reason']}." if vbench["reason"] else ""
    return f"custom-input dimensions {', '.join(vbench['dimensions'])}: {scores}.{missing}"


# ------------------------------------------------------------------------------------------- contact sheet


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _strip(video: np.ndarray, n: int, height: int) -> np.ndarray:
    """n evenly spaced frames of (T, H, W, 3), each resized to `height`, side by side: (height, n·w, 3)."""
    from PIL import Image

    t, h, w, _ = video.shape
    width = max(1, round(w * height / h))
    picks = np.unique(np.linspace(0, t - 1, min(n, t)).round().astype(int))
    frames = [np.asarray(Image.fromarray(video[i]).resize((width, height), Image.BILINEAR)) for i in picks]
    return np.concatenate(frames, axis=1)


def contact_sheet(store, keys: list[str], rows: list[tuple[str, int]], index: dict, n: int, height: int):
    """A PIL image: a header of variant names, then one row per (prompt, seed): its label, then the reference's
    strip of frames and each variant's, separated by 4-pixel gaps."""
    from PIL import Image, ImageDraw

    strips = [[_strip(store.load_video(k, p, s), n, height) for k in keys] for p, s in rows]
    cell_w = max(s.shape[1] for row in strips for s in row)
    gap, label_w, header_h = 4, 72, 16
    sheet = Image.new("RGB", (label_w + len(keys) * (cell_w + gap), header_h + len(rows) * (height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, key in enumerate(keys):
        draw.text((label_w + c * (cell_w + gap) + 2, 2), key, fill="black")
    for r, ((prompt, seed), row) in enumerate(zip(rows, strips)):
        y = header_h + r * (height + gap)
        draw.text((2, y + 2), f"prompt {index[prompt]}\nseed {seed}", fill="black")
        for c, strip in enumerate(row):
            sheet.paste(Image.fromarray(strip), (label_w + c * (cell_w + gap), y))
    return sheet


# ------------------------------------------------------------------------------------------------- plot.png


def plot(results: dict) -> bytes:
    """PNG bytes: PSNR (SSIM on the bars) per variant; accuracy per attribute per variant; density per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    variants = results["variants"]
    names = results["following"]["attributes"] + ["all"]
    fig, (ax_psnr, ax_acc, ax_density) = plt.subplots(1, 3, figsize=(18, 4.8))
    compared = [v for v in variants if not v["reference"]]
    bars = ax_psnr.bar(range(len(compared)), [v["psnr"] for v in compared], color="tab:blue")
    for bar, v in zip(bars, compared):
        ax_psnr.annotate(f"SSIM {v['ssim']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    ax_psnr.set_xticks(range(len(compared)), [v["key"] for v in compared], rotation=30, ha="right", fontsize=8)
    ax_psnr.set_ylabel("PSNR to the reference (dB)")
    ax_psnr.set_title(f"Fidelity (cap {results['psnr_cap_db']:g} dB)")

    if results["following"]["available"]:
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            acc = v["accuracy"] or {}
            ax_acc.bar(np.arange(len(names)) + i * width, [acc.get(n) or 0 for n in names], width, label=v["key"])
        ax_acc.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
        ax_acc.set_ylim(0, 1.05)
        ax_acc.legend(fontsize=7)
    else:
        ax_acc.text(0.5, 0.5, "prompt following not available:\n" + results["following"]["reason"], ha="center",
                    va="center", wrap=True, fontsize=8, transform=ax_acc.transAxes)
    ax_acc.set_title("Prompt following (fraction right)")

    for v in variants:
        ax_density.plot(range(1, len(v["density_per_step"]) + 1), v["density_per_step"], marker="o", label=v["key"])
    ax_density.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_density.set_xlabel("denoising step")
    ax_density.set_ylabel("realised tile-pair density")
    ax_density.set_ylim(0, 1.05)
    ax_density.set_title("Attention density per step")
    ax_density.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
