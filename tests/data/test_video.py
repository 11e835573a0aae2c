"""Frame sampling, bucketing and decoding of real (tiny) mp4s, and the BadVideo reason of every kind of bad input.

Each test video is a solid grey whose level encodes the source frame number (level = STEP · index), so the decoded
clip tells which source frames were picked; h264 is lossy, so levels are read back by rounding.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from fpsa_train.data.video import (
    BadVideo,
    VideoSpec,
    choose_bucket,
    frame_indices,
    load_clip,
    make_buckets,
    resize_center_crop,
)

STEP = 6  # grey level per source frame: 40 frames span levels 0..234


def write_mp4(path: Path, width: int, height: int, fps: int, num_frames: int, faststart: bool = False) -> Path:
    container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(num_frames):
        image = np.full((height, width, 3), STEP * i % 256, np.uint8)
        image[:, : width // 8] = 255 - STEP * i % 256  # an inverse bar at the left: detail for the codec to keep
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_y4m(path: Path, width: int, height: int, fps: int, num_frames: int) -> Path:
    """Raw y4m: a text header line, then pixels; a luma of 100 is the printable byte 'd', so the file's head reads as
    text, and only its magic tells it is a video."""
    container = av.open(str(path), "w")
    stream = container.add_stream("rawvideo", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for _ in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((height, width, 3), 100, np.uint8),
                                                               format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    v = {
        "land24": write_mp4(root / "land24.mp4", 64, 48, fps=24, num_frames=40),
        "port10": write_mp4(root / "port10.mp4", 64, 96, fps=10, num_frames=30),  # decord 0.6 misreads widths 16-72 px,
        "fast": write_mp4(root / "fast.mp4", 64, 48, fps=24, num_frames=40, faststart=True),
    }
    land = v["land24"].read_bytes()  # index (moov) at the end
    v["half"] = root / "half.mp4"
    v["half"].write_bytes(land[: len(land) // 2])
    fast = v["fast"].read_bytes()  # index at the front
    v["fast_half"] = root / "fast_half.mp4"
    v["fast_half"].write_bytes(fast[: len(fast) // 2])
    media = fast.index(b"mdat") + 4
    keep = media + (len(fast) - media) // 2  # garbage over the second half of the media data
    v["garbage"] = root / "garbage.mp4"
    v["garbage"].write_bytes(fast[:keep] + random.Random(0).randbytes(len(fast) - keep))
    v["text"] = root / "text.mp4"
    v["text"].write_text("this is a caption file, renamed\n")
    # Text that ffmpeg's tty demuxer renders as video (by suffix): before, "too_short" (a few frames), or "corrupt"
    v["text_txt"] = root / "captions.txt"
    v["text_txt"].write_text("a red circle moving left\n" * 20)
    v["ansi_art"] = root / "art.ans"
    v["ansi_art"].write_text("\x1b[31mred\x1b[0m ünïcode\n" * 20)
    v["long_text"] = root / "long.txt"
    v["long_text"].write_text("a red circle moving left\n" * 2000)
    v["y4m"] = write_y4m(root / "grey.y4m", 64, 48, fps=16, num_frames=30)  # text header, printable pixels
    v["empty"] = root / "empty.mp4"
    v["empty"].write_bytes(b"")
    return v


def source_frames(clip: torch.Tensor) -> list[int]:
    """Source frame numbers read back from a clip's grey levels (right of the bar)."""
    _, _, _, w = clip.shape
    level = ((clip[:, :, :, w // 4 :] + 1) * 127.5).mean(dim=(0, 2, 3))  # (T,)
    return [round(x / STEP) for x in level.tolist()]


# -- frame_indices --------------------------------------------------------------------------------------------


def test_head_equal_fps():
    assert frame_indices(100, 16.0, VideoSpec(num_frames=9)) == list(range(9))


def test_head_24_to_16_fps():
    # clip frame i at i/16 s → source round(1.5 i), halves rounding up
    assert frame_indices(40, 24.0, VideoSpec(num_frames=9)) == [0, 2, 3, 5, 6, 8, 9, 11, 12]


def test_head_10_to_16_fps_duplicates():
    assert frame_indices(30, 10.0, VideoSpec(num_frames=9)) == [0, 1, 1, 2, 3, 3, 4, 4, 5]


def test_uniform_starts_in_the_middle():
    # 16 fps, 9 frames span 8 source frames; starts 0..91 are feasible → 45
    assert frame_indices(100, 16.0, VideoSpec(num_frames=9, start="uniform")) == list(range(45, 54))
    assert frame_indices(9, 16.0, VideoSpec(num_frames=9, start="uniform")) == list(range(9))


def test_random_is_seeded_reproducible_and_in_range():
    spec = VideoSpec(num_frames=17, start="random")
    draws = [frame_indices(200, 24.0, spec, random.Random(seed)) for seed in range(20)]
    assert draws == [frame_indices(200, 24.0, spec, random.Random(seed)) for seed in range(20)]
    assert len({d[0] for d in draws}) > 5  # starts vary
    for d in draws:
        assert 0 <= d[0] and d[-1] <= 199
        assert [i - d[0] for i in d] == frame_indices(200, 24.0, VideoSpec(num_frames=17))  # same spacing as head


def test_exactly_long_enough_and_too_short():
    assert frame_indices(25, 24.0, VideoSpec(num_frames=17))[-1] == 24  # 1 s at 24 fps needs 25 frames
    with pytest.raises(BadVideo) as e:
        frame_indices(24, 24.0, VideoSpec(num_frames=17))
    assert e.value.reason == "too_short"
    assert "17 frames" in e.value.detail and "25 source frames" in e.value.detail and "24 frames" in e.value.detail


def test_spec_checks():
    with pytest.raises(ValueError, match="num_frames"):
        VideoSpec(num_frames=80)
    with pytest.raises(ValueError, match="start"):
        VideoSpec(start="middle")
    with pytest.raises(ValueError, match="multiples of 16"):
        VideoSpec(buckets=((480, 830),))


# -- bucketing and resizing -----------------------------------------------------------------------------------


def test_choose_bucket():
    buckets = VideoSpec().buckets
    assert choose_bucket(720, 1280, buckets) == (480, 832)
    assert choose_bucket(1920, 1080, buckets) == (832, 480)
    assert choose_bucket(1000, 1100, buckets) == (512, 512)
    assert choose_bucket(48, 64, make_buckets(128 * 128)) == (112, 144)  # 4:3


def test_make_buckets():
    buckets = make_buckets(480 * 832)
    assert len(buckets) == 5
    for (h, w), ratio in zip(buckets, (16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16)):
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w / (480 * 832) - 1) < 0.05
        assert abs(math.log(w / h / ratio)) < 0.05
    assert make_buckets(64 * 64, ratios=(1.0, 1.0), multiple=32) == ((64, 64),)


def test_resize_center_crop_shapes_and_crop():
    frames = torch.zeros(2, 40, 100, 3, dtype=torch.uint8)
    frames[:, :, 40:60] = 200  # a centred vertical band
    out = resize_center_crop(frames, (32, 32))  # covers by height: 40×100 → 32×80, crop 24 columns each side
    assert out.shape == (2, 32, 32, 3) and out.dtype == torch.float32
    assert out[:, :, 10:22].min() > 190 and out[:, :, :4].max() < 10  # band at the centre, 16 px wide
    assert resize_center_crop(frames.float() / 2, (80, 16)).shape == (2, 80, 16, 3)  # float in, upscale


# -- load_clip on real mp4s ------------------------------------------------------------------------------------


def test_load_clip_24_to_16_fps_picks_the_right_frames(videos):
    spec = VideoSpec(num_frames=17, buckets=((48, 64), (64, 48)))  # the source size: no resampling in space
    clip = load_clip(videos["land24"], spec)
    assert clip.shape == (3, 17, 48, 64) and clip.dtype == torch.float32
    expected = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24]  # round(1.5 i), halves up
    assert source_frames(clip) == frame_indices(40, 24.0, spec) == expected


def test_load_clip_10_to_16_fps_duplicates(videos):
    spec = VideoSpec(num_frames=17, start="uniform", buckets=((48, 64), (96, 64)))
    clip = load_clip(videos["port10"], spec)
    assert clip.shape == (3, 17, 96, 64)  # portrait source, portrait bucket
    assert source_frames(clip) == frame_indices(30, 10.0, spec)
    assert torch.equal(clip[:, 1], clip[:, 2])  # the same source frame, decoded once


def test_load_clip_buckets_and_range(videos):
    spec = VideoSpec(num_frames=5, buckets=((96, 160), (160, 96), (128, 128)))
    clip = load_clip(videos["land24"], spec)
    assert clip.shape == (3, 5, 96, 160)  # 4:3 landscape → the landscape bucket, scaled ×2.5 and cropped
    assert clip.min() >= -1 and clip.max() <= 1
    assert clip[:, 0].min() < -0.95 and clip[:, 0].max() > 0.95  # frame 0: black background, white bar
    assert source_frames(clip) == [0, 2, 3, 5, 6]  # solid levels survive the resize
    assert load_clip(videos["port10"], spec).shape == (3, 5, 160, 96)  # portrait → portrait


def test_load_clip_random_start_is_seeded(videos):
    spec = VideoSpec(num_frames=5, start="random", buckets=((48, 64),))
    clips = [load_clip(videos["land24"], spec, seed=s) for s in (3, 3, 4)]
    assert torch.equal(clips[0], clips[1])
    assert source_frames(clips[0]) == frame_indices(40, 24.0, spec, random.Random(3))
    assert source_frames(clips[2]) == frame_indices(40, 24.0, spec, random.Random(4))


# -- bad inputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing", "missing"),
        ("empty", "empty_file"),
        ("text", "not_video"),
        ("text_txt", "not_video"),
        ("ansi_art", "not_video"),
        ("long_text", "not_video"),
        ("half", "corrupt"),  # moov (the index) at the end is cut away: decord fails to open
        ("fast_half", "corrupt"),  # moov at the front, media cut: decord fails to open while indexing packets
        # moov intact, media half garbage: opens; get_batch raises on frames past the damage (every time), and at
        # times on frames before it too, as decord's decoder thread reads ahead into the garbage
        ("garbage", "corrupt"),
    ],
)
def test_bad_inputs(videos, tmp_path, name, reason):
    path = videos.get(name, tmp_path / "nope.mp4")
    with pytest.raises(BadVideo) as e:
        load_clip(path, VideoSpec(num_frames=25, buckets=((48, 64),)))  # needs source frames 0..36 of 40
    assert e.value.reason == reason
    assert str(path) in e.value.detail


def test_text_is_named_as_such_and_y4m_is_still_a_video(videos):
    with pytest.raises(BadVideo, match=r"captions\.txt: a text file, not a video \(starts with b'a red circle"):
        load_clip(videos["text_txt"], VideoSpec(num_frames=25, buckets=((48, 64),)))
    clip = load_clip(videos["y4m"], VideoSpec(num_frames=25, buckets=((48, 64),)))
    assert clip.shape == (3, 25, 48, 64)


def test_too_short_and_directory(videos, tmp_path):
    with pytest.raises(BadVideo) as e:
        load_clip(videos["land24"], VideoSpec(num_frames=81))  # 5 s at 16 fps; the video has 40 frames = 1.67 s
    assert e.value.reason == "too_short"
    with pytest.raises(BadVideo) as e:
        load_clip(tmp_path, VideoSpec())
    assert e.value.reason == "missing"


def test_bad_video_pickles_and_checks_its_reason():
    err = pickle.loads(pickle.dumps(BadVideo("corrupt", "x.mp4: broken")))
    assert (err.reason, err.detail) == ("corrupt", "x.mp4: broken")
    with pytest.raises(ValueError, match="not one of"):
        BadVideo("weird", "")
