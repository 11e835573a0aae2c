"""Export: a training checkpoint → a verified deploy folder, loaded back by the runtime with the same outputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fpsa_train.export as export_mod
from fpsa_train.atomic import temp_sibling
from fpsa_train.deploy import DeployError, load_deploy, model_config, verify_deploy
from fpsa_train.export import ExportConfig, expected_bytes, export
from fpsa_train.fps.schedule import schedule_from_data
from fpsa_train.fps.transform import apply_fps_attention
from fpsa_train.lit.training_checkpoint import read_training_checkpoint
from fpsa_train.models.checkpoint import load_wan_weights
from fpsa_train.models.config import WAN_1_3B, WAN_14B, WanConfig
from fpsa_train.models.state_dict import to_diffusers
from fpsa_train.models.wan import WanModel


def _export(ckpt: Path, out: Path, **kw) -> dict:
    return export(ExportConfig(checkpoint=str(ckpt), out=str(out), **kw))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        out.update(load_file(f))
    return out


def trained_model(ckpt: Path, weights: str = "ema", round_to: torch.dtype | None = None) -> WanModel:
    """The trained DiT as training built it (FPS attention from the run's schedule), with the checkpoint's weights,
    optionally rounded to the export dtype and back (what an export in that dtype stores)."""
    state = read_training_checkpoint(ckpt)
    cfg = model_config(state.run_config)
    model = WanModel(cfg).eval()
    schedule = schedule_from_data(state.run_config["schedule"], tuple(cfg.tile_shape))
    apply_fps_attention(model, schedule, backend="reference")
    sd = {**state.weights, **(state.ema if weights == "ema" else {})}
    if round_to is not None:
        sd = {k: v.to(round_to).float() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
def test_round_trip_in_both_key_formats(trained_checkpoint, tmp_path, key_format):
    report = _export(trained_checkpoint, tmp_path / "deploy", key_format=key_format)
    out = Path(report["out"])
    assert report["weights"] == "ema" and sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "fps_selectors.safetensors", "manifest.json",
        "schedule.json"]
    manifest = verify_deploy(out)
    assert manifest["key_format"] == key_format and manifest["source"]["weights"] == "ema"
    assert manifest["kernel"]["quant_groups"] == ["subtile", "tile", "tiles"]
    assert manifest["kernel"]["sparsity_patterns"] == ["dense", "learned", "window_topk"]

    state = read_training_checkpoint(trained_checkpoint)
    expected = {k: v for k, v in state.ema.items() if "self_attn.core." not in k}
    stored = _weights(out)
    if key_format == "diffusers":
        expected = to_diffusers(expected)
        assert json.loads((out / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert stored.keys() == expected.keys()
    for k, v in expected.items():  # the EMA weights, rounded to bf16 once
        assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], v.to(torch.bfloat16)), k
    selectors = load_file(out / "fps_selectors.safetensors")
    assert selectors and all(torch.equal(v, state.ema[k]) for k, v in selectors.items())
    exported = json.loads((out / "schedule.json").read_text())
    assert exported == state.run_config["schedule"]

    model = WanModel(model_config(manifest))  # our loader reads either format back to the same values
    load_wan_weights(model, out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state.ema[k].to(torch.bfloat16).float()), k


def test_diffusers_export_loads_in_diffusers(trained_checkpoint, tmp_path):
    from diffusers import WanTransformer3DModel

    out = Path(_export(trained_checkpoint, tmp_path / "d", key_format="diffusers")["out"])
    theirs = WanTransformer3DModel.from_pretrained(out).state_dict()  # fp32 parameters, the bf16 values loaded
    stored = _weights(out)
    assert theirs.keys() == stored.keys()
    assert all(torch.equal(theirs[k], v.float()) for k, v in stored.items())


def test_live_weights_on_request(trained_checkpoint, tmp_path):
    out = Path(_export(trained_checkpoint, tmp_path / "m", weights="live", dtype="float32")["out"])
    state = read_training_checkpoint(trained_checkpoint)
    stored = _weights(out)
    assert json.loads((out / "manifest.json").read_text())["source"]["weights"] == "live"
    assert all(torch.equal(v, state.weights[k]) for k, v in stored.items())
    assert any(not torch.equal(state.weights[k], state.ema[k]) for k in stored)  # the two really differ


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_model_equals_trained_model_per_regime(trained_checkpoint, tmp_path, dtype):
    """The runtime's denoiser output equals the trained model's (same weights: in bf16, rounded as stored) for the
    same inputs and σ, in every regime of the schedule."""
    out = _export(trained_checkpoint, tmp_path / dtype, dtype=dtype)["out"]
    deployed = load_deploy(out, backend="reference")
    ours = trained_model(trained_checkpoint, round_to=torch.bfloat16 if dtype == "bfloat16" else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 16, generator=g)
    text = torch.randn(2, 5, 64, generator=g)
    for regime in deployed.schedule.regimes:
        sigma = torch.full((2,), (regime.lo + regime.hi) / 2)
        with torch.no_grad():
            ref = ours(x, sigma * 1000, text, attn_kwargs={"sigma": sigma})
        got = deployed.denoise(x, sigma, text)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= 1e-6, f"{regime.name}: relative error {err:.3g} (max abs {(got - ref).abs().max():.3g})"
    dense = WanModel(ours.cfg).eval()  # not vacuous: FPS attention is really in the loop
    dense.load_state_dict({k: v for k, v in ours.state_dict().items() if "self_attn.core." not in k})
    with torch.no_grad():
        plain = dense(x, sigma * 1000, text)
    assert ((plain - got).norm() / plain.norm()).item() > 1e-3  # FP8 + sparsity vs dense: far above the 1e-6


def test_tampered_missing_or_unlisted_files_are_refused(trained_checkpoint, tmp_path):
    out = Path(_export(trained_checkpoint, tmp_path / "t")["out"])
    verify_deploy(out)
    weights = out / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(DeployError, match="diffusion_pytorch_model.safetensors has changed"):
        load_deploy(out)

    out = Path(_export(trained_checkpoint, tmp_path / "t2")["out"])
    (out / "schedule.json").unlink()
    (out / "extra.safetensors").write_bytes(b"0")
    with pytest.raises(DeployError, match="schedule.json is missing.*extra.safetensors is not in the manifest"):
        load_deploy(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DeployError, match="no manifest.json"):
        load_deploy(out)


def test_failed_export_leaves_no_folder_and_keeps_the_old_one(trained_checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full (simulated after the weights were written)")

    monkeypatch.setattr(export_mod, "file_entries", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        _export(trained_checkpoint, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary is left

    monkeypatch.undo()
    old = Path(_export(trained_checkpoint, tmp_path / "old")["out"])
    before = (old / "manifest.json").read_text()
    monkeypatch.setattr(export_mod, "file_entries", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        _export(trained_checkpoint, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "manifest.json").read_text() == before
    verify_deploy(old)


def test_existing_folder_needs_overwrite(trained_checkpoint, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        _export(trained_checkpoint, tmp_path / "x")
    _export(trained_checkpoint, tmp_path / "x", overwrite=True)
    verify_deploy(tmp_path / "x")


def test_sharded_export_round_trips(trained_checkpoint, tmp_path):
    out = Path(_export(trained_checkpoint, tmp_path / "s", max_shard_gb=200 * 2**-30)["out"])  # 200-byte shards
    shards = sorted(out.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 5 and (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    deployed = load_deploy(out)
    single = load_deploy(_export(trained_checkpoint, tmp_path / "one")["out"])
    assert all(torch.equal(v, single.model.state_dict()[k]) for k, v in deployed.model.state_dict().items())


def test_expected_bytes_match_an_export_and_the_published_sizes(trained_checkpoint, tmp_path):
    out = Path(_export(trained_checkpoint, tmp_path / "e")["out"])
    with safe_open(out / "diffusion_pytorch_model.safetensors", "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 2  # bf16
    cfg = model_config(json.loads((out / "manifest.json").read_text()))
    assert expected_bytes(cfg) == stored
    assert expected_bytes(WanConfig(**WAN_1_3B)) == 2 * 1_418_996_800  # reference/wan.md §1: 1.419 B parameters
    assert abs(expected_bytes(WanConfig(**WAN_14B)) / 2 - 14.288e9) < 1e6


def test_non_training_checkpoints_are_refused(tmp_path, trained_checkpoint):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        _export(tmp_path / "other.pt", tmp_path / "o")
    state = torch.load(trained_checkpoint, weights_only=True)
    del state["fpsa_run_config"]
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="fpsa_run_config"):
        _export(tmp_path / "old.ckpt", tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        _export(tmp_path / "nope.ckpt", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_schedule_file_replaces_the_checkpoints_schedule(trained_checkpoint, tmp_path):
    """A calibrated schedule without learned regimes: exported, and the trained selectors it no longer uses are not."""
    repo = Path(__file__).resolve().parents[1]
    out = Path(_export(trained_checkpoint, tmp_path / "c", schedule_file=str(repo / "configs/fps/default.yaml"))["out"])
    assert not (out / "fps_selectors.safetensors").exists()
    deployed = load_deploy(out)
    assert [r.pattern for r in deployed.schedule.regimes] == ["window_topk", "dense", "window"]
    assert json.loads((out / "manifest.json").read_text())["source"]["schedule"].endswith("default.yaml")
    bad = tmp_path / "learned.yaml"
    bad.write_text("regimes:\n  - {name: other, sigma: [0, 1], quant: {group: tile},\n"
                   "     sparsity: {pattern: learned, target_density: 0.5}}\n")
    with pytest.raises(ValueError, match="selectors.other"):
        _export(trained_checkpoint, tmp_path / "b", schedule_file=str(bad))


def test_a_schedule_file_with_fps_off_exports_a_dense_deploy(trained_checkpoint, tmp_path):
    """configs/fps/dense.yaml says `enabled: false`: the deploy runs dense SDPA (no schedule), as a `fps=dense` run's
    export does, not the FPS path with a dense regime."""
    repo = Path(__file__).resolve().parents[1]
    out = Path(_export(trained_checkpoint, tmp_path / "d", schedule_file=str(repo / "configs/fps/dense.yaml"))["out"])
    assert json.loads((out / "schedule.json").read_text()) == {"regimes": []}
    deployed = load_deploy(out)
    assert deployed.schedule is None and "dense SDPA" in deployed.backend


# ---------------------------------------------------------------------------- the manifest is verified too


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory) -> Path:
    """One deploy folder; tests edit copies of it."""
    return Path(_export(trained_checkpoint, tmp_path_factory.mktemp("exported") / "deploy")["out"])


def copy_with_manifest(exported: Path, folder: Path, edit=None) -> Path:
    """A copy of the deploy folder whose manifest is `edit`ed (in place, on the parsed JSON) and re-serialised."""
    shutil.copytree(exported, folder)
    if edit is not None:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


# Every part of the manifest the runtime or the sampler reads. Before the manifest hashed itself, the first two
# loaded without error and changed the output by 0.2–0.25% (RoPE θ 1e4 → 1e3) and 0.09–1.3% (tile 2×4×4 → 2×2×8).
MANIFEST_EDITS = {
    "model.rope_theta": lambda m: m["model"].update(rope_theta=1000.0),
    "model.tile_shape": lambda m: m["model"].update(tile_shape=[2, 2, 8]),
    "key_format": lambda m: m.update(key_format="diffusers"),
    "kernel.quant_groups": lambda m: m["kernel"].update(quant_groups=["tile"]),
    "sampling.num_train_timesteps": lambda m: m["sampling"].update(num_train_timesteps=500),
    "sampling.video": lambda m: m["sampling"].update(video={"height": 64, "width": 64, "frames": 5}),
    "files": lambda m: m["files"].pop("config.json"),
}


@pytest.mark.parametrize("field", sorted(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused_naming_it_and_the_fix(exported, tmp_path, field):
    folder = copy_with_manifest(exported, tmp_path / "d", MANIFEST_EDITS[field])
    fix = rf"re-export: python -m fpsa_train\.export checkpoint=\S+\.ckpt out={re.escape(str(folder))} " \
          r"overwrite=true"
    for verify in (True, False):  # the manifest's own hash costs nothing: checked even without the file hashes
        with pytest.raises(DeployError, match=rf"manifest\.json has been edited since export: .*{fix}"):
            load_deploy(folder, backend="reference", verify=verify)


def test_a_reformatted_manifest_still_loads(exported, tmp_path):
    """The hash is over canonical JSON (sorted keys, no whitespace): indentation and key order do not matter."""
    folder = copy_with_manifest(exported, tmp_path / "d")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=4))
    assert (folder / "manifest.json").read_text() != (exported / "manifest.json").read_text()
    assert load_deploy(folder, backend="reference").manifest["format_version"] == 2


def test_a_format_version_1_folder_is_refused_with_the_reexport_command(exported, tmp_path):
    """Version 1 manifests carry no hash over the model config, so they cannot be verified: refused, with the exact
    export command that rewrites the folder from the checkpoint the manifest names."""
    def as_version_1(m):
        m.pop("manifest_sha256", None)
        m["format_version"] = 1

    folder = copy_with_manifest(exported, tmp_path / "d", as_version_1)
    checkpoint = json.loads((exported / "manifest.json").read_text())["source"]["checkpoint"]
    command = f"python -m fpsa_train.export checkpoint={checkpoint} out={folder} overwrite=true weights=ema"
    with pytest.raises(DeployError, match=r"format_version 1 \(an older fpsa's export.*Re-export: ") as err:
        load_deploy(folder)
    assert str(err.value).endswith(command)


# ------------------------------------------------------------------------- leftovers of a killed export

STALLED_EXPORT = """
import sys, time
import fpsa_train.export as export
def stall(folder):  # killed here: weights, selectors and schedule written, no manifest yet
    print("written", flush=True)
    time.sleep(600)
export.file_entries = stall
export.export(export.ExportConfig(checkpoint=sys.argv[1], out=sys.argv[2]))
"""


def test_the_next_export_removes_a_killed_exports_leftover(trained_checkpoint, tmp_path):
    """An export SIGKILLed mid-way leaves its hidden temporary folder (the weights); the next export to the same
    `out` removes it, and leaves a running export's alone."""
    out = tmp_path / "d"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", STALLED_EXPORT, str(trained_checkpoint), str(out)], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"written\n", proc.stderr.read().decode()[-2000:]
    finally:
        proc.kill()
        proc.wait()
    killed = [p.name for p in tmp_path.iterdir()]
    assert len(killed) == 1 and killed[0].startswith(".d.tmp-"), killed
    running = temp_sibling(out, "tmp")  # this process's: alive, so a concurrent export to keep
    running.mkdir()

    _export(trained_checkpoint, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", running.name])
    verify_deploy(out)


def test_training_with_a_schedule_file_that_turns_fps_off_trains_dense(tmp_path):
    """`fps.schedule_file=configs/fps/dense.yaml` with an FPS config (`enabled: true`): the file decides, so the run
    trains with dense SDPA and records no schedule, as `fps=dense` does (fpsa_train.fps.schedule.fps_enabled)."""
    from fpsa_train.config import resolve
    from fpsa_train.fps.schedule import FPSConfig, fps_enabled
    from fpsa_train.train import train
    from tests.conftest import EXPORT_RUN, compose_train

    dense = str(Path(__file__).resolve().parents[1] / "configs/fps/dense.yaml")
    assert not fps_enabled(FPSConfig(schedule_file=dense)) and fps_enabled(FPSConfig())
    conf = resolve(compose_train([*EXPORT_RUN, f"fps.schedule_file={dense}", "trainer.max_steps=1"], tmp_path))
    assert conf.fps.enabled  # the config's own flag, overruled by the file
    train(conf)
    out = Path(_export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "deploy")["out"])
    assert json.loads((out / "schedule.json").read_text()) == {"regimes": []}
    assert load_deploy(out).schedule is None
