"""Shared video fixtures: generated clips, bad inputs, and untrained tiny Wan-layout encoders (fast to build)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from fpsa_train.data.synthetic_video import generate_clips
from fpsa_train.data.tiny_models import build_tiny_wan_components

GOOD = 8


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    generate_clips(root / "good", GOOD, seed=0)
    generate_clips(root / "short", 1, frames=6, seed=1)  # 0.25 s: too short for 17 frames at 16 fps
    build_tiny_wan_components(root / "components", None, seed=0)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.mp4").write_text("these are not the frames you are looking for\n" * 20)
    data = (root / "good" / "clips" / "clip_00000.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 3])
    shutil.copy(root / "short" / "clips" / "clip_00000.mp4", bad / "short.mp4")
    return root


def good_rows(root: Path) -> list[dict]:
    with open(root / "good" / "metadata.csv") as f:
        return [{"video": str((root / "good" / r["video"]).resolve()), "prompt": r["prompt"]}
                for r in csv.DictReader(f)]


def write_metadata(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video", "prompt"])
        w.writeheader()
        w.writerows(rows)
    return path


BAD_ROWS = [
    ({"video": "bad/missing.mp4", "prompt": "a red circle moving left"}, "missing"),
    ({"video": "bad/empty.mp4", "prompt": "a red circle moving left"}, "empty_file"),
    ({"video": "bad/notes.mp4", "prompt": "a red circle moving left"}, "not_video"),
    ({"video": "bad/truncated.mp4", "prompt": "a red circle moving left"}, "corrupt"),
    ({"video": "bad/short.mp4", "prompt": "a red circle moving left"}, "too_short"),
    ({"video": "good/clips/clip_00001.mp4", "prompt": "   "}, "empty_caption"),
]
