"""Decode one training clip from a video file: 4n+1 frames at 16 fps, bucketed, RGB in [-1, 1], shape (C, T, H, W).

Why this shape: the Wan VAE encodes the first frame alone and then chunks of 4 frames, so a clip must have 4n+1
frames (81 → 21 latent frames), and Wan was trained at 16 fps, so sources are resampled to it (reference/wan.md §5).

How popular trainers choose the frames, and what we keep from each:
- DiffSynth takes the first `num_frames` frames without resampling; musubi resamples `source_fps` to 16 fps and
  offers head/uniform/slide starts; diffusion-pipe takes the beginning or the middle; VideoX-Fun starts at random.
  We resample by time like musubi (frame i sits at t0 + i/fps, nearest source frame, duplicates when the source is
  slower than 16 fps), and start at the head, the middle, or a seeded random point: `VideoSpec.start`.
- A source shorter than the clip is skipped ("too_short"), never padded or sped up: both would teach wrong motion.
- Buckets instead of one fixed size (musubi, VideoX-Fun): each video goes to the bucket whose aspect ratio is
  closest in log space, is scaled to cover it (antialiased bilinear) and centre-cropped, so little is cut away.
  Sides are multiples of 16: the VAE downsamples by 8 and the DiT patchifies 2×2.

Decoding uses decord, as VideoX-Fun does: it indexes all packets when it opens a file, then decodes only the
frames asked for. Failures are mapped to a `BadVideo` reason so a preprocessing run can skip and count them.
What decord does with damaged files: a truncated mp4 whose index (moov) sits at the end fails to open ("moov atom
not found"); one whose moov sits at the front (faststart) mostly fails at open too, while indexing packets
("partial file"), and if only the last packet is cut it opens and fails when that frame is decoded; garbage in the
middle of the media data opens fine and get_batch raises DECORDError for frames past the damage (and now and
then for frames before it: decord's decoder thread reads ahead).
A text file is "not_video" even when ffmpeg opens it: its `tty` demuxer renders .txt/.ans/.nfo files as video
(25 fps, a few frames per screenful of text), which would come out "too_short", "corrupt", or as a clip of
rendered text. No video container but y4m (which has magic bytes) starts with a head of printable text, so the
head is checked before decoding.
decord 0.6 also misreads some tiny widths (16, 24, 48, 72 px: its frame buffer comes out with 4 "channels" and
get_batch fails); those report "corrupt". Real sources (hundreds of pixels wide) are unaffected.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REASONS = ("missing", "empty_file", "not_video", "corrupt", "too_short")
STARTS = ("head", "uniform", "random")


class BadVideo(Exception):
    """A video that cannot give a clip; `reason` is one of REASONS, `detail` is for humans."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"BadVideo reason {reason!r} is not one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable with its two arguments, so it crosses process pools intact
        return (BadVideo, (self.reason, self.detail))


@dataclass(frozen=True)
class VideoSpec:
    """What clip to cut from each video."""

    num_frames: int = 81
    """Frames per clip; must be 4n+1 (the VAE's causal chunking)."""
    fps: float = 16.0
    """Target frame rate; source frames are resampled to it by time."""
    start: str = "head"
    """Where the clip starts: "head" (t=0), "uniform" (middle of the feasible starts), "random" (seeded)."""
    buckets: tuple[tuple[int, int], ...] = ((480, 832), (832, 480), (512, 512))
    """Candidate (height, width) sizes, multiples of 16; each video uses the one closest in aspect ratio."""

    def __post_init__(self):
        if self.num_frames < 1 or self.num_frames % 4 != 1:
            raise ValueError(f"VideoSpec.num_frames must be 4n+1 (1, 5, ..., 81), got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"VideoSpec.fps must be > 0, got {self.fps}")
        if self.start not in STARTS:
            raise ValueError(f"VideoSpec.start must be one of {STARTS}, got {self.start!r}")
        if not self.buckets:
            raise ValueError("VideoSpec.buckets must hold at least one (height, width)")
        for h, w in self.buckets:
            if h <= 0 or w <= 0 or h % 16 or w % 16:
                raise ValueError(f"VideoSpec.buckets: (height, width) must be positive multiples of 16, got {(h, w)}")


def frame_indices(num_source: int, source_fps: float, spec: VideoSpec, rng: random.Random | None = None) -> list[int]:
    """Source frame index of each of the clip's `spec.num_frames` frames.

    Frame i sits at time t0 + i/fps and takes the nearest source frame, round((t0 + i/fps)·source_fps). Starts are
    taken on the source's frame grid (t0 = k/source_fps), so at equal rates the clip is k, k+1, ... exactly.
    `rng` is used for start="random" only (default: random.Random(0)).
    """
    step = source_fps / spec.fps  # source frames per clip frame
    offsets = [math.floor(i * step + 0.5) for i in range(spec.num_frames)]  # source frames after the start frame
    last_k = (num_source - 1) - offsets[-1]  # latest start frame that keeps the last index in range
    if last_k < 0:
        span = (spec.num_frames - 1) / spec.fps  # seconds from the first to the last frame's time
        raise BadVideo(
            "too_short",
            f"clip needs {spec.num_frames} frames at {spec.fps:g} fps = {span:.2f} s, i.e. {offsets[-1] + 1} source "
            f"frames at {source_fps:g} fps; the video has {num_source} frames = {num_source / source_fps:.2f} s",
        )
    if spec.start == "head":
        k = 0
    elif spec.start == "uniform":
        k = last_k // 2
    else:
        k = (rng or random.Random(0)).randint(0, last_k)
    return [k + o for o in offsets]


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio w/h is closest to the source's in log space (first on ties)."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - log_ratio))


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale (T, H, W, C) frames to cover `size` = (H', W') with antialiased bilinear, centre-crop; returns float.

    uint8 input is resized in uint8 (torch's fast channels-last path, a quarter of the memory of float32 at
    1080p × 81 frames); its rounding to integers is below the 8-bit source's own precision.
    """
    t, h, w, _ = frames.shape
    th, tw = size
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))  # covers the target; one side fits it exactly
    x = frames.permute(0, 3, 1, 2)  # (T, C, H, W); a channels-last view, no copy
    if x.dtype != torch.uint8:
        x = x.float()
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)  # (T, C, rh, rw)
    top, left = (rh - th) // 2, (rw - tw) // 2
    x = x[:, :, top : top + th, left : left + tw]  # (T, C, H', W')
    return x.permute(0, 2, 3, 1).float()  # (T, H', W', C)


def load_clip(path: str | Path, spec: VideoSpec, seed: int = 0) -> torch.Tensor:
    """Decode the clip `spec` asks for: float32 (C, T, H, W) in [-1, 1], (H, W) the bucket of the source's aspect.

    Raises BadVideo with reason missing / empty_file / not_video / corrupt / too_short. `seed` drives
    start="random" only.
    """
    from decord import DECORDError, VideoReader, cpu  # lazy: the synthetic-data path does not need decord

    path = Path(path)
    if not path.is_file():
        raise BadVideo("missing", f"no such file: {path}" if not path.exists() else f"not a file: {path}")
    if path.stat().st_size == 0:
        raise BadVideo("empty_file", f"0 bytes: {path}")
    if _sniff_container(path) is None and _looks_like_text(_head(path, _TEXT_PROBE)):
        raise BadVideo("not_video", f"{path}: a text file, not a video (starts with {_head(path)!r})")
    try:
        reader = VideoReader(str(path), ctx=cpu(0))
    except (RuntimeError, DECORDError) as e:
        kind = _sniff_container(path)
        if kind is None:
            raise BadVideo("not_video", f"{path}: not a known media container (starts with {_head(path)!r})") from None
        raise BadVideo("corrupt", f"{path}: {kind} container that decord cannot open: {_last_line(e)}") from None
    fps = reader.get_avg_fps()
    if not (math.isfinite(fps) and fps > 0):
        raise BadVideo("corrupt", f"{path}: unreadable frame rate {fps}")
    indices = frame_indices(len(reader), fps, spec, random.Random(seed))
    unique, inverse = np.unique(indices, return_inverse=True)  # decode each source frame once
    try:
        batch = reader.get_batch(unique.tolist())
    except (RuntimeError, DECORDError) as e:
        detail = f"{path}: decoding frames {unique[0]}..{unique[-1]} failed: {_last_line(e)}"
        raise BadVideo("corrupt", detail) from None
    # Default bridge returns a decord NDArray; a torch bridge set elsewhere returns a tensor already.
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # (U, H, W, C) uint8
    frames = torch.from_numpy(frames)[torch.from_numpy(inverse.reshape(-1))]  # (T, H, W, C)
    _, h, w, _ = frames.shape
    clip = resize_center_crop(frames, choose_bucket(h, w, spec.buckets))  # (T, H', W', C) float in [0, 255]
    clip = (clip / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return clip.permute(3, 0, 1, 2).contiguous()  # (C, T, H', W')


def make_buckets(
    area: int, ratios=(16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16), multiple: int = 16
) -> tuple[tuple[int, int], ...]:
    """Area-preserving (height, width) buckets, one per aspect ratio w/h, sides rounded to `multiple` (as musubi).

    E.g. make_buckets(480 * 832) → ((480, 848), (544, 736), (624, 624), (736, 544), (848, 480)).
    """
    if area <= 0 or multiple <= 0:
        raise ValueError(f"make_buckets needs area > 0 and multiple > 0, got area={area}, multiple={multiple}")
    buckets = []
    for ratio in ratios:
        h = math.sqrt(area / ratio)
        size = (max(multiple, round(h / multiple) * multiple), max(multiple, round(h * ratio / multiple) * multiple))
        if size not in buckets:
            buckets.append(size)
    return tuple(buckets)


# Magic bytes of containers ffmpeg reads: a file without any of them was never a video ("not_video"); a file with
# one that decord still cannot open is a damaged video ("corrupt").
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")  # mp4 / mov / 3gp box types
_MAGIC = (
    (b"\x1a\x45\xdf\xa3", "matroska/webm"),
    (b"RIFF", "riff/avi"),
    (b"FLV", "flv"),
    (b"OggS", "ogg"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf/wmv"),
    (b"\x00\x00\x01\xba", "mpeg-ps"),
    (b"GIF8", "gif"),
    (b"YUV4MPEG2", "y4m"),  # a text header line, then raw pixels (which may well be printable bytes)
)


_TEXT_PROBE = 512  # bytes read to tell text from media; every container's header has binary bytes well before
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")  # whitespace, and ESC of ANSI art (.ans, which ffmpeg renders)


def _looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes are text: valid UTF-8 (a character cut at the end allowed) with no control
    bytes but whitespace and ESC. Media headers hold binary sizes and flags (zero bytes) from their first bytes;
    y4m, whose header line is text, is recognised by its magic first (`_sniff_container`)."""
    if any(b < 0x20 and b not in _TEXT_CONTROLS for b in head) or b"\x7f" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"  # a multibyte character cut off
    return True


def _sniff_container(path: Path) -> str | None:
    head = _head(path, 376)
    if head[4:8] in _ISO_BOXES:
        return "mp4/mov"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:  # MPEG-TS: 188-byte packets with sync byte 'G'
        return "mpeg-ts"
    return None


def _head(path: Path, n: int = 16) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _last_line(e: Exception) -> str:
    """decord's messages carry C++ source positions and stack traces; keep the last meaningful line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("Stack")]
    return (lines[-1] if lines else type(e).__name__)[:300]
