"""Read a synthetic-world video's captioned attributes back from its pixels, and score them against a prompt.

Why: in the synthetic world (`fpsa_train.data.synthetic_video`) a caption fixes every attribute it names, so a
generated video either shows "a red triangle moving left quickly on a dark blue background" or it does not, and
that can be checked without a learned judge. `analyze` measures, `score` compares with `parse_caption(prompt)`.

How `analyze` reads a (T, H, W, 3) uint8 video (numpy only; ~0.05 s for 33×256×256 on one core):
1. **Work size.** Frames are block-averaged by the largest factor that divides both sides and keeps the shorter
   side ≥ 64 px (256 → 64): faster, and the averaging already suppresses pixel noise.
2. **Background** = the per-frame median colour (shapes cover well under half a frame), named by the nearest of
   `BACKGROUNDS` when within `BACKGROUND_TOLERANCE`, else None.
3. **Ownership.** Each pixel's offset d from the background is *unmixed* against every palette colour c: the
   opacity α = d·(c−bg)/|c−bg|² (clipped to [0, 1]) and the residual |d − α(c−bg)|; the pixel belongs to the colour
   of the smallest residual. Unmixing (not nearest colour) keeps soft and blurred edges, which are mixtures of a
   shape's colour and the background, with their shape; a pixel with α < `MIN_ALPHA` belongs to none.
4. **Objects.** A shape whose colour lies between two palette entries (a colour shift) splits its pixels between
   them, so colours whose pixels sit at the same place (centres within `MERGE` × side in the median frame) are
   one shape, named by the colour holding more of it. A shape is kept when, in the median frame, it holds at
   least `MIN_AREA` of side² and at least `MIN_COMPACT` of it lies within a window of ±`WINDOW` × side around its
   centre (a shape is one blob; noise assigned to a colour is spread over the whole frame), and its centre stays
   within `JITTER` × side of a straight track in the median frame (a shape moves steadily; blobs of noise or
   flicker jump about).
5. **Position** per frame: the circular mean of the colour's α over each axis (the frame is a torus: shapes wrap
   around the borders), refined twice as the plain mean inside the window around it.
6. **Direction and speed**: the track is unwrapped across the torus (each step taken as the shorter way round),
   and the velocity is the median slope over all frame pairs at least a third of the clip apart (Theil–Sen), so a
   few frames where another shape covers this one move it little. Direction = the nearest of the 8 by angle;
   speed = quickly above `SPEED_THRESHOLD` side lengths per frame; below `STILL` neither is named (None).
7. **Shape** from the outline's symmetry, measured in the frames where the shape is whole (area ≥ 85% of its
   90th-percentile area): the 3- and 4-fold angular harmonics m_k = |Σ α r² e^{ikθ}| / Σ α r² around the
   centroid. A square has 4-fold corners (m4 ≈ 0.29, m3 ≈ 0), the apex-up triangle 3-fold (m3 ≈ 0.55, m4 ≈ 0), a
   circle neither (both < 0.02). Blur and soft edges lower them a little (0.26 and 0.51 at σ = 1.5% of the side)
   and create no other symmetry; size and colour do not enter. Circle when both are below `ROUND`, else the
   larger harmonic decides.

Speeds are per frame of the video given. `SPEED_THRESHOLD` sits at √(0.008·0.025·1.5): 1.44× from both "slowly"
and "quickly" when the clips were resampled from 24 to 16 fps (what the tiny default's preprocessing does, so a
model trained on them moves its shapes 1.5× farther per frame), and ≥ 1.44× from both at the generator's own rate.

Scoring (`score`): objects are matched by colour. `colour` is right when the video shows exactly the prompt's
colours (a missing or an extra object is wrong); `shape`, `direction` and `speed` are right when every object of
the prompt is found and has that attribute right (so with two objects both must be; an extra object does not
count against them, it already made `colour` wrong); `background` is compared directly.
"""

from __future__ import annotations

import math

import numpy as np

from fpsa_train.data.synthetic_video import BACKGROUNDS, DIRECTIONS, PALETTE, SPEEDS

ATTRIBUTES = ("colour", "shape", "direction", "speed", "background")

WORK_SIDE = 64  # the shorter side is averaged down to no less than this (px)
BACKGROUND_TOLERANCE = 50.0  # RGB distance to the nearest BACKGROUNDS entry (half the closest pair's distance ~21)
MIN_ALPHA = 0.2  # opacity below which a pixel belongs to no shape (noise and the faint tail of a blur)
MIN_AREA = 0.01  # of side², median over frames (the smallest shape covers 0.042 side²: a triangle of radius 0.12)
WINDOW = 0.3  # half-width of the window around a shape, fraction of the shorter side (a shape reaches 0.27)
MERGE = 0.1  # colours whose centres are closer than this (fraction of the side, median frame) are one shape
MIN_COMPACT = 0.6  # share of a colour's mass inside its window (uniform noise: (2 × WINDOW)² = 0.36)
JITTER = 0.03  # median distance of a shape's centre from a straight track, of the side (clips < 0.006, noise ~0.07)
SPEED_THRESHOLD = math.sqrt(SPEEDS["slowly"] * SPEEDS["quickly"] * 1.5)  # side lengths per frame (docstring)
STILL = 0.003  # below this speed a shape does not move (side lengths per frame; "slowly" is 0.008)
ROUND = 0.1  # harmonics below this are a circle (measured: circle < 0.02, square m4 0.26-0.29, triangle m3 0.51-0.55)

_PALETTE = np.asarray(list(PALETTE.values()), dtype=np.float32)  # (K, 3)
_BACKGROUNDS = np.asarray(list(BACKGROUNDS.values()), dtype=np.float32)  # (B, 3)
_DIRECTIONS = np.asarray(list(DIRECTIONS.values()), dtype=np.float32)  # (8, 2) unit (dy, dx)


def analyze(video: np.ndarray) -> dict:
    """{"background": str | None, "shapes": [{"colour", "shape", "direction", "speed"}, ...]} as seen in `video`,
    (T, H, W, 3) uint8 RGB: the structure `parse_caption` returns, shapes in palette order. Any value it cannot
    tell is None (a background far from every named one; the motion of a still shape or of a one-frame video); a
    video without shapes gives an empty list. Deterministic."""
    x = _work_frames(video)  # (T, h, w, 3) float32
    bg = np.median(x.reshape(x.shape[0], -1, 3), axis=1)  # (T, 3) per-frame dominant colour
    background = _nearest_background(np.median(bg, axis=0))
    alpha, owner = _unmix(x - bg[:, None, None, :], np.median(bg, axis=0))  # (T, h, w) each
    shapes = []
    for colour, opacity in _colour_groups(alpha, owner):
        found = _read_shape(opacity)
        if found is not None:
            shapes.append({"colour": colour, **found})
    return {"background": background, "shapes": sorted(shapes, key=lambda s: list(PALETTE).index(s["colour"]))}


def score(expected: dict, found: dict) -> dict[str, bool]:
    """Per attribute of ATTRIBUTES, whether `found` (analyze's) shows what `expected` (parse_caption's) asks; the
    rules are in the module docstring. Shapes are matched by colour (the world's shapes have distinct colours; a
    prompt naming a colour twice is scored as if it named it once)."""
    want = {s["colour"]: s for s in expected["shapes"]}
    got = {s["colour"]: s for s in found["shapes"]}
    result = {"colour": bool(want) and set(want) == set(got)}
    for attr in ("shape", "direction", "speed"):
        result[attr] = bool(want) and all(c in got and got[c][attr] == s[attr] for c, s in want.items())
    result["background"] = found["background"] is not None and found["background"] == expected["background"]
    return {attr: bool(result[attr]) for attr in ATTRIBUTES}


def _work_frames(video: np.ndarray) -> np.ndarray:
    """The frames as float32, block-averaged by the largest factor dividing both sides that keeps ≥ WORK_SIDE px."""
    if not isinstance(video, np.ndarray) or video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"analyze: expected a (T, H, W, 3) uint8 RGB array, got "
                         f"{getattr(video, 'shape', type(video))} {getattr(video, 'dtype', '')}; convert a float "
                         "video in [0, 1] with (v * 255).round().clip(0, 255).astype(np.uint8)")
    t, h, w, _ = video.shape
    if t < 1 or min(h, w) < 16:
        raise ValueError(f"analyze: video of {t} frames of {h}x{w} px is too small (need >= 1 frame, >= 16 px; "
                         f"attributes are reliable from 9 frames of 64x64)")
    g = math.gcd(h, w)
    f = max(d for d in range(1, max(1, min(h, w) // WORK_SIDE) + 1) if g % d == 0)
    if f == 1:
        return video.astype(np.float32)
    total = np.uint16 if f <= 16 else np.uint32  # exact integer block sums: f² · 255 < 2¹⁶ up to f = 16
    x = video.reshape(t, h // f, f, w, 3).sum(2, dtype=total)  # (T, h/f, W, 3)
    x = x.reshape(t, h // f, w // f, f, 3).sum(3, dtype=total)  # (T, h/f, w/f, 3)
    return x.astype(np.float32) / (f * f)


def _nearest_background(colour: np.ndarray) -> str | None:
    dist = np.linalg.norm(_BACKGROUNDS - colour, axis=1)  # (B,)
    return list(BACKGROUNDS)[int(dist.argmin())] if dist.min() <= BACKGROUND_TOLERANCE else None


def _unmix(d: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of the offsets d (T, h, w, 3) from the background: the opacity of, and the index of, the palette
    colour whose background→colour line passes closest (module docstring, step 3); owner -1 below MIN_ALPHA."""
    lines = _PALETTE - bg  # (K, 3)
    length2 = np.maximum((lines**2).sum(1), 1.0)  # (K,); a background of a palette colour has a zero line
    flat = d.reshape(-1, 3)  # (N, 3)
    alpha = np.zeros(len(flat), dtype=np.float32)
    owner = np.full(len(flat), -1, dtype=np.int64)
    # opacity along a line is at most |d| / |line|: pixels this close to the background belong to no colour
    near = np.flatnonzero((flat**2).sum(1) >= MIN_ALPHA**2 * length2.min())
    dot = flat[near] @ lines.T  # (n, K)
    a = np.clip(dot / length2, 0.0, 1.0)  # (n, K) opacity along each line
    residual = (flat[near] ** 2).sum(1)[:, None] - 2 * a * dot + a**2 * length2  # |d − a·line|²
    best = residual.argmin(1)  # (n,)
    alpha[near] = np.take_along_axis(a, best[:, None], 1)[:, 0]
    owner[near] = np.where(alpha[near] >= MIN_ALPHA, best, -1)
    return alpha.reshape(d.shape[:3]), owner.reshape(d.shape[:3])


def _colour_groups(alpha: np.ndarray, owner: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The opacity map (T, h, w) of each candidate shape, named by its main colour (module docstring, step 4)."""
    t, h, w = alpha.shape
    side, n = min(h, w), np.array([h, w], dtype=np.float64)
    candidates = []  # (median mass, colour, opacity, rough centre (T, 2))
    for k, colour in enumerate(PALETTE):
        a = np.where(owner == k, alpha, 0.0)
        mass = float(np.median(a.sum((1, 2))))
        if mass >= 0.25 * MIN_AREA * side**2:
            centre = np.stack([_circular_mean(a.sum(2), h), _circular_mean(a.sum(1), w)], 1)
            candidates.append((mass, colour, a, centre))
    groups: list[list] = []  # [colour, summed opacity, centre of the largest part]
    for _, colour, a, centre in sorted(candidates, key=lambda c: -c[0]):  # stable: ties keep palette order
        for group in groups:
            gap = np.remainder(centre - group[2] + n / 2, n) - n / 2  # (T, 2) on the torus
            if np.median(np.linalg.norm(gap, axis=1)) < MERGE * side:
                group[1] = group[1] + a
                break
        else:
            groups.append([colour, a, centre])
    return [(colour, a) for colour, a, _ in groups]


def _read_shape(alpha: np.ndarray) -> dict | None:
    """shape, direction and speed of the one blob in alpha (T, h, w), or None when it holds no shape."""
    t, h, w = alpha.shape
    side = min(h, w)
    mass = alpha.sum((1, 2))  # (T,)
    if np.median(mass) < MIN_AREA * side**2:
        return None
    centre = np.stack([_circular_mean(alpha.sum(2), h), _circular_mean(alpha.sum(1), w)], 1)  # (T, 2) (y, x)
    for _ in range(2):
        patch, offsets = _window(alpha, centre, int(math.ceil(WINDOW * side)))
        inside = patch.sum((1, 2))  # (T,)
        shift = np.stack([(patch * offsets[0]).sum((1, 2)), (patch * offsets[1]).sum((1, 2))], 1)
        centre = centre + shift / np.maximum(inside, 1e-6)[:, None]
    if np.median(inside / np.maximum(mass, 1e-6)) < MIN_COMPACT:
        return None
    patch, (dy, dx) = _window(alpha, centre, int(math.ceil(WINDOW * side)))
    whole = inside >= 0.85 * np.quantile(inside, 0.9)  # (T,) frames where no other shape covers part of this one
    if whole.sum() < max(2, t // 3):  # covered most of the clip: do with the frames where most of it shows
        whole = inside >= 0.5 * np.median(inside)
    velocity = _velocity(centre[whole], np.flatnonzero(whole), (h, w))
    if velocity is not None and _jitter(centre[whole], np.flatnonzero(whole), velocity, (h, w)) > JITTER * side:
        return None  # colour that jumps about from frame to frame (noise, flicker) is no moving shape
    return {"shape": _shape(patch[whole], dy[whole], dx[whole]),
            **_motion(None if velocity is None else velocity / side)}


def _circular_mean(weights: np.ndarray, n: int) -> np.ndarray:
    """(T,) position of the weight on a ring of n pixels (pixel i centred at i + 0.5), from weights (T, n)."""
    angle = 2 * np.pi * (np.arange(n) + 0.5) / n
    return np.arctan2(weights @ np.sin(angle), weights @ np.cos(angle)) * n / (2 * np.pi) % n


def _window(alpha: np.ndarray, centre: np.ndarray, r: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The (T, 2r+1, 2r+1) torus patch of alpha around each frame's centre, and the (y, x) offsets of its pixel
    centres from that centre (each (T, 2r+1, 1) / (T, 1, 2r+1)); r is capped so the patch never wraps onto itself."""
    t, h, w = alpha.shape
    r = min(r, (min(h, w) - 1) // 2)
    steps = np.arange(-r, r + 1)
    base = np.floor(centre).astype(np.int64)  # (T, 2) pixel holding the centre
    rows = (base[:, :1] + steps) % h  # (T, P)
    cols = (base[:, 1:] + steps) % w  # (T, P)
    patch = alpha[np.arange(t)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (T, P, P)
    oy = (base[:, :1] + steps + 0.5 - centre[:, :1])[:, :, None]  # (T, P, 1)
    ox = (base[:, 1:] + steps + 0.5 - centre[:, 1:])[:, None, :]  # (T, 1, P)
    return patch, (oy, ox)


def _velocity(centre: np.ndarray, frames: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """(dy, dx) px per frame: Theil–Sen slope of the unwrapped track (V, 2) seen at frames (V,); None under 2."""
    if len(frames) < 2:
        return None
    n = np.asarray(size, dtype=np.float64)
    steps = np.remainder(np.diff(centre, axis=0) + n / 2, n) - n / 2  # shorter way round the torus
    track = np.concatenate([centre[:1], centre[:1] + np.cumsum(steps, 0)])  # (V, 2)
    i, j = np.triu_indices(len(frames), k=1)
    gap = frames[j] - frames[i]
    far = gap >= max(1, (frames[-1] - frames[0]) // 3)
    slopes = (track[j[far]] - track[i[far]]) / gap[far, None]  # (pairs, 2)
    return np.median(slopes, axis=0)


def _jitter(centre: np.ndarray, frames: np.ndarray, velocity: np.ndarray, size: tuple[int, int]) -> float:
    """Median distance (px) of the centres (V, 2) seen at frames (V,) from the straight track of `velocity`."""
    n = np.asarray(size, dtype=np.float64)
    line = centre[0] + (frames - frames[0])[:, None] * velocity  # (V, 2) where a steady shape would be
    offset = np.remainder(centre - line + n / 2, n) - n / 2  # (V, 2) on the torus
    offset -= np.median(offset, axis=0)  # the line through the median position, not through the first frame
    return float(np.median(np.linalg.norm(offset, axis=1)))


def _motion(velocity: np.ndarray | None) -> dict:
    """direction and speed of a velocity in side lengths per frame (None when too slow to tell)."""
    if velocity is None or np.linalg.norm(velocity) < STILL:
        return {"direction": None, "speed": None}
    direction = list(DIRECTIONS)[int((_DIRECTIONS @ velocity).argmax())]
    return {"direction": direction, "speed": "quickly" if np.linalg.norm(velocity) > SPEED_THRESHOLD else "slowly"}


def _shape(a: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> str:
    """circle, square or triangle from the 3- and 4-fold harmonics of the outline (module docstring, step 7), from
    opacity patches a (F, P, P) and their pixels' offsets dy (F, P, 1), dx (F, 1, P) from the centre."""
    z = dx + 1j * dy  # (F, P, P) offsets as complex numbers
    r2 = np.abs(z) ** 2
    norm = np.maximum((a * r2).sum((1, 2)), 1e-9)  # (F,)
    unit = z / np.sqrt(np.maximum(r2, 1e-12))
    m3 = float(np.median(np.abs((a * r2 * unit**3).sum((1, 2))) / norm))
    m4 = float(np.median(np.abs((a * r2 * unit**4).sum((1, 2))) / norm))
    if max(m3, m4) < ROUND:
        return "circle"
    return "triangle" if m3 > m4 else "square"
