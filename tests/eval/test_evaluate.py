"""`python -m fpsa_train.evaluate` end to end on a tiny exported model: same noise for every variant, the reports
written, and a rerun that samples nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from fpsa_train.config import ConfigError, resolve
from fpsa_train.eval.config import EvaluateConfig
from fpsa_train.eval.metrics import fidelity
from fpsa_train.eval.prompts import load_prompts
from fpsa_train.eval.runner import evaluate
from fpsa_train.eval.store import VideoStore
from fpsa_train.export import ExportConfig, export
from fpsa_train.sample import initial_noise
from tests.conftest import CONFIGS

PROMPTS = ["a red circle moving left quickly on a dark blue background",
           "a green square moving up slowly on a black background"]


@pytest.fixture(scope="module")
def deploy(trained_checkpoint, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("e") / "tiny"  # the folder name is the candidate's name in the results
    return export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(out)))["out"]


def _config(deploy: str, components: Path, tmp_path: Path, **kw) -> EvaluateConfig:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two captions of the synthetic world\n" + "\n".join(PROMPTS) + "\n\n")
    return EvaluateConfig(**{"candidates": [deploy], "prompts": str(prompts), "seeds": [7], "steps": 2,
                             "components": str(components), "out": str(tmp_path / "eval"), "device": "cpu",
                             "per_regime": True, "height": 32, "width": 128, "frames": 5, **kw})


def test_evaluate_writes_the_reports_and_a_rerun_reuses_every_video(deploy, tiny_components, tmp_path, monkeypatch):
    cfg = _config(deploy, tiny_components, tmp_path)
    started = time.perf_counter()
    results = evaluate(cfg)
    first_seconds = time.perf_counter() - started

    keys = [v["key"] for v in results["variants"]]
    assert keys == ["reference", "tiny", "tiny@early", "tiny@middle", "tiny@late"]  # the schedule, then each regime
    assert results["videos_sampled"] == 10 and results["videos_reused"] == 0  # 5 variants × 2 prompts × 1 seed
    out = Path(cfg.out)
    for name in ("results.md", "results.json", "contact_sheet.png", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    # every variant started each video from the same noise: the seed's, drawn on the CPU
    videos = results["videos"]
    for i, prompt in enumerate(PROMPTS):
        hashes = {key: videos[key][i]["noise_sha256"] for key in keys}
        assert len(set(hashes.values())) == 1, hashes
        assert videos["reference"][i]["prompt"] == prompt

    by_key = {v["key"]: v for v in results["variants"]}
    ref = by_key["reference"]
    assert ref["psnr"] is None and ref["density_mean"] == 1.0 and ref["attention"] == [
        "dense SDPA (fps=False: the exported schedule is not applied)"]
    store = VideoStore(cfg.out)
    for key in keys[1:]:
        v = by_key[key]
        # the row is the mean over videos of the per-frame means, recomputed here from the saved frames
        # (the tiny untrained VAE nearly ignores its latents, so the values sit close to the cap)
        psnr, ssim = zip(*[(f["psnr"], f["ssim"]) for f in (
            fidelity(store.load_video(key, p, 7), store.load_video("reference", p, 7)) for p in PROMPTS)])
        assert v["psnr"] == pytest.approx(np.mean(psnr)) and v["ssim"] == pytest.approx(np.mean(ssim))
        assert 0 < v["psnr"] <= results["psnr_cap_db"] and 0 < v["ssim"] <= 1
        assert "PyTorch reference" in v["attention"][0] and v["seconds_per_step"] > 0
        assert len(v["density_per_step"]) == 2 and 0 < v["density_mean"] <= 1
    assert by_key["tiny@middle"]["density_per_step"] == [1.0, 1.0]  # fine FP8, dense: every tile pair
    forced = by_key["tiny@middle"]["attention"][0]  # Deployed.backend describes the regime that ran
    assert "for middle (" in forced and "early" not in forced
    assert by_key["tiny@early"]["density_mean"] < 1  # learned selectors within a (6,6,1) window, every step
    # step 1 (σ = 1) of the schedule is the early regime on the same noise: the same tiles are kept
    assert by_key["tiny"]["density_per_step"][0] == by_key["tiny@early"]["density_per_step"][0]
    trace = videos["tiny@early"][0]["trace"]
    assert [t["regime"] for t in trace] == ["early", "early"] and trace[0]["sigma"] > trace[1]["sigma"]
    assert videos["tiny"][0]["steps_per_regime"] == {"early": 1, "middle": 1}  # σ≈1, then σ≈0.5 (shift 5)
    assert results["lpips"]["available"] is False and results["lpips"]["reason"]
    if results["following"]["available"]:  # the synthetic world's analyzer scores each video
        acc = ref["accuracy"]
        assert acc["applicable"] == 2 and all(0 <= acc[a] <= 1 for a in results["following"]["attributes"])

    md = (out / "results.md").read_text()
    assert "| candidate | regime / schedule | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |" in md
    assert "| tiny | only early |" in md and "| reference: dense (tiny's weights) | dense SDPA |" in md
    assert "LPIPS** (AlexNet): not available:" in md and PROMPTS[1] in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(results["variants"]))
    from PIL import Image

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > 2 * cfg.sheet_height  # a header and two rows (prompt × seed)

    # rerun: every video is found with the same inputs; nothing is sampled (generate would raise)
    def no_sampling(*args, **kwargs):
        raise AssertionError("a saved video was sampled again")

    monkeypatch.setattr("fpsa_train.sample.generate", no_sampling)
    started = time.perf_counter()
    again = evaluate(cfg)
    assert again["videos_sampled"] == 0 and again["videos_reused"] == 10
    assert [v["psnr"] for v in again["variants"]] == [v["psnr"] for v in results["variants"]]
    assert time.perf_counter() - started < first_seconds


def test_initial_noise_depends_on_the_seed_only():
    a = initial_noise(3, (1, 4, 2, 4, 6), torch.device("cpu"))
    assert torch.equal(a, initial_noise(3, (1, 4, 2, 4, 6), torch.device("cpu")))
    assert not torch.equal(a, initial_noise(4, (1, 4, 2, 4, 6), torch.device("cpu")))
    assert torch.equal(a, torch.randn(a.shape, generator=torch.Generator().manual_seed(3)))  # as `sample` draws it


def test_a_saved_video_is_reused_only_with_the_same_inputs(tmp_path):
    store = VideoStore(tmp_path)
    video = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    inputs = {"deploy": "abc", "attention": "schedule", "prompt": "p", "seed": 1, "steps": 2, "size": [16, 16, 5]}
    store.save("tiny", "p", 1, inputs, video, {"trace": []})
    assert store.load_record("tiny", "p", 1, inputs)["shape"] == [5, 16, 16, 3]
    assert store.load_record("tiny", "p", 1, {**inputs, "steps": 3}) is None
    assert store.load_record("tiny", "p", 2, inputs) is None  # another seed: another file
    npy, _ = store.paths("tiny", "p", 1)
    npy.write_bytes(npy.read_bytes()[:100])  # a truncated video is sampled again
    assert store.load_record("tiny", "p", 1, inputs) is None


def test_prompt_files_text_and_csv(tmp_path):
    csv_file = tmp_path / "metadata.csv"
    csv_file.write_text("video,prompt\nclip0.mp4,first\nclip1.mp4,second\nclip2.mp4,first\n")
    assert load_prompts(EvaluateConfig(candidates=["x"], prompts=str(csv_file))) == ["first", "second"]
    assert load_prompts(EvaluateConfig(candidates=["x"], prompts=str(csv_file), max_prompts=1)) == ["first"]
    bad = tmp_path / "bad.csv"
    bad.write_text("video,caption\na.mp4,b\n")
    with pytest.raises(ConfigError, match="no `prompt` column"):
        load_prompts(EvaluateConfig(candidates=["x"], prompts=str(bad)))
    with pytest.raises(ConfigError, match="is not a file"):
        load_prompts(EvaluateConfig(candidates=["x"], prompts=str(tmp_path / "missing.txt")))


def test_heldout_prompts_and_seeds_are_the_default():
    from fpsa_train.data.synthetic_video import HELDOUT_SEEDS, heldout_prompts
    from fpsa_train.eval.prompts import load_seeds

    cfg = EvaluateConfig(candidates=["x"])
    assert load_prompts(cfg) == heldout_prompts() and load_seeds(cfg) == list(HELDOUT_SEEDS)


def test_the_cli_config_composes_and_rejects_unknown_keys():
    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        cfg = resolve(compose(config_name="evaluate", overrides=["candidates=[deploy/a,deploy/b]", "per_regime=true"]))
        assert isinstance(cfg, EvaluateConfig) and cfg.candidates == ["deploy/a", "deploy/b"] and cfg.per_regime
        with pytest.raises(ConfigError, match="did you mean `per_regime`"):
            resolve(compose(config_name="evaluate", overrides=["candidates=[d]", "+per_regimes=true"]))
        with pytest.raises(ConfigError, match="steps=0"):
            resolve(compose(config_name="evaluate", overrides=["candidates=[d]", "steps=0"]))


def test_a_dense_candidate_against_its_own_dense_weights_is_sampled_once(tiny_components, tmp_path, monkeypatch):
    """`reference=dense` with a dense export: both rows have the same weights, attention and noise, so the
    candidate's video is the reference's, copied (not sampled a second time)."""
    import fpsa_train.sample
    from fpsa_train.train import train
    from tests.conftest import EXPORT_RUN, compose_train

    run = [o for o in EXPORT_RUN if not o.startswith("fps")] + ["fps=dense", "trainer.max_steps=1"]
    train(compose_train(run, tmp_path / "run"))
    dense = export(ExportConfig(checkpoint=str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                                out=str(tmp_path / "dense")))["out"]
    calls = []
    real = fpsa_train.sample.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("fpsa_train.sample.generate", counting)
    results = evaluate(_config(dense, tiny_components, tmp_path, per_regime=False))
    assert [v["key"] for v in results["variants"]] == ["reference", "dense"]
    assert len(calls) == 2  # 2 prompts × 1 seed, once each
    row = results["variants"][1]
    assert row["psnr"] == results["psnr_cap_db"] and row["ssim"] == pytest.approx(1.0)
    store = VideoStore(tmp_path / "eval")
    for prompt in PROMPTS:
        assert np.array_equal(store.load_video("dense", prompt, 7), store.load_video("reference", prompt, 7))


def test_batched_sampling_denoises_the_prompts_together_and_matches_one_at_a_time(deploy, tiny_components, tmp_path,
                                                                                    monkeypatch):
    """batch=2: both prompts of a seed in one model call per step (guidance: 4 rows), every variant batched the
    same way; each video matches the one sampled alone up to float rounding, and is not reused for batch=1."""
    from fpsa_train.deploy import Deployed

    alone = evaluate(_config(deploy, tiny_components, tmp_path, per_regime=False))
    store = VideoStore(tmp_path / "eval")
    before = {(k, p): store.load_video(k, p, 7) for k in ("reference", "tiny") for p in PROMPTS}
    rows = []
    real = Deployed.denoise

    def recording(self, x, *args, **kwargs):
        rows.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(Deployed, "denoise", recording)
    together = evaluate(_config(deploy, tiny_components, tmp_path, per_regime=False, batch=2))
    assert together["videos_sampled"] == 4 and together["videos_reused"] == 0  # batch is part of the reuse key
    assert rows == [4] * 4  # 2 variants × 2 steps, each call both prompts with their negative branches
    for key in ("reference", "tiny"):
        for i, prompt in enumerate(PROMPTS):
            record = together["videos"][key][i]
            assert record["batch"] == 2 and record["noise_sha256"] == alone["videos"][key][i]["noise_sha256"]
            batched = store.load_video(key, prompt, 7)
            assert batched.shape == before[key, prompt].shape
            assert fidelity(batched, before[key, prompt])["psnr"] > 45  # rounding, not a different video
    assert together["variants"][1]["psnr"] == pytest.approx(alone["variants"][1]["psnr"], abs=1.0)
