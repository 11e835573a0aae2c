"""Synthetic captioned mp4 clips: the tiny default's stand-in for a real video data set, and a world whose quality
can be measured.

Why real files: the tiny default should run the same path a real fine-tune runs (mp4 → decode → VAE latents and
text embeddings → cache → DiT), so the clips are ordinary H.264 mp4s listed in a DiffSynth-style `metadata.csv`
(`video,prompt`). Why these clips: the caption must *determine* the content, or there is nothing to learn. Each
clip shows one or two soft-edged shapes (circle, square or upward-pointing triangle) of distinct palette colours,
each moving in one of eight directions, slowly or quickly, over a dark background; the caption names every one of
those choices, e.g. "a red circle moving left quickly on a dark blue background". Only start positions and sizes
are left out. Because the caption determines the content, a generated video can be checked against its prompt:
`fpsa_train.eval.analyzer` reads every captioned attribute back from pixels.

Shapes **wrap around** the borders (a torus) rather than bounce: a bounce would reverse the motion mid-clip and
contradict "moving left"; with wrapping the caption holds for every frame of every crop. The triangle is there
because telling it from a circle and a square takes the shape's outline (3-fold against 4-fold corners), not its
size or colour; two shapes start apart, so neither hides the other for a whole clip (they may cross).

**Held out** (for measuring whether a fine-tuned model composes what it learned): `HELDOUT_OBJECTS` lists 24
object descriptions, each a full (colour, shape, direction, speed) combination. A training clip never contains one
of them, on any background, alone or beside another shape (`clip_spec` redraws such a clip), so no held-out
combination is ever seen in training, while every single value (each colour, shape, direction, speed and
background) is: 24 of the 384 combinations are missing, none of the 26 values. `heldout_prompts()` states each
held-out object alone on a background (24 captions, every colour, direction, shape, speed and background at least
once) and `HELDOUT_SEEDS` are the noise seeds to sample them with.

Everything is a pure function of (seed, clip index, frames, fps, size): reruns and other machines draw the same
captions and frames. Files are written under a temporary name and renamed, so a killed run never leaves a half mp4
or a half metadata file under its final name; `generator.json` records the parameters so a rerun skips every clip
already written with them (and a run with new parameters rewrites them all).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from fpsa_train.atomic import write_text_atomic
from fpsa_train.media import X264_DETERMINISTIC, write_mp4  # noqa: F401  re-exported: their old home

PALETTE = {  # shape colours, RGB
    "red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "magenta": (230, 50, 220), "cyan": (40, 220, 230), "orange": (250, 140, 20),
}
BACKGROUNDS = {  # dark, so every shape colour stands out
    "black": (10, 10, 10), "dark blue": (15, 20, 80), "dark green": (15, 60, 25), "dark gray": (60, 60, 60),
    "dark purple": (55, 15, 70),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {  # unit (dy, dx) in image coordinates (y grows downwards)
    "left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
    "up and left": (-0.7071, -0.7071), "up and right": (-0.7071, 0.7071),
    "down and left": (0.7071, -0.7071), "down and right": (0.7071, 0.7071),
}
SPEEDS = {"slowly": 0.008, "quickly": 0.025}  # fraction of the frame side per frame (1.0 / 3.2 px at 128)
RADIUS = (0.12, 0.18)  # shape half-size range, fraction of the shorter side
TRIANGLE_INRADIUS = 0.75  # × radius: a triangle's area (2.9 r²) then lies near the circle's (3.1 r²)
SOFTNESS = 0.02  # edge ramp width, fraction of the shorter side
SEPARATION = 0.35  # two shapes' start centres are this far apart along y or x at least (torus, fraction of the axis)
FORMAT = 2  # bump when rendering or clip_spec's draws change, so old clips are regenerated


def _heldout_objects() -> tuple[tuple[str, str, str, str], ...]:
    """24 (colour, shape, direction, speed) combinations: colour c meets directions c, c+3, c+6 (mod 8), so each
    colour and each direction appears three times; shapes and speeds rotate with (c, k)."""
    colours, directions, speeds = list(PALETTE), list(DIRECTIONS), list(SPEEDS)
    return tuple((colours[c], SHAPES[(c + 2 * k) % 3], directions[(c + 3 * k) % 8], speeds[(c + k) % 2])
                 for k in range(3) for c in range(8))


HELDOUT_OBJECTS = _heldout_objects()  # never in a training clip (module docstring)
_HELDOUT_SET = frozenset(HELDOUT_OBJECTS)
HELDOUT_SEEDS = (1000, 1001, 1002, 1003)  # noise seeds for sampling the held-out prompts


def heldout_prompts() -> list[str]:
    """The 24 held-out captions, one object each, on backgrounds chosen in turn (every background appears)."""
    backgrounds = list(BACKGROUNDS)
    return [caption({"background": backgrounds[i % len(backgrounds)],
                     "shapes": [{"colour": c, "shape": k, "direction": d, "speed": v}]})
            for i, (c, k, d, v) in enumerate(HELDOUT_OBJECTS)]


def is_heldout(spec: dict) -> bool:
    """Whether any shape of `spec` (a clip_spec or a parse_caption dict) is a held-out combination."""
    return any((s["colour"], s["shape"], s["direction"], s["speed"]) in _HELDOUT_SET for s in spec["shapes"])


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (sorted), for building the tiny tokenizer's vocabulary."""
    words = {"a", "an", "moving", "on", "background", "and"}  # the grammar's own words (see parse_caption)
    for names in (PALETTE, BACKGROUNDS, SHAPES, DIRECTIONS, SPEEDS):
        for name in names:
            words.update(name.split())
    return sorted(words)


def clip_spec(seed: int, index: int) -> dict:
    """The random choices of clip `index`: background, and per shape its kind, colour, direction, speed, size, start.

    A draw that contains a held-out object (`HELDOUT_OBJECTS`) is discarded and drawn again from the same stream,
    so training never sees one; the result stays a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    while True:
        spec = _draw_spec(rng)
        if not is_heldout(spec):
            return spec


def _draw_spec(rng: np.random.Generator) -> dict:
    n_shapes = 1 + int(rng.random() < 0.35)
    colours = rng.choice(list(PALETTE), size=n_shapes, replace=False)
    shapes = []
    for colour in colours:
        start = rng.random(2)  # (y, x) as fractions
        while shapes and np.abs(_wrap(start - shapes[0]["start"], 1.0)).max() < SEPARATION:
            start = rng.random(2)  # apart from the first (~half the draws), so one never hides the other all clip long
        shapes.append({
            "shape": str(rng.choice(SHAPES)), "colour": str(colour),
            "direction": str(rng.choice(list(DIRECTIONS))), "speed": str(rng.choice(list(SPEEDS))),
            "radius": float(rng.uniform(*RADIUS)), "start": start.tolist(),
        })
    return {"background": str(rng.choice(list(BACKGROUNDS))), "shapes": shapes}


def caption(spec: dict) -> str:
    """The caption naming every attribute of every shape, e.g. "a red circle moving left quickly on a dark blue
    background" (two shapes: "a ... and a ... on a ... background")."""
    parts = [f"{'an' if s['colour'][0] in 'aeiou' else 'a'} {s['colour']} {s['shape']} "
             f"moving {s['direction']} {s['speed']}" for s in spec["shapes"]]
    return f"{' and '.join(parts)} on a {spec['background']} background"


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # longest first: "up and left"


_OBJECT = re.compile(rf"an? ({_alternatives(PALETTE)}) ({_alternatives(SHAPES)}) moving "
                     rf"({_alternatives(DIRECTIONS)}) ({_alternatives(SPEEDS)})")
_CAPTION = re.compile(rf"(.+) on an? ({_alternatives(BACKGROUNDS)}) background")


def parse_caption(text: str) -> dict:
    """The attributes a caption states: {"background": str, "shapes": [{"colour", "shape", "direction", "speed"}]}
    (clip_spec's keys without radius and start). Inverse of `caption`; whitespace and case are normalised.
    Raises ValueError naming the part that is not in the grammar."""
    words = " ".join(str(text).lower().split())
    whole = _CAPTION.fullmatch(words)
    if whole is None:
        raise ValueError(f"caption {text!r}: expected '<shapes> on a <background> background' with a background "
                         f"from {list(BACKGROUNDS)}")
    shapes = []
    for part in re.split(r" and (?=an? )", whole.group(1)):  # "up and left" is not followed by an article
        match = _OBJECT.fullmatch(part)
        if match is None:
            raise ValueError(f"caption {text!r}: cannot parse {part!r}; expected 'a <colour> <shape> moving "
                             f"<direction> <speed>' with colour in {list(PALETTE)}, shape in {list(SHAPES)}, "
                             f"direction in {list(DIRECTIONS)}, speed in {list(SPEEDS)}")
        shapes.append(dict(zip(("colour", "shape", "direction", "speed"), match.groups())))
    return {"background": whole.group(2), "shapes": shapes}


def render(spec: dict, frames: int, size: tuple[int, int]) -> np.ndarray:
    """The clip's pixels, (T, H, W, 3) uint8. Later shapes are drawn over earlier ones."""
    h, w = size
    side = min(h, w)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5  # (H, 1)
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5  # (1, W)
    video = np.empty((frames, h, w, 3), dtype=np.float32)
    video[:] = np.asarray(BACKGROUNDS[spec["background"]], dtype=np.float32)
    for s in spec["shapes"]:
        dy, dx = DIRECTIONS[s["direction"]]
        step = SPEEDS[s["speed"]] * side  # pixels per frame
        colour = np.asarray(PALETTE[s["colour"]], dtype=np.float32)
        level = _extent(s) * side
        reach = (level + 0.5 * SOFTNESS * side) * (2.0 if s["shape"] == "triangle" else 1.0)  # alpha is 0 beyond
        for t in range(frames):
            cy = s["start"][0] * h + t * step * dy
            cx = s["start"][1] * w + t * step * dx
            oy = _wrap(ys - cy, h)  # (H, 1) signed distance on the torus
            ox = _wrap(xs - cx, w)  # (1, W)
            rows, cols = np.flatnonzero(np.abs(oy) <= reach), np.flatnonzero(np.abs(ox) <= reach)
            dist = _distance(s["shape"], oy[rows], ox[:, cols]) - level  # (h', w') < 0 inside
            alpha = np.clip(0.5 - dist / (SOFTNESS * side), 0.0, 1.0)[..., None]
            window = np.ix_(rows, cols)  # only the pixels the shape can touch: a third of the work at 256 px
            video[t][window] = video[t][window] * (1 - alpha) + colour * alpha
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def _extent(shape: dict) -> float:
    """The level of `_distance` at the shape's outline, fraction of the shorter side."""
    return shape["radius"] * (TRIANGLE_INRADIUS if shape["shape"] == "triangle" else 1.0)


def _distance(kind: str, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """(H, W) gauge whose level sets are the shape's outlines, from (H, 1) and (1, W) offsets to its centre."""
    if kind == "circle":
        return np.sqrt(oy**2 + ox**2)
    if kind == "square":
        return np.maximum(np.abs(oy), np.abs(ox))  # Chebyshev: an axis-aligned square
    # equilateral triangle, apex up (y grows downwards): the largest distance along its three outward edge normals
    # (0, 1), (-1/2, ±√3/2) in (y, x); its level a is the inradius, the apex sits 2a above the centre
    return np.maximum(oy, -0.5 * oy + 0.8660254 * np.abs(ox))


def _wrap(d: np.ndarray, n: float) -> np.ndarray:
    """Signed distance on a ring of length n, in [-n/2, n/2)."""
    return np.remainder(d + n / 2, n) - n / 2


def generate_clips(out_dir: str | Path, num_clips: int, *, frames: int = 25, fps: float = 24.0,
                   size: tuple[int, int] = (128, 128), seed: int = 0, workers: int = 1) -> Path:
    """Write `out_dir/clips/clip_%05d.mp4` and `out_dir/metadata.csv` (`video,prompt`); return the metadata path.

    `size` is (height, width), both even (yuv420p). Does nothing when the metadata already lists `num_clips`
    existing clips made with these parameters; resumes a killed run (clips that exist with the same parameters
    are kept: each is a pure function of the parameters and its index, not of `num_clips`). `workers` > 1 renders
    and encodes clips in that many processes (the files are the same: each clip is a pure function of its spec).
    """
    if num_clips < 1 or frames < 1 or fps <= 0:
        raise ValueError(f"generate_clips: need num_clips >= 1, frames >= 1, fps > 0; got {num_clips}, {frames}, {fps}")
    h, w = (int(v) for v in size)
    if h % 2 or w % 2 or h < 16 or w < 16:
        raise ValueError(f"generate_clips: size (height, width) must be even and >= 16 (yuv420p); got {size}")
    out_dir = Path(out_dir)
    clips_dir, metadata, gen_file = out_dir / "clips", out_dir / "metadata.csv", out_dir / "generator.json"
    params = {"format": FORMAT, "frames": frames, "fps": float(fps), "size": [h, w], "seed": seed}
    specs = [clip_spec(seed, i) for i in range(num_clips)]
    rows = [[f"clips/clip_{i:05d}.mp4", caption(spec)] for i, spec in enumerate(specs)]

    try:
        previous = json.loads(gen_file.read_text())
    except (OSError, ValueError):
        previous = {}
    same_params = {k: v for k, v in previous.items() if k != "num_clips"} == params
    if same_params and metadata.exists() and all((out_dir / name).exists() for name, _ in rows):
        with open(metadata, newline="") as f:
            if list(csv.reader(f))[1:] == rows:
                return metadata

    clips_dir.mkdir(parents=True, exist_ok=True)
    metadata.unlink(missing_ok=True)  # incomplete until rewritten below
    if not same_params:  # clips of other parameters must go before generator.json claims these
        for old in clips_dir.glob("clip_*.mp4"):
            old.unlink()
    write_text_atomic(gen_file, json.dumps({**params, "num_clips": num_clips}, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video", "prompt"])
    writer.writerows(rows)
    todo = [(spec, out_dir / name, frames, (h, w), fps) for spec, (name, _) in zip(specs, rows)
            if not (out_dir / name).exists()]
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_write_clip, todo, chunksize=8):
                pass
    else:
        for job in todo:
            _write_clip(job)
    write_text_atomic(metadata, buf.getvalue())
    return metadata


def _write_clip(job: tuple) -> None:
    spec, path, frames, size, fps = job
    write_mp4(path, render(spec, frames, size), fps)
