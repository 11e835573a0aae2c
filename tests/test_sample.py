"""Sampling: deploy folder + tiny encoders → flow UniPC with guidance → a playable mp4 and a PNG contact sheet."""

from __future__ import annotations

from pathlib import Path

import decord
import pytest
import torch
from PIL import Image

from fpsa_train.config import ConfigError
from fpsa_train.export import ExportConfig, export
from fpsa_train.sample import SampleConfig, denoise_loop, flow_unipc, sample

PROMPT = "a red circle moving left quickly on a dark blue background"


@pytest.fixture(scope="module")
def deploy(trained_checkpoint, tmp_path_factory) -> str:
    return export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path_factory.mktemp("s") / "d")))["out"]


def test_sample_writes_a_playable_mp4_and_a_contact_sheet(deploy, tiny_components, tmp_path):
    report = sample(SampleConfig(deploy=deploy, prompt=PROMPT, components=str(tiny_components), steps=6,
                                 height=64, width=96, frames=9, out=str(tmp_path), seed=3, shift=1.0))
    video = decord.VideoReader(report["mp4"])
    assert len(video) == 9 and video[0].shape == (64, 96, 3)  # frames, height, width as asked (not swapped)
    sheet = Image.open(report["png"])
    assert sheet.size == (4 * 96, 2 * 64)  # 8 evenly spaced frames of 9, 4 per row
    assert sum(report["steps_per_regime"].values()) == 6 and set(report["steps_per_regime"]) == {
        "early", "middle", "late"}  # 6 shifted steps from σ≈1 to σ≈0.2 cross all three regimes
    assert "reference" in report["backend"]
    frames = video.get_batch(list(range(9))).asnumpy()
    assert frames.std() > 1  # not a constant image
    check = report["prompt_check"]  # a prompt of the synthetic world is checked by its analyzer
    assert check["applicable"] and set(check["scores"]) == {"colour", "shape", "direction", "speed", "background"}


def test_verdict_names_each_attribute_and_what_the_video_shows():
    from fpsa_train.eval.following import follow, verdict
    from fpsa_train.data.synthetic_video import parse_caption, render

    spec = {**parse_caption(PROMPT)}
    spec["shapes"] = [{**spec["shapes"][0], "radius": 0.15, "start": [0.5, 0.5]}]
    line = verdict(follow(PROMPT, render(spec, 17, (128, 128))))
    assert line.startswith("colour ✓ shape ✓ direction ✓ speed ✓ background ✓ (5/5)") and PROMPT in line
    wrong = verdict(follow(PROMPT.replace("left", "right"), render(spec, 17, (128, 128))))
    assert "direction ✗" in wrong and "(4/5)" in wrong and "moving left" in wrong
    assert verdict(follow("a photo of a cat", render(spec, 9, (64, 64)))).startswith("not checked: ")


def test_regime_per_step_follows_the_scheduler_sigmas():
    """The σ the regimes are picked from are the scheduler's: shifted, from ~1 down, ending at 0; the model's
    timesteps are 1000σ truncated to integers, as in Wan's sampler."""
    scheduler = flow_unipc(50, 5.0, 1000, torch.device("cpu"))
    sigmas = scheduler.sigmas
    assert len(scheduler.timesteps) == 50 and sigmas[0] > 0.999 and sigmas[-1] == 0
    assert scheduler.timesteps.dtype == torch.int64
    assert (scheduler.timesteps - sigmas[:-1] * 1000).abs().max() < 1
    assert 0.3 < (sigmas[:-1] >= 0.9).float().mean() < 0.4  # configs/fps/default.yaml: ~36% of steps are early


@pytest.mark.parametrize("override, key", [(dict(frames=10), "frames=10"), (dict(height=60), "height=60"),
                                          (dict(components="/nonexistent"), "components")])
def test_bad_sampling_options_are_named(deploy, tiny_components, tmp_path, override, key):
    kw = dict(deploy=deploy, prompt=PROMPT, components=str(tiny_components), steps=1, out=str(tmp_path))
    with pytest.raises(ConfigError, match=key):
        sample(SampleConfig(**{**kw, **override}))


def test_sample_defaults_to_the_training_clip_size(deploy, tiny_components, tmp_path):
    report = sample(SampleConfig(deploy=deploy, prompt=PROMPT, components=str(tiny_components), steps=1,
                                 guidance=1.0, out=str(tmp_path)))
    assert report["size"] == [64, 128, 9]  # the synthetic latents of the run: 3×8×16 → 9 frames of 64×128
    assert Path(report["mp4"]).is_file()


class _Oracle:
    """A denoiser that knows the clean latents x0: v = ε − x0 = (x_σ − x0)/σ. The conditional branch (first) knows
    x0, the negative branch knows another target, so guidance must extrapolate towards x0 exactly as Wan does."""

    schedule, num_train_timesteps = None, 1000

    def __init__(self, x0: torch.Tensor, other: torch.Tensor):
        self.targets = torch.cat([x0, other])  # (2, C, T, H, W)

    def denoise(self, x, sigma, context, timestep=None):
        return (x - self.targets[: x.shape[0]]) / sigma


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_denoise_loop_lands_on_the_clean_latents_of_a_perfect_denoiser(guidance):
    """The loop's conventions (σ = 1 is noise, velocity ε − x0, the scheduler's step, the guidance formula) are
    checked end to end: with an oracle denoiser the sampler must return x0 (up to UniPC's float32 arithmetic)."""
    g = torch.Generator().manual_seed(0)
    x0, other, noise = (torch.randn(1, 4, 2, 6, 6, generator=g) for _ in range(3))
    texts = ["p", "n"] if guidance > 1 else ["p"]
    # the guided target: v_neg + g·(v_pos − v_neg) is the velocity towards x_g = x_neg + g·(x0 − x_neg)
    target = other + guidance * (x0 - other) if guidance > 1 else x0
    out, _ = denoise_loop(_Oracle(x0, other), noise, texts, steps=20, shift=5.0, guidance=guidance)
    err = ((out - target).norm() / target.norm()).item()
    assert err < 1e-4, f"relative error {err:.3g}"


def test_negative_prompt_is_the_components_own_and_a_foreign_one_is_flagged(deploy, tiny_components, tmp_path,
                                                                             caplog):
    """The synthetic world's models learned the empty caption as unconditional (caption dropout); Wan's negative
    prompt is unknown words to their tokenizer, and guidance against it drew empty videos (docs/results.md)."""
    import json
    import shutil

    from fpsa_train.sample import WAN_NEGATIVE_PROMPT, default_negative_prompt, negative_prompt

    assert default_negative_prompt(tiny_components) == ""  # built folders name it in model_index.json
    assert default_negative_prompt("assets/world_components") == ""  # and so does the shipped one
    wan_like = tmp_path / "wan_like"
    shutil.copytree(tiny_components, wan_like)
    index = json.loads((wan_like / "model_index.json").read_text())
    del index["_fpsa_negative_prompt"]
    (wan_like / "model_index.json").write_text(json.dumps(index))
    assert default_negative_prompt(wan_like) == WAN_NEGATIVE_PROMPT  # real Wan folders: Wan's default

    with caplog.at_level("WARNING", logger="fpsa_train.sample"):
        assert negative_prompt(None, tiny_components) == ""
        assert negative_prompt("a red circle", tiny_components) == "a red circle"
        assert not caplog.records
        assert negative_prompt(None, wan_like) == WAN_NEGATIVE_PROMPT
    assert len(caplog.records) == 1 and "unknown tokens" in caplog.text and "negative_prompt=''" in caplog.text

    report = sample(SampleConfig(deploy=deploy, prompt=PROMPT, components=str(tiny_components), steps=1,
                                 height=32, width=32, frames=1, out=str(tmp_path / "s")))
    assert report["negative_prompt"] == ""


@pytest.mark.parametrize("flag", ["compile", "fp8_linears"])
def test_the_samplers_runtime_flags_default_off_and_reach_load_deploy(flag, monkeypatch):
    from hydra import compose, initialize_config_dir

    from fpsa_train.config import resolve
    from tests.conftest import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        assert getattr(resolve(compose(config_name="sample", overrides=["deploy=d", "prompt=p"])), flag) is False
        cfg = resolve(compose(config_name="sample", overrides=["deploy=d", "prompt=p", f"{flag}=true"]))
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(folder, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("fpsa_train.deploy.load_deploy", fake_load)
    with pytest.raises(Stop):
        sample(cfg)
    assert seen[flag] is True
