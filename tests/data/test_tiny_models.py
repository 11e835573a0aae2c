"""The tiny Wan-layout components: real-checkpoint folder layout, offline loading, tokenizer and encoder behaviour,
seeded weights, VAE shapes, caching, and a short VAE training that measurably improves reconstruction."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from safetensors.torch import load_file

from fpsa_train.data.synthetic_video import generate_clips
from fpsa_train.data.tiny_models import TINY_TEXT_DIM, build_tiny_wan_components, load_components

CAPTIONS = ["a red circle moving left quickly on a dark blue background",
            "a blue square moving up slowly on a black background", "a red circle", ""]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "components"
    return folder, build_tiny_wan_components(folder, None, seed=0)


@pytest.fixture(scope="module")
def components(untrained):
    """Loaded with every network connection refused: nothing may be fetched."""
    def refuse(*args, **kwargs):
        raise OSError("network access during load_components")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        return load_components(untrained[0])


def test_folder_has_the_diffusers_layout(untrained):
    folder, report = untrained
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                 "model_index.json", "build_report.json"):
        assert (folder / name).is_file(), name
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert "skipped" in report["vae_training"] and report["folder"] == str(folder.resolve())
    assert not list(folder.parent.glob(".components.*")), "temporary build folder left behind"


def test_loads_offline_and_matches_the_dit_config(components):
    vae, text_encoder, tokenizer = components
    assert type(vae).__name__ == "AutoencoderKLWan" and type(text_encoder).__name__ == "UMT5EncoderModel"
    assert text_encoder.config.d_model == TINY_TEXT_DIM
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.z_dim == 16


def test_tokenizer_pads_truncates_and_ends_with_eos(components):
    tokenizer = components[2]
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (4, 512)
    lengths = batch.attention_mask.sum(1).tolist()
    assert lengths == [len(c.split()) + 1 for c in CAPTIONS]  # every word known, plus </s>
    assert batch.input_ids[3, 0].item() == tokenizer.eos_token_id == 1  # "" → just </s>
    assert tokenizer.pad_token_id == 0 and (batch.input_ids[3, 1:] == 0).all()
    assert tokenizer.unk_token_id not in batch.input_ids[:, :5].tolist()
    long = tokenizer(["red " * 600], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert long.attention_mask.sum().item() == 512 and long.input_ids[0, -1].item() == tokenizer.eos_token_id


def test_distinct_captions_give_distinct_embeddings(components):
    _, text_encoder, tokenizer = components
    batch = tokenizer(CAPTIONS[:3], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert out.shape == (3, 512, TINY_TEXT_DIM) and torch.isfinite(out).all()
    assert (batch.input_ids[0] != batch.input_ids[1]).any()
    trimmed = [out[i, : n].mean(0) for i, n in enumerate(batch.attention_mask.sum(1).tolist())]  # unpadded, as cached
    assert min((a - b).norm() for i, a in enumerate(trimmed) for b in trimmed[i + 1:]) > 0.1


def test_vae_latent_shape_and_roundtrip(components):
    vae = components[0]
    x = torch.rand(1, 3, 17, 128, 128) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 16, 5, 16, 16)
        assert vae.decode(z).sample.shape == (1, 3, 17, 128, 128)


def test_same_seed_same_weights_other_seed_differs(untrained, tmp_path):
    folder = untrained[0]
    build_tiny_wan_components(tmp_path / "again", None, seed=0)
    build_tiny_wan_components(tmp_path / "other", None, seed=1)
    for part, file in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b, c = (load_file(f / part / file) for f in (folder, tmp_path / "again", tmp_path / "other"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0), part
    tokenizers = [(f / "tokenizer/tokenizer.json").read_text() for f in (folder, tmp_path / "again")]
    assert tokenizers[0] == tokenizers[1]


def test_cached_folder_is_reused_and_force_rebuilds(untrained):
    folder, report = untrained
    stamp = (folder / "build_report.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_tiny_wan_components(folder, None, seed=0)
    assert time.perf_counter() - start < 0.5
    assert again == report and (folder / "build_report.json").stat().st_mtime_ns == stamp
    rebuilt = build_tiny_wan_components(folder, None, seed=0, force=True)
    assert (folder / "build_report.json").stat().st_mtime_ns != stamp
    assert rebuilt["params"] == report["params"]


def test_short_training_improves_reconstruction(tmp_path):
    """40 steps lift the held-out PSNR well above the initialised VAE (0 steps); the latent statistics are set and
    the clips are part of the cache key. (Small 64×64, 9-frame clips keep it cheap.)"""
    clips = generate_clips(tmp_path / "clips", 6, frames=9, size=(64, 64), seed=0)
    kwargs = dict(seed=0, eval_clips=1, stats_clips=2)
    init = build_tiny_wan_components(tmp_path / "init", clips, vae_steps=0, **kwargs)
    report = build_tiny_wan_components(tmp_path / "c", clips, vae_steps=40, **kwargs)
    assert report["psnr_db"] > init["psnr_db"] + 2.0, (init, report)
    assert report["loss_first_last"][1] < report["loss_first_last"][0]
    vae = load_components(tmp_path / "c")[0]
    assert vae.config.latents_mean == report["latents_mean"] != [0.0] * 16
    assert all(s > 0 for s in vae.config.latents_std)
    changed = generate_clips(tmp_path / "clips2", 6, frames=9, size=(64, 64), seed=1)
    other = build_tiny_wan_components(tmp_path / "init", changed, vae_steps=0, **kwargs)
    assert other["params"]["clips_hash"] != init["params"]["clips_hash"]


@pytest.mark.slow
def test_default_build_reconstructs_the_clips(tmp_path):
    """The default build (the tiny data config's 48 clips, 300 steps): recognisable reconstructions, ~90 s."""
    metadata = generate_clips(tmp_path / "clips", 48, seed=1234)
    report = build_tiny_wan_components(tmp_path / "components", metadata, seed=1234)
    assert report["psnr_db"] > 20.0, report
    vae = load_components(tmp_path / "components")[0]
    x = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    normalised = (z - torch.tensor(vae.config.latents_mean)[:, None, None, None]) / torch.tensor(
        vae.config.latents_std)[:, None, None, None]
    assert torch.isfinite(normalised).all()
