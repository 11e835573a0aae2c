"""The synthetic clips decode as written and their captions state what is on screen (colour, shape, motion); captions
parse back to their attributes; the held-out object combinations never reach training."""

from __future__ import annotations

import collections
import csv
import itertools
import math
import re

import decord
import numpy as np
import pytest

from fpsa_train.data.synthetic_video import (
    BACKGROUNDS, DIRECTIONS, HELDOUT_OBJECTS, HELDOUT_SEEDS, PALETTE, SEPARATION, SHAPES, SPEEDS, caption,
    caption_vocabulary, clip_spec, generate_clips, heldout_prompts, is_heldout, parse_caption, render, write_mp4,
)

FRAMES, FPS, SIZE = 13, 24.0, (96, 112)  # (height, width): non-square catches a swapped axis
CAPTION = re.compile(r"an? (\w+) (circle|square|triangle) moving ([a-z ]+?) (slowly|quickly)")


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

        mask = far[0]  # circle: area / max_radius² = π; square: 4 r² / (r√2)² = 2; triangle: 3√3 a² / (2a)² = 1.3
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


def _attributes(spec: dict) -> dict:
    """What a caption states about a clip_spec: its background and each shape's four attributes."""
    keys = ("colour", "shape", "direction", "speed")
    return {"background": spec["background"], "shapes": [{k: s[k] for k in keys} for s in spec["shapes"]]}


def test_parse_caption_inverts_caption():
    """Thousands of specs round-trip, including two-shape captions whose directions contain "and"."""
    specs = [clip_spec(seed, i) for seed in (0, 1) for i in range(2000)]
    assert sum(len(s["shapes"]) == 2 for s in specs) > 1000
    assert any(" and " in s["shapes"][0]["direction"] and len(s["shapes"]) == 2 for s in specs)
    for spec in specs:
        assert parse_caption(caption(spec)) == _attributes(spec), caption(spec)
    red = {"colour": "red", "shape": "circle", "direction": "left", "speed": "quickly"}
    assert parse_caption("  A Red  circle moving LEFT quickly on a black background ") == {
        "background": "black", "shapes": [red]}


@pytest.mark.parametrize("text, part", [
    ("a pink circle moving left quickly on a black background", "'a pink circle moving left quickly'"),
    ("a red circle moving sideways quickly on a black background", "'a red circle moving sideways quickly'"),
    ("a red circle moving left quickly and a blue hexagon moving up slowly on a black background",
     "'a blue hexagon moving up slowly'"),
    ("a red circle moving left quickly on a bright background", "background"),
    ("a red circle moving left quickly", "background"),
    ("", "background"),
])
def test_parse_caption_names_the_part_it_cannot_read(text, part):
    with pytest.raises(ValueError, match=re.escape(part)):
        parse_caption(text)


def test_heldout_prompts_cover_every_value_and_parse():
    prompts = heldout_prompts()
    assert 16 <= len(prompts) == len(set(prompts)) <= 32 and prompts == heldout_prompts()  # fixed, deterministic
    scenes = [parse_caption(p) for p in prompts]
    assert all(len(s["shapes"]) == 1 and is_heldout(s) for s in scenes)
    assert {tuple(s["shapes"][0].values()) for s in scenes} == set(HELDOUT_OBJECTS)
    for key, values in (("colour", PALETTE), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS)):
        assert {s["shapes"][0][key] for s in scenes} == set(values), key
    assert {s["background"] for s in scenes} == set(BACKGROUNDS)
    assert set(" ".join(prompts).split()) <= set(caption_vocabulary())
    assert len(HELDOUT_SEEDS) == len(set(HELDOUT_SEEDS)) >= 2


def test_training_never_draws_a_heldout_object_but_sees_every_value():
    """Held out = the object combination, on any background, alone or beside another shape; each single value of
    every attribute still appears in training."""
    specs = [clip_spec(seed, i) for seed in (0, 1234) for i in range(2500)]
    heldout = set(heldout_prompts())
    seen = collections.defaultdict(set)
    for spec in specs:
        assert not is_heldout(spec) and caption(spec) not in heldout, caption(spec)
        seen["background"].add(spec["background"])
        for s in spec["shapes"]:
            for key in ("colour", "shape", "direction", "speed"):
                seen[key].add(s[key])
    assert seen == {"background": set(BACKGROUNDS), "colour": set(PALETTE), "shape": set(SHAPES),
                    "direction": set(DIRECTIONS), "speed": set(SPEEDS)}
    objects = {(s["colour"], s["shape"], s["direction"], s["speed"]) for spec in specs for s in spec["shapes"]}
    all_objects = set(itertools.product(PALETTE, SHAPES, DIRECTIONS, SPEEDS))
    assert objects == all_objects - set(HELDOUT_OBJECTS)  # every other combination is drawn
    assert is_heldout(parse_caption(heldout_prompts()[0]))


def test_generated_metadata_has_no_heldout_caption(clips):
    for row in _rows(clips[1]):
        assert not is_heldout(parse_caption(row["prompt"])), row["prompt"]


def test_two_shapes_start_apart():
    for i in range(1000):
        spec = clip_spec(2, i)
        if len(spec["shapes"]) == 2:
            a, b = (np.asarray(s["start"]) for s in spec["shapes"])
            gap = np.abs((a - b + 0.5) % 1.0 - 0.5)  # per axis on the torus
            assert gap.max() >= SEPARATION, spec


def test_triangle_points_up_with_its_centroid_at_the_centre():
    """The triangle's pixels: apex above the centre, flat base below, centroid at the drawn centre."""
    spec = {"background": "black", "shapes": [{"shape": "triangle", "colour": "white", "direction": "left",
                                                "speed": "slowly", "radius": 0.15, "start": [0.5, 0.5]}]}
    frame = render(spec, 1, (128, 128))[0].astype(np.float32).mean(-1)  # (H, W)
    alpha = (frame - 10) / (245 - 10)
    ys, xs = np.nonzero(alpha > 0.5)
    assert (alpha * (np.arange(128)[:, None] + 0.5)).sum() / alpha.sum() == pytest.approx(64, abs=0.3)
    assert (alpha * (np.arange(128)[None, :] + 0.5)).sum() / alpha.sum() == pytest.approx(64, abs=0.3)
    inradius = 0.75 * 0.15 * 128
    assert 64 - ys.min() == pytest.approx(2 * inradius, abs=1.5)  # apex above
    assert ys.max() + 1 - 64 == pytest.approx(inradius, abs=1.5)  # base below
    assert (xs.max() + 1 - xs.min()) == pytest.approx(2 * math.sqrt(3) * inradius, abs=2)
    assert alpha.sum() == pytest.approx(3 * math.sqrt(3) * inradius**2, rel=0.03)


def test_clips_written_by_several_processes_are_the_same_files(tmp_path):
    one = generate_clips(tmp_path / "one", 6, frames=9, fps=FPS, size=(64, 64), seed=8)
    two = generate_clips(tmp_path / "two", 6, frames=9, fps=FPS, size=(64, 64), seed=8, workers=2)
    assert one.read_text() == two.read_text()
    for row in _rows(one):
        assert (one.parent / row["video"]).read_bytes() == (two.parent / row["video"]).read_bytes()
