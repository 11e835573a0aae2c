"""Preprocessing into a cache: every bad input skipped and reported, duplicates cached once, round trip, resume,
normalisation, a damaged cache file named."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKLWan

from fpsa_train.data.cache import CacheError, LatentCache
from fpsa_train.data.metadata import read_metadata
from fpsa_train.data.video import VideoSpec, load_clip
from fpsa_train.preprocess import Encoders, PreprocessConfig, preprocess
from tests.data.conftest import BAD_ROWS, GOOD, good_rows, write_metadata

WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
            -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
           1.1253, 2.8251, 1.9160]


def config(root, metadata, out, **kw) -> PreprocessConfig:
    settings = dict(num_frames=17, buckets=[[128, 128]], shard_size=3, workers=0, latent_dtype="float32")
    return PreprocessConfig(metadata=str(metadata), components=str(root / "components"), out=str(out),
                            **{**settings, **kw})


def test_bad_inputs_are_skipped_counted_and_reported(video_root, tmp_path):
    rows = good_rows(video_root)[:3] + [r for r, _ in BAD_ROWS]
    metadata = write_metadata(video_root / "mixed.csv", rows)
    report = preprocess(config(video_root, metadata, tmp_path / "cache", workers=2))
    assert report["cached"] == 3 and report["skipped"] == len(BAD_ROWS)
    assert report["skipped_by_reason"] == {reason: 1 for _, reason in BAD_ROWS}
    on_disk = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert sorted((s["row"], s["reason"]) for s in on_disk["skipped_samples"]) == \
        [(3 + i, reason) for i, (_, reason) in enumerate(BAD_ROWS)]


def test_cache_round_trip_equals_direct_encoding(video_root, tmp_path):
    metadata = write_metadata(video_root / "two.csv", good_rows(video_root)[:2])
    preprocess(config(video_root, metadata, tmp_path / "cache"))
    cache = LatentCache(tmp_path / "cache")
    enc = Encoders(video_root / "components", torch.device("cpu"), 512)
    sample = read_metadata(metadata)[1]
    clip = load_clip(sample.video, VideoSpec(17, 16.0, "head", ((128, 128),)), seed=sample.index)
    direct = enc.latents(clip[None])[0]
    text = enc.text([sample.caption])[0]
    item = cache[1]
    assert item["latents"].shape == (16, 5, 16, 16) and torch.allclose(item["latents"], direct, atol=1e-5)
    assert item["context"].shape == text.shape and torch.allclose(item["context"], text, atol=1e-6)
    n_tokens = len(enc.tokenizer(sample.caption).input_ids)
    assert text.shape[0] == n_tokens  # unpadded: the caption's real length
    assert cache[(1, True)]["context"].shape[0] == len(enc.tokenizer("").input_ids)  # dropped → empty prompt


def test_latents_are_normalised_with_the_vae_config_constants(video_root, tmp_path):
    assert list(AutoencoderKLWan().config.latents_mean) == WAN_MEAN  # the published Wan VAE's constants
    assert list(AutoencoderKLWan().config.latents_std) == WAN_STD
    enc = Encoders(video_root / "components", torch.device("cpu"), 512)
    clip = torch.rand(1, 3, 17, 128, 128) * 2 - 1
    mu = enc.vae.encode(clip).latent_dist.mean
    mean = torch.tensor(enc.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(enc.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(enc.latents(clip), (mu - mean) / std)


def test_resume_after_a_killed_run(video_root, tmp_path, monkeypatch):
    metadata = write_metadata(video_root / "all.csv", good_rows(video_root))
    out = tmp_path / "cache"
    calls = {"n": 0}
    original = Encoders.latents

    def dies_on_third_batch(self, clips):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, clips)

    monkeypatch.setattr(Encoders, "latents", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        preprocess(config(video_root, metadata, out, batch_size=2))  # 2 batches done → 4 ≥ 3: one shard written
    kept = json.loads((out / "index.json").read_text())["samples"]
    assert len(kept) == 4 and not list(out.glob("*.tmp*"))
    monkeypatch.setattr(Encoders, "latents", original)
    report = preprocess(config(video_root, metadata, out, batch_size=2))
    assert report["cached"] == GOOD and report["encoded_now"] == GOOD - 4
    keys = [e["key"] for e in json.loads((out / "index.json").read_text())["samples"]]
    assert len(set(keys)) == GOOD
    assert preprocess(config(video_root, metadata, out))["encoded_now"] == 0  # nothing left to do


def test_cache_built_with_other_settings_is_refused(video_root, tmp_path):
    metadata = write_metadata(video_root / "one.csv", good_rows(video_root)[:1])
    preprocess(config(video_root, metadata, tmp_path / "cache"))
    with pytest.raises(ValueError, match="num_frames=17"):
        preprocess(config(video_root, metadata, tmp_path / "cache", num_frames=9))


def test_duplicate_rows_are_cached_once_and_reported(video_root, tmp_path):
    """Before, a repeated (video, caption) row was encoded again and listed twice in the index under one key, so
    training drew it twice as often. The same video with another caption is another sample."""
    first, second = good_rows(video_root)[:2]
    rows = [first, second, first, {**second, "prompt": "another caption"}]
    metadata = write_metadata(video_root / "duplicates.csv", rows)
    out = tmp_path / "cache"
    report = preprocess(config(video_root, metadata, out))
    assert sorted(e["row"] for e in json.loads((out / "index.json").read_text())["samples"]) == [0, 1, 3]
    assert (report["samples"], report["cached"], report["encoded_now"]) == (4, 3, 3)
    assert report["skipped_by_reason"] == {"duplicate": 1}
    assert json.loads((out / "report.json").read_text())["skipped_samples"] == [
        {"row": 2, "source": first["video"], "reason": "duplicate",
         "detail": "same video and caption as row 0, which is cached once"}]
    again = preprocess(config(video_root, metadata, out))  # a rerun still reports it, and encodes nothing
    assert again["encoded_now"] == 0 and again["skipped_by_reason"] == {"duplicate": 1}


@pytest.mark.parametrize("name", ["shard_00000.safetensors", "empty_prompt.safetensors"])
def test_a_truncated_cache_file_is_an_error_naming_it(video_root, tmp_path, name):
    """A shard (or the empty prompt) cut short by a copy: before, safetensors' "incomplete metadata, file not fully
    covered" without a file name."""
    metadata = write_metadata(video_root / "two_for_cache.csv", good_rows(video_root)[:2])
    cache = tmp_path / "cache"
    preprocess(config(video_root, metadata, cache))
    victim = cache / name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CacheError, match=rf"^{re.escape(str(victim))}: not a complete safetensors file .*truncated"
                                         rf".*Rebuild the cache: delete {re.escape(str(cache))}"):
        LatentCache(cache)[0]
