"""A VBench hook: the dimensions that accept custom videos, computed only from what is already on this machine.

VBench (Vchitect/VBench, the benchmark the paper's Table 5 uses) scores most dimensions with its own prompt suite;
on custom prompts (`mode="custom_input"`) only these quality dimensions apply: subject and background consistency,
motion smoothness, dynamic degree, aesthetic and imaging quality, temporal flickering. Each needs a model that
VBench fetches on first use into `$VBENCH_CACHE_DIR` (default `~/.cache/vbench`): with wget, from several hosts.
An evaluation never downloads, so before calling VBench this hook checks that the package imports and that each
dimension's weights are in the cache; dimensions whose weights are missing are skipped and named with the files
they need, and the results say so. VBench reads mp4 files: each variant's videos are written to
`<out>/vbench/<variant>/` (H.264, crf 18) for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CUSTOM_INPUT_DIMENSIONS = {  # dimension: files it needs under the VBench cache (vbench/utils.py init_submodules)
    "subject_consistency": ("dino_model/facebookresearch_dino_main", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "temporal_flickering": (),
}


def cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def vbench_plan() -> dict:
    """{available: bool, reason, dimensions: [runnable], missing: {dimension: [missing files]}}."""
    try:
        import vbench  # noqa: F401
    except ImportError as err:
        return {"available": False, "reason": f"the vbench package is not installed ({err}); install it and place "
                f"its weights under {cache_dir()} (VBENCH_CACHE_DIR)", "dimensions": [], "missing": {}}
    root = cache_dir()
    missing = {dim: [str(root / f) for f in files if not (root / f).exists()]
               for dim, files in CUSTOM_INPUT_DIMENSIONS.items()}
    missing = {dim: files for dim, files in missing.items() if files}
    runnable = [dim for dim in CUSTOM_INPUT_DIMENSIONS if dim not in missing]
    reason = None if not missing else "weights missing (never downloaded here) for " + "; ".join(
        f"{dim}: {', '.join(files)}" for dim, files in missing.items())
    return {"available": bool(runnable), "reason": reason, "dimensions": runnable, "missing": missing}


def run_vbench(videos: list, folder: Path, name: str, dimensions: list[str], device, fps: float = 16.0) -> dict:
    """VBench's custom-input scores {dimension: mean} of `videos` [(file stem, (T, H, W, 3) uint8)], written as mp4s
    into `folder`; VBench's own result files go to `folder`/results."""
    from vbench import VBench

    import vbench as package
    from fpsa_train.media import write_mp4

    clips = folder / "videos"
    clips.mkdir(parents=True, exist_ok=True)
    for stem, video in videos:
        write_mp4(clips / f"{stem}.mp4", video, fps)
    results = folder / "results"
    full_info = Path(package.__file__).parent / "VBench_full_info.json"
    bench = VBench(str(device), str(full_info), str(results))
    bench.evaluate(videos_path=str(clips), name=name, dimension_list=dimensions, local=True, mode="custom_input")
    raw = json.loads((results / f"{name}_eval_results.json").read_text())
    return {dim: float(value[0] if isinstance(value, (list, tuple)) else value) for dim, value in raw.items()}
