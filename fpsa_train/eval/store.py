"""Every generated video is kept, so a killed or extended evaluation resumes instead of resampling.

Layout: `<out>/videos/<variant>/<prompt id>_seed<k>.npy` holds the (T, H, W, 3) uint8 frames (lossless: the metrics
must see exactly what the sampler decoded, which an mp4 would not keep; 81 frames at 480×832 are 97 MB), and
`<…>.json` beside it holds what made it (`inputs`) and what was measured while making it (`stats`: steps per regime,
the per-step trace of σ, regime, density and seconds, which attention ran, the initial noise's hash).

A video is reused only when every input that decides its pixels is the same: the deploy folder's content (the
manifest's own sha256, which covers every file's sha256), which attention (exported schedule, one forced regime, or
dense), whether the Linears ran in FP8 (part of the inputs only when on, so older videos keep their keys), prompt,
negative prompt, seed, steps, guidance, shift, size, the components folder, the device type and the attention
backend. Anything else is sampled again and overwrites the old files. The npy is written first and the
json last, both atomically, so a json always describes a complete npy.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from fpsa_train.atomic import write_bytes_atomic, write_text_atomic
from fpsa_train.eval.prompts import prompt_id


def safe_name(name: str) -> str:
    """A file-system-safe folder name (letters, digits, . _ - @ kept)."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_") or "variant"


class VideoStore:
    """The saved videos of one evaluation folder."""

    def __init__(self, out: str | Path):
        self.root = Path(out) / "videos"

    def paths(self, variant: str, prompt: str, seed: int) -> tuple[Path, Path]:
        """(npy, json) of a video."""
        stem = self.root / safe_name(variant) / f"{prompt_id(prompt)}_seed{seed}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def load_record(self, variant: str, prompt: str, seed: int, inputs: dict) -> dict | None:
        """The saved record ({inputs, stats, shape}) when a video with exactly these inputs is complete, else None."""
        npy, meta = self.paths(variant, prompt, seed)
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            record = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return None
        if record.get("inputs") != _plain(inputs):
            return None
        if _npy_shape(npy) != tuple(record.get("shape", ())):
            return None
        return record

    def load_video(self, variant: str, prompt: str, seed: int) -> np.ndarray:
        return np.load(self.paths(variant, prompt, seed)[0])

    def save(self, variant: str, prompt: str, seed: int, inputs: dict, video: np.ndarray, stats: dict) -> dict:
        """Write the frames, then the record describing them; returns the record."""
        npy, meta = self.paths(variant, prompt, seed)
        npy.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, video)
        write_bytes_atomic(npy, buffer.getvalue())
        record = {"inputs": _plain(inputs), "stats": _plain(stats), "shape": list(video.shape), "file": npy.name}
        write_text_atomic(meta, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return record


def _plain(obj):
    """JSON round trip: what comparing with a record read back from disk needs (tuples become lists)."""
    return json.loads(json.dumps(obj, ensure_ascii=False))


def _npy_shape(path: Path) -> tuple | None:
    """The array shape in an .npy header (None if the file is not a complete one)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return None
    return tuple(array.shape)
