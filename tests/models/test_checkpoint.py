"""Checkpoint load/save and the original ↔ diffusers key adapter, on a 2-block, 4-head model (CPU, fast)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fpsa_train import atomic
from fpsa_train.models import checkpoint as ckpt
from fpsa_train.models.checkpoint import (CheckpointConfigError, CheckpointError, CheckpointKeyError,
                                          CheckpointShapeError, check_config, config_from_checkpoint,
                                          load_wan_weights, save_wan_weights)
from fpsa_train.models.config import WanConfig
from fpsa_train.models.state_dict import detect_key_format, from_diffusers, strip_wrapper_prefix, to_diffusers
from fpsa_train.models.wan import WanModel

TINY = dict(dim=48, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, freq_dim=16, text_len=20)
DIFFUSERS_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16,
                      out_channels=16, text_dim=32, freq_dim=16, ffn_dim=96, num_layers=2)


def make_model(**overrides) -> WanModel:
    """A tiny model with every parameter random (the published init zeroes the head and sets norms to 1,
    which would let a wrong mapping of those keys go unnoticed)."""
    torch.manual_seed(0)
    model = WanModel(WanConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def meta_model(**overrides) -> WanModel:
    with torch.device("meta"):
        return WanModel(WanConfig(**{**TINY, **overrides})).eval()


def forward(model: torch.nn.Module, diffusers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([100.0, 700.0])
    context = torch.randn(2, TINY["text_len"], TINY["text_dim"], generator=g)
    with torch.no_grad():
        return model(x, t, context, return_dict=False)[0] if diffusers else model(x, t, context)


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_into_meta_model(tmp_path, key_format, sharded):
    model = make_model()
    out = tmp_path / "ckpt"
    report = save_wan_weights(model, out, key_format=key_format, max_shard_bytes=40_000 if sharded else 5 * 2**30)

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("diffusion_pytorch_model-")]
    if sharded:
        assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
        index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
        stored = {k: v for s in shards for k, v in load_file(out / s).items()}
        assert set(index["weight_map"]) == set(stored) and set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    else:
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert report["files"] == (shards or ["diffusion_pytorch_model.safetensors"])
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == ("WanModel" if key_format == "original" else "WanTransformer3DModel")

    loaded = meta_model()
    info = load_wan_weights(loaded, out)
    assert info["key_format"] == key_format and info["dtype"] == "float32"
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert_same_weights(model.state_dict(), loaded.state_dict())
    assert torch.equal(forward(model), forward(loaded))


def test_bf16_checkpoint_is_cast_to_the_model_dtype(tmp_path):
    model = make_model()
    save_wan_weights(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors").values()} == \
        {torch.bfloat16}

    loaded = meta_model()
    info = load_wan_weights(loaded, tmp_path / "bf16")
    assert info["stored_dtypes"] == ["bfloat16"] and info["dtype"] == "float32"
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert_same_weights(rounded, loaded.state_dict())

    as_bf16 = meta_model()
    assert load_wan_weights(as_bf16, tmp_path / "bf16", dtype=torch.bfloat16)["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in as_bf16.parameters())


def test_loading_into_a_built_model_keeps_its_parameter_objects(tmp_path):
    source, target = make_model(), WanModel(WanConfig(**TINY))
    save_wan_weights(source, tmp_path / "c")
    before = [id(p) for p in target.parameters()]
    load_wan_weights(target, tmp_path / "c")
    assert [id(p) for p in target.parameters()] == before
    assert_same_weights(source.state_dict(), target.state_dict())


# ------------------------------------------------------------------------------------ errors on load


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = make_model().state_dict()
    file = tmp_path / "w.safetensors"
    save_file({k: v for k, v in sd.items() if k != "blocks.1.cross_attn.norm_k.weight"}, file)
    with pytest.raises(CheckpointKeyError, match=r"1 missing: blocks\.1\.cross_attn\.norm_k\.weight") as e:
        load_wan_weights(meta_model(), file)
    assert str(file) in str(e.value) and "original key format" in str(e.value) and "unexpected:" not in str(e.value)

    save_file({**sd, "blocks.0.cross_attn.k_img.weight": torch.zeros(48, 48)}, file)
    with pytest.raises(CheckpointKeyError, match=r"1 unexpected: blocks\.0\.cross_attn\.k_img\.weight"):
        load_wan_weights(meta_model(), file)


def test_missing_key_is_named_in_the_checkpoint_format(tmp_path):
    """The affine cross-attention norm is norm3 in ours but norm2 in diffusers: report the name in the file."""
    sd = to_diffusers(make_model().state_dict())
    del sd["blocks.0.norm2.bias"]
    save_file(sd, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointKeyError, match=r"diffusers key format.*1 missing: blocks\.0\.norm2\.bias$"):
        load_wan_weights(meta_model(), tmp_path / "d.safetensors")


def test_many_missing_keys_are_listed_up_to_twenty(tmp_path):
    sd = make_model().state_dict()
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, tmp_path / "w.safetensors")
    n = sum(k.startswith("blocks.1.") for k in sd)
    with pytest.raises(CheckpointKeyError) as e:
        load_wan_weights(meta_model(), tmp_path / "w.safetensors")
    assert n > 20 and f"{n} missing" in str(e.value) and f"({n} in all)" in str(e.value)
    assert str(e.value).count("blocks.1.") == 20


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    sd = make_model().state_dict()
    sd["blocks.0.ffn.0.weight"] = torch.zeros(64, 48)
    save_file(sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointShapeError, match=r"blocks\.0\.ffn\.0\.weight is \[64, 48\] in the checkpoint "
                                                   r"but \[96, 48\] in the model"):
        load_wan_weights(meta_model(), tmp_path / "w.safetensors")


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
def test_config_mismatch_names_the_fields(tmp_path, key_format):
    save_wan_weights(make_model(), tmp_path / "c", key_format=key_format)
    with pytest.raises(CheckpointConfigError, match=r"is ffn_dim=96, num_layers=2 but the model config has "
                                                    r"ffn_dim=128, num_layers=3"):
        load_wan_weights(meta_model(ffn_dim=128, num_layers=3), tmp_path / "c")


def test_config_mismatch_suggests_the_published_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16,
        "model_type": "t2v", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512}))
    assert config_from_checkpoint(tmp_path)["dim"] == 5120 and "text_dim" not in config_from_checkpoint(tmp_path)
    expected = (r"is dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, .* but the model config has dim=48, "
                r"ffn_dim=96, num_heads=4, num_layers=2, .*: pick the matching model config \(model=wan14b\)")
    with pytest.raises(CheckpointConfigError, match=expected):
        check_config(WanConfig(**TINY), tmp_path)
    check_config(WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), tmp_path)  # matches: no error


def test_sharded_checkpoint_with_a_missing_shard_is_refused(tmp_path):
    save_wan_weights(make_model(), tmp_path / "c", max_shard_bytes=40_000)
    victim = sorted((tmp_path / "c").glob("*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard files missing.*{victim.name}"):
        load_wan_weights(meta_model(), tmp_path / "c")


def test_unsupported_paths_are_refused(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=r"weights\.ckpt: unsupported weights file '\.ckpt'; expected .*"
                                              r"\.safetensors"):
        load_wan_weights(meta_model(), tmp_path / "weights.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no weights in folder .*empty"):
        load_wan_weights(meta_model(), tmp_path / "empty")


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("cut", ["media", "header"])
def test_truncated_safetensors_is_an_error_naming_the_file(tmp_path, sharded, cut):
    """A copy cut short (half the tensor data, or inside the header) is named with the fix, not reported as
    safetensors' path-less "incomplete metadata, file not fully covered" / "invalid header length"."""
    save_wan_weights(make_model(), tmp_path / "c", max_shard_bytes=40_000 if sharded else 5 * 2**30)
    victim = sorted((tmp_path / "c").glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if cut == "media" else data[:20])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(victim))}: not a complete safetensors file "
                                              r"\(.*\): it is truncated or damaged.*Copy or download it again"):
        load_wan_weights(meta_model(), tmp_path / "c")


# --------------------------------------------------------------------------------------- torch files


class NotATensor:
    pass


def test_torch_file_loads_weights_only(tmp_path):
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = meta_model()
    assert load_wan_weights(loaded, tmp_path / "w.pt")["key_format"] == "original"
    assert_same_weights(model.state_dict(), loaded.state_dict())

    # A Lightning checkpoint: weights under "state_dict", every key prefixed by the module attribute "model.".
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "lightning.pth")
    loaded = meta_model()
    load_wan_weights(loaded, tmp_path / "lightning.pth")
    assert_same_weights(model.state_dict(), loaded.state_dict())

    torch.save({"weights": NotATensor()}, tmp_path / "pickle.bin")
    with pytest.raises(CheckpointError, match=r"pickle\.bin: torch\.load\(weights_only=True\) refused it"):
        load_wan_weights(meta_model(), tmp_path / "pickle.bin")


# ------------------------------------------------------------------------------------ key adapter


def test_key_adapter_round_trip_and_detection():
    sd = make_model().state_dict()
    theirs = to_diffusers(sd)
    assert list(from_diffusers(theirs)) == list(sd)
    assert all(theirs[to] is sd[k] for k, to in zip(sd, theirs))  # values passed through, not copied
    assert "blocks.0.norm2.weight" in theirs and "blocks.0.norm3.weight" in sd  # the deliberate swap
    assert to_diffusers({"blocks.0.cross_attn.k_img.weight": 1}) == {"blocks.0.cross_attn.k_img.weight": 1}
    assert detect_key_format(sd) == "original" and detect_key_format(theirs) == "diffusers"
    assert detect_key_format(["model.diffusion_model." + k for k in theirs]) == "diffusers"
    assert list(strip_wrapper_prefix({"diffusion_model." + k: v for k, v in sd.items()})) == list(sd)
    with pytest.raises(ValueError, match=r"cannot tell the key format .*'encoder\.layer\.0\.weight'"):
        detect_key_format(["encoder.layer.0.weight", "lm_head.weight"])
    with pytest.raises(ValueError, match="mixes original Wan keys"):
        detect_key_format(["head.head.weight", "proj_out.weight"])


# ------------------------------------------------------------------------------------ diffusers interop


def test_converted_state_dict_loads_strictly_into_diffusers_and_matches(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = make_model()
    reference = diffusers.WanTransformer3DModel(**DIFFUSERS_TINY).eval()
    reference.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    ours, theirs = forward(model), forward(reference, diffusers=True)
    sqnr = 20 * torch.log10(theirs.norm() / (theirs - ours).norm())
    assert sqnr > 100, f"SQNR {sqnr:.1f} dB, max diff {(theirs - ours).abs().max():.3g}"

    # Our diffusers-format export is readable by diffusers: its config.json and its keys.
    save_wan_weights(model, tmp_path / "export", key_format="diffusers")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    rebuilt = diffusers.WanTransformer3DModel.from_config(config)
    rebuilt.load_state_dict(load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors"), strict=True)
    assert_same_weights(reference.state_dict(), rebuilt.state_dict())


def test_diffusers_save_pretrained_loads_into_our_model(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(2)
    reference = diffusers.WanTransformer3DModel(**DIFFUSERS_TINY).eval()
    pipeline = tmp_path / "pipeline"
    reference.save_pretrained(pipeline / "transformer", safe_serialization=True)
    expected = {k: v for k, v in WanConfig(**TINY).architecture().items() if k != "text_len"}  # not in diffusers'
    assert config_from_checkpoint(pipeline) == expected

    loaded = meta_model()
    info = load_wan_weights(loaded, pipeline)  # descends into transformer/, checks its config.json
    assert info["key_format"] == "diffusers" and Path(info["files"][0]).parent.name == "transformer"
    assert_same_weights(from_diffusers(reference.state_dict()), loaded.state_dict())


# ------------------------------------------------------------------------------------------- atomicity


def failing_after_first_file(monkeypatch):
    real, calls = save_file, []

    def writer(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", writer)
    return calls


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    calls = failing_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_wan_weights(make_model(), tmp_path / "out", max_shard_bytes=40_000)
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []  # neither the final folder nor the temporary one


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    previous = make_model()
    save_wan_weights(previous, tmp_path / "out", max_shard_bytes=40_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    failing_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_wan_weights(WanModel(WanConfig(**TINY)), tmp_path / "out", max_shard_bytes=40_000)
    assert os.listdir(tmp_path) == ["out"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before

    monkeypatch.undo()  # a successful save replaces it, and leaves nothing beside it
    replacement = WanModel(WanConfig(**TINY))
    save_wan_weights(replacement, tmp_path / "out", key_format="diffusers")
    assert os.listdir(tmp_path) == ["out"]
    loaded = meta_model()
    assert load_wan_weights(loaded, tmp_path / "out")["key_format"] == "diffusers"
    assert_same_weights(replacement.state_dict(), loaded.state_dict())


def test_shared_storage_tensors_are_saved(tmp_path):
    sd = make_model().state_dict()
    sd["blocks.1.norm3.weight"] = sd["blocks.0.norm3.weight"]  # tied: one storage under two keys
    sd["blocks.1.self_attn.q.weight"] = sd["blocks.1.self_attn.q.weight"].t().contiguous().t()  # non-contiguous
    save_wan_weights(sd, tmp_path / "c", cfg=WanConfig(**TINY))
    loaded = meta_model()
    load_wan_weights(loaded, tmp_path / "c")
    assert_same_weights({k: v.contiguous() for k, v in sd.items()}, loaded.state_dict())


# ------------------------------------------------------------------------------ leftovers of killed writes


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped (a killed writer's)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def leftover(final: Path, kind: str, pid: int, host: str = atomic._HOST) -> Path:
    """A hidden sibling as `temp_sibling` names it, for writer `host`/`pid`, holding a file."""
    path = final.with_name(f".{final.name}.{kind}-{host}-{pid}-0123abcd")
    path.mkdir()
    (path / ckpt.WEIGHTS_NAME).write_bytes(b"0")
    return path


def test_temp_sibling_names_its_writer(tmp_path):
    name = atomic.temp_sibling(tmp_path / "out", "tmp").name
    assert re.fullmatch(rf"\.out\.tmp-{atomic._HOST}-{os.getpid()}-[0-9a-f]{{8}}", name), name


def test_replace_removes_leftovers_of_killed_writers_only(tmp_path):
    """What a killed writer left is removed; what a running writer, another host's writer or an older fpsa (no
    writer recorded) left is kept; a killed replace's `old` (the previous version) is kept until `out` exists."""
    final, dead = tmp_path / "out", exited_pid()
    dead_tmp, dead_old = leftover(final, "tmp", dead), leftover(final, "old", dead)
    nested = tmp_path / f".{dead_tmp.name}.tmp-89abcdef"  # a save nested in a killed export (export.py)
    nested.mkdir()
    running = leftover(final, "tmp", os.getpid())
    other_host = leftover(final, "tmp", dead, host="otherhost")
    no_writer = tmp_path / ".out.tmp-0123abcd"
    no_writer.mkdir()
    other_folder = leftover(tmp_path / "out2", "tmp", dead)
    kept = {running, other_host, no_writer, other_folder}

    assert atomic.remove_stale_siblings(final) == [nested, dead_tmp]  # sorted by name
    assert set(tmp_path.iterdir()) == kept | {dead_old}  # `out` is missing: the previous version stays
    save_wan_weights(make_model(), final)  # a replace removes the rest once `out` is in place
    assert set(tmp_path.iterdir()) == kept | {final}


def test_truncated_torch_weights_file_is_an_error_naming_it(tmp_path):
    """Regression: a truncated .pt weights file raised torch's "PytorchStreamReader failed reading zip archive"
    without the path."""
    from fpsa_train.models.checkpoint import CheckpointError, _torch_load

    file = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(64, 64)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a complete torch file.*truncated or damaged"):
        _torch_load(file)
