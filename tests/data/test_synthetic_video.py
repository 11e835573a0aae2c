"""The synthetic clips decode as written and their captions state what is on screen (colour, shape, motion)."""

from __future__ import annotations

import csv
import math
import re

import decord
import numpy as np
import pytest

from fpsa_train.data.synthetic_video import (
    BACKGROUNDS, DIRECTIONS, PALETTE, SPEEDS, caption_vocabulary, clip_spec, generate_clips, render, write_mp4,
)

FRAMES, FPS, SIZE = 13, 24.0, (96, 112)  # (height, width): non-square catches a swapped axis
CAPTION = re.compile(r"an? (\w+) (circle|square) moving ([a-z ]+?) (slowly|quickly)")


def _rows(metadata) -> list[dict]:
    with open(metadata, newline="") as f:
        return list(csv.DictReader(f))


def _frames(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float32)  # (T, H, W, 3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    return out, generate_clips(out, 16, frames=FRAMES, fps=FPS, size=SIZE, seed=3)


def test_files_decode_with_frames_fps_and_size(clips):
    out, metadata = clips
    assert metadata == out / "metadata.csv"
    rows = _rows(metadata)
    assert [r["video"] for r in rows] == [f"clips/clip_{i:05d}.mp4" for i in range(16)]
    for row in rows[:4]:
        reader = decord.VideoReader(str(metadata.parent / row["video"]))
        assert len(reader) == FRAMES
        assert reader.get_avg_fps() == pytest.approx(FPS, rel=1e-3)
        assert reader[0].shape == (*SIZE, 3)
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"


def test_captions_use_only_the_vocabulary(clips):
    vocab = set(caption_vocabulary())
    for row in _rows(clips[1]):
        assert set(row["prompt"].split()) <= vocab, row["prompt"]


def _circular_centroid(mask: np.ndarray) -> np.ndarray:
    """(y, x) centroid of a mask on the torus (shapes wrap around the borders)."""
    out = []
    for axis, n in ((0, mask.shape[0]), (1, mask.shape[1])):
        angle = 2 * math.pi * (np.arange(n) + 0.5) / n
        weight = mask.sum(axis=1 - axis)
        out.append(math.atan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum()) * n / (2 * math.pi))
    return np.array(out)


def test_captions_match_content(clips):
    """Decoded pixels: background colour, the shape's colour, kind, direction and speed all match the caption."""
    out, metadata = clips
    checked = 0
    for row in _rows(metadata):
        background = re.search(r"on an? ([a-z ]+) background$", row["prompt"]).group(1)
        shapes = CAPTION.findall(row["prompt"])
        video = _frames(out / row["video"])  # (T, H, W, 3)
        bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
        far = np.linalg.norm(video - bg, axis=-1) > 60  # (T, H, W) pixels well away from the background
        assert np.median(video[~far], axis=0) == pytest.approx(bg, abs=6), row["prompt"]
        if len(shapes) != 1:
            continue  # two shapes may overlap; one shape is checked in full
        colour, kind, direction, speed = shapes[0]
        core = np.linalg.norm(video - np.asarray(PALETTE[colour]), axis=-1) < 40
        assert core.mean() > 0.5 * far.mean(), f"{row['prompt']}: shape pixels are not {colour}"
        nearest = min(PALETTE, key=lambda c: np.linalg.norm(np.median(video[far], axis=0) - PALETTE[c]))
        assert nearest == colour, row["prompt"]

        centres = np.stack([_circular_centroid(m) for m in far])  # (T, 2)
        step = np.diff(centres, axis=0)
        step = (step + np.array(SIZE) / 2) % np.array(SIZE) - np.array(SIZE) / 2  # unwrap on the torus
        motion = step.sum(0) / (FRAMES - 1)  # mean (dy, dx) pixels per frame
        expected = np.asarray(DIRECTIONS[direction]) * SPEEDS[speed] * min(SIZE)
        assert np.linalg.norm(motion - expected) < 0.25 * np.linalg.norm(expected), \
            f"{row['prompt']}: moves {motion}, expected {expected}"

        mask = far[0]  # circle: area / max_radius² = π; square: 4 r² / (r√2)² = 2
        ys, xs = np.nonzero(mask)
        dy = (ys + 0.5 - centres[0, 0] + SIZE[0] / 2) % SIZE[0] - SIZE[0] / 2
        dx = (xs + 0.5 - centres[0, 1] + SIZE[1] / 2) % SIZE[1] - SIZE[1] / 2
        ratio = mask.sum() / (dy**2 + dx**2).max()
        assert (ratio > 2.6) == (kind == "circle"), f"{row['prompt']}: area / r_max² = {ratio:.2f}"
        checked += 1
    assert checked >= 5


def test_second_call_rewrites_nothing(clips):
    out, metadata = clips
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert generate_clips(out, 16, frames=FRAMES, fps=FPS, size=SIZE, seed=3) == metadata
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_deterministic_from_seed_and_regenerated_on_change(clips, tmp_path):
    out, metadata = clips
    again = generate_clips(tmp_path / "a", 3, frames=FRAMES, fps=FPS, size=SIZE, seed=3)
    rows_seed3 = _rows(again)
    assert rows_seed3 == _rows(metadata)[:3]
    for row in _rows(again):  # one encoder thread (write_mp4) makes the files byte-identical, not just similar
        assert (again.parent / row["video"]).read_bytes() == (out / row["video"]).read_bytes(), row["video"]

    other = generate_clips(tmp_path / "a", 3, frames=FRAMES, fps=FPS, size=SIZE, seed=4)  # same dir, new seed
    fresh = generate_clips(tmp_path / "b", 3, frames=FRAMES, fps=FPS, size=SIZE, seed=4)
    assert _rows(other) == _rows(fresh) != rows_seed3
    assert (other.parent / "clips/clip_00001.mp4").read_bytes() == (fresh.parent / "clips/clip_00001.mp4").read_bytes()


def test_rendering_is_a_pure_function_of_the_spec():
    """What the encode starts from is deterministic by itself (no encoder involved)."""
    spec = clip_spec(3, 5)
    np.testing.assert_array_equal(render(spec, FRAMES, SIZE), render(dict(spec), FRAMES, SIZE))
    assert not np.array_equal(render(spec, FRAMES, SIZE), render(clip_spec(4, 5), FRAMES, SIZE))


def test_encoding_is_byte_identical_across_repeats_and_faithful(tmp_path):
    """Regression: libx264's defaults gave up to 12 different files for the same frames (PyAV 18.1); the decoded
    frames stay close to the rendered ones."""
    for k, (frames, size) in enumerate([(25, (96, 112)), (17, (64, 64))]):
        video = render(clip_spec(5, k), frames, size)
        blobs = set()
        for i in range(8):
            write_mp4(tmp_path / f"{k}_{i}.mp4", video, 16.0)
            blobs.add((tmp_path / f"{k}_{i}.mp4").read_bytes())
        assert len(blobs) == 1, f"{len(blobs)} different encodes of clip {k}"
        mse = float(((_frames(tmp_path / f"{k}_0.mp4") - video.astype(np.float32)) ** 2).mean())
        assert 10 * math.log10(255**2 / mse) > 30.0


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        generate_clips(tmp_path, 1, size=(33, 64))
    with pytest.raises(ValueError, match="num_clips"):
        generate_clips(tmp_path, 0)
