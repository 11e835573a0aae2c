"""The analyzer reads back what the synthetic world's captions state, from rendered clips, from their mp4s and from
clips degraded as a model + small VAE would; it scores noise and prompt-ignoring videos near chance; it never crashes
on degenerate input and runs in well under 0.2 s per 33×256×256 clip.

Measured accuracy is printed per case: `pytest -s tests/eval/test_analyzer.py` (add `-m slow` for the
256×256×33 clips, ~50 s on 2 busy cores; `make test` runs the 128×128×17 ones)."""

from __future__ import annotations

import math
import time

import decord
import numpy as np
import pytest

from fpsa_train.data.synthetic_video import (
    BACKGROUNDS, PALETTE, caption, clip_spec, heldout_prompts, parse_caption, render, write_mp4,
)
from fpsa_train.eval.analyzer import ATTRIBUTES, analyze, score

N_CLIPS = 100
SIZES = {"128x128x17": (17, (128, 128)), "256x256x33": (33, (256, 256))}
SEED = 77  # clip_spec seed of the clips analysed here
FLOOR = 0.95  # required accuracy per attribute on the generator's own clips


def degrade(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a diffusion model + small VAE might do to a clip, at about the tiny VAE's reconstruction PSNR (~23 dB):
    Gaussian blur (σ = 3% of the shorter side: 3.8 px at 128, 7.7 px at 256; circular, as the world is a torus), a
    temporal blur [1/4, 1/2, 1/4], a colour shift (per channel, gain U(0.85, 1.15) and offset U(−12, 12) grey
    levels) and pixel noise (uniform integers in [−20, 20]: σ 11.8 grey levels), rounded to uint8."""
    t, h, w, _ = video.shape
    sigma = 0.03 * min(h, w)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2)).astype(np.float32)  # (H, W/2+1) Gaussian's spectrum
    x = np.ascontiguousarray(video.transpose(0, 3, 1, 2), dtype=np.float32)  # (T, 3, H, W)
    x = np.fft.irfft2(np.fft.rfft2(x) * gain, s=(h, w)).transpose(0, 2, 3, 1)  # (T, H, W, 3); FFT: no BLAS threads
    x = np.concatenate([x[:1], x, x[-1:]])  # temporal blur with replicated ends
    x = 0.25 * x[:-2] + 0.5 * x[1:-1] + 0.25 * x[2:]
    x = x * rng.uniform(0.85, 1.15, 3).astype(np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    x += rng.integers(-20, 21, x.shape, dtype=np.int8)  # a fifth of the time of Gaussian noise at 256 px
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _decode(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()  # (T, H, W, 3) uint8


def _psnr(reference: np.ndarray, video: np.ndarray) -> float:
    mse = float(((reference.astype(np.float32) - video) ** 2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-9))


def _accuracy(expected: list[dict], found: list[dict]) -> dict[str, float]:
    scores = [score(e, f) for e, f in zip(expected, found)]
    return {a: float(np.mean([s[a] for s in scores])) for a in ATTRIBUTES}


def _row(name: str, acc: dict[str, float]) -> str:
    return f"{name:<32}" + " ".join(f"{a} {acc[a]:.3f}" for a in ATTRIBUTES)


def _chance(n_pairs: int = 20000) -> dict[str, float]:
    """Accuracy of a model that ignores its prompt, as a perfect analyzer scores it: the attributes of one
    generator clip scored against another clip's prompt, over many pairs."""
    scenes = [parse_caption(caption(clip_spec(5, i))) for i in range(n_pairs + 1)]
    return _accuracy(scenes[1:], scenes[:-1])


@pytest.fixture(scope="module")
def chance() -> dict[str, float]:
    return _chance()


@pytest.fixture(scope="module", params=["128x128x17", pytest.param("256x256x33", marks=pytest.mark.slow)])
def analysed(request, tmp_path_factory):
    """Per size: the prompts of N_CLIPS generator clips and what analyze finds in each as rendered, after an mp4
    round trip (write_mp4, decord), and after `degrade` on the decoded mp4 (what an evaluation of a model sees)."""
    frames, size = SIZES[request.param]
    folder = tmp_path_factory.mktemp(f"analyzer_{request.param}")
    rng = np.random.default_rng(0)
    expected, found, psnr = [], {"rendered": [], "mp4": [], "degraded": []}, {"mp4": [], "degraded": []}
    for i in range(N_CLIPS):
        spec = clip_spec(SEED, i)
        expected.append(parse_caption(caption(spec)))
        video = render(spec, frames, size)
        write_mp4(folder / "clip.mp4", video, 16.0)
        decoded = _decode(folder / "clip.mp4")
        for name, v in (("rendered", video), ("mp4", decoded), ("degraded", degrade(decoded, rng))):
            found[name].append(analyze(v))
            if name in psnr:
                psnr[name].append(_psnr(video, v))
    return request.param, expected, found, {k: float(np.mean(v)) for k, v in psnr.items()}


@pytest.mark.parametrize("condition", ["rendered", "mp4", "degraded"])
def test_reads_the_generators_clips(analysed, condition):
    size, expected, found, psnr = analysed
    acc = _accuracy(expected, found[condition])
    print("\n" + _row(f"{size} {condition}", acc) + (f" (PSNR {psnr[condition]:.1f} dB)" if condition in psnr else ""))
    assert min(acc.values()) >= FLOOR, _row(f"{size} {condition}", acc)


def test_a_prompt_ignoring_model_scores_near_chance(analysed, chance):
    """Clip i scored against the prompts of clips i+1 .. i+5: near what a perfect analyzer gives such a model."""
    size, expected, found, _ = analysed
    shifted = [expected[(i + k) % N_CLIPS] for k in range(1, 6) for i in range(N_CLIPS)]
    acc = _accuracy(shifted, found["mp4"] * 5)
    print("\n" + _row(f"{size} other prompts", acc) + "\n" + _row("chance (20000 spec pairs)", chance))
    for a in ATTRIBUTES:
        assert 0.5 * chance[a] - 0.02 <= acc[a] <= 2 * chance[a] + 0.02, (a, acc[a], chance[a])


def test_noise_scores_at_most_chance(chance):
    """Uniform noise, and random colour blobs (16×16 px blocks of random colour, softened by `degrade`), follow no
    prompt."""
    rng = np.random.default_rng(1)
    prompts = [parse_caption(caption(clip_spec(SEED, i))) for i in range(40)]
    videos = []
    for i in range(20):
        videos.append(rng.integers(0, 256, (17, 128, 128, 3), dtype=np.uint8))
        blocks = rng.integers(0, 256, (17, 8, 8, 3), dtype=np.uint8)
        videos.append(degrade(blocks.repeat(16, axis=1).repeat(16, axis=2), rng))
    acc = _accuracy(prompts, [analyze(v) for v in videos])
    print("\n" + _row("noise", acc))
    for a in ATTRIBUTES:
        assert acc[a] <= 2 * chance[a] + 0.02, (a, acc[a], chance[a])


def test_chance_levels_are_what_the_world_implies(chance):
    """Sanity of the reference: background is 1 in 5; colour (exactly the prompt's colours) about
    0.65²/8 + 0.35²/28 for one or two shapes of 8 colours; the others need the colours to match as well."""
    assert chance["background"] == pytest.approx(1 / len(BACKGROUNDS), abs=0.015)
    assert chance["colour"] == pytest.approx(0.65**2 / 8 + 0.35**2 / 28, abs=0.015)
    for a in ("shape", "direction", "speed"):
        assert chance[a] < chance["colour"]


def test_other_sizes_and_heldout_scenes():
    """Sizes down to 64×64×9, non-square frames, and single shapes with the held-out attribute combinations."""
    for frames, size in ((9, (64, 64)), (13, (96, 112)), (17, (128, 96))):
        specs = [clip_spec(SEED + 1, i) for i in range(30)]
        acc = _accuracy([parse_caption(caption(s)) for s in specs], [analyze(render(s, frames, size)) for s in specs])
        print("\n" + _row(f"{size[0]}x{size[1]}x{frames} rendered", acc))
        assert min(acc.values()) >= 0.9, (size, acc)
    for i, prompt in enumerate(heldout_prompts()):
        spec = parse_caption(prompt)
        spec["shapes"][0].update(radius=0.15, start=[0.3 + 0.02 * i, 0.6])
        assert score(spec, analyze(render(spec, 17, (128, 128)))) == dict.fromkeys(ATTRIBUTES, True), prompt


def test_degenerate_videos_give_what_can_be_told():
    for colour, name in ((BACKGROUNDS["dark green"], "dark green"), ((128, 128, 128), None), (PALETTE["red"], None)):
        assert analyze(np.full((9, 64, 64, 3), colour, np.uint8)) == {"background": name, "shapes": []}
    assert analyze(np.zeros((1, 16, 16, 3), np.uint8)) == {"background": "black", "shapes": []}
    still = render(clip_spec(SEED, 0), 1, (64, 64))  # one frame: shapes seen, motion unknown
    assert all(s["direction"] is None and s["speed"] is None for s in analyze(still)["shapes"])
    assert len(analyze(still)["shapes"]) == len(clip_spec(SEED, 0)["shapes"])
    video = render(clip_spec(SEED, 3), 17, (128, 128))
    assert analyze(video) == analyze(video.copy())  # deterministic


@pytest.mark.parametrize("bad, message", [
    (np.zeros((9, 64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64, 3), np.uint8), r"\(T, H, W, 3\)"),
    (np.zeros((9, 64, 64, 4), np.uint8), r"\(T, H, W, 3\)"),
    (np.zeros((9, 8, 64, 3), np.uint8), "too small"),
])
def test_bad_input_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        analyze(bad)


def test_scoring_rules():
    expected = parse_caption("a red circle moving left quickly and a blue square moving up and left slowly "
                             "on a black background")
    right = {"background": "black", "shapes": [dict(s) for s in expected["shapes"]]}
    assert score(expected, right) == dict.fromkeys(ATTRIBUTES, True)
    one_wrong = {"background": "dark gray", "shapes": [dict(expected["shapes"][0]), {**expected["shapes"][1],
                                                                                      "direction": "up"}]}
    assert score(expected, one_wrong) == {"colour": True, "shape": True, "direction": False, "speed": True,
                                          "background": False}  # both shapes must be right
    missing = {"background": "black", "shapes": [dict(expected["shapes"][0])]}
    assert score(expected, missing) == {"colour": False, "shape": False, "direction": False, "speed": False,
                                        "background": True}  # the blue square's attributes cannot be right
    extra = {"background": None, "shapes": [*right["shapes"], {"colour": "green", "shape": "circle",
                                                                "direction": None, "speed": None}]}
    assert score(expected, extra) == {"colour": False, "shape": True, "direction": True, "speed": True,
                                      "background": False}  # an extra shape costs the colour only


def test_fast_on_one_core():
    """Under 0.2 s of CPU time (all threads counted) per 33×256×256 clip."""
    videos = [render(clip_spec(SEED, i), 33, (256, 256)) for i in range(5)]
    analyze(videos[0])
    start = time.process_time()
    for v in videos:
        analyze(v)
    per_clip = (time.process_time() - start) / len(videos)
    print(f"\nanalyze 33x256x256: {per_clip * 1000:.0f} ms CPU per clip")
    assert per_clip < 0.2
