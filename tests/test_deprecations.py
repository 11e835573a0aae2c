"""Old config spellings keep working, each with a warning that names its replacement; old and new given different
values is an error naming both (fpsa_train/deprecation.py lists the renames)."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir

from fpsa_train.config import ConfigError, ModelConfig, resolve
from tests.conftest import CONFIGS, compose_train

DEPRECATION = "fpsa_train.deprecation"


@pytest.fixture
def warned(caplog):
    """The deprecation warnings logged so far, as one string."""
    caplog.set_level(logging.WARNING, logger=DEPRECATION)
    return lambda: "\n".join(r.getMessage() for r in caplog.records if r.name == DEPRECATION)


# model.checkpoint → model.weights (training and calibrate; the pretrained weights a model is built from)

@pytest.mark.parametrize("experiment", ["wan1_3b", "tiny"])  # model.weights `???` and null
def test_model_checkpoint_on_the_command_line_sets_model_weights(experiment, tmp_path, warned):
    cfg = compose_train([f"+experiment={experiment}", f"model.checkpoint={tmp_path}"], tmp_path)
    conf = resolve(cfg)
    assert conf.model.weights == str(tmp_path) and conf.model.checkpoint is None
    assert cfg.model.weights == str(tmp_path)  # the composed config (what the run records) says it the new way
    assert "`model.checkpoint` is deprecated" in warned() and "use `model.weights`" in warned()


def test_model_checkpoint_null_still_means_random_initialisation(tmp_path, warned):
    conf = resolve(compose_train(["+experiment=wan1_3b", "model.checkpoint=null"], tmp_path))
    assert conf.model.weights is None and "model.weights" in warned()


def test_model_checkpoint_in_a_users_yaml(tmp_path, warned):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: wan1_3b\nmodel:\n  checkpoint: /data/Wan2.1-T2V-1.3B\n")
    conf = resolve(compose_train(["+experiment=mine", f"hydra.searchpath=[file://{tmp_path}]"], tmp_path))
    assert conf.model.weights == "/data/Wan2.1-T2V-1.3B" and "use `model.weights`" in warned()


def test_model_checkpoint_and_weights_both_given(tmp_path, warned):
    same = resolve(compose_train(["+experiment=wan1_3b", "model.weights=/w", "model.checkpoint=/w"], tmp_path))
    assert same.model.weights == "/w"
    for overrides in (["+experiment=wan1_3b", "model.weights=/w", "model.checkpoint=/other"],
                      ["+experiment=demo", "model.checkpoint=/other"]):  # demo sets model.weights itself
        with pytest.raises(ConfigError, match=r"model\.checkpoint='/other' and model\.weights='.+' are both given"):
            resolve(compose_train(overrides, tmp_path))


def test_model_checkpoint_in_python(warned):
    assert ModelConfig(checkpoint="/w").weights == "/w" and "model.weights" in warned()
    assert ModelConfig(weights="/w").weights == "/w" and "model.weights" in warned()
    with pytest.raises(ConfigError, match="model.checkpoint='/a' and model.weights='/b'"):
        ModelConfig(weights="/b", checkpoint="/a")


# calibrate: weights=<path> → checkpoint=, use_ema → weights=auto|live, reference_checkpoint → reference_weights

def calibrate_conf(tmp_path, *overrides):
    import fpsa_train.calibrate  # noqa: F401  (registers its schema)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return resolve(compose(config_name="calibrate", overrides=[f"output={tmp_path}/s.yaml", *overrides]))


def test_calibrate_defaults_use_no_deprecated_key(tmp_path, warned):
    conf = calibrate_conf(tmp_path)
    assert (conf.checkpoint, conf.weights, conf.reference_weights) == (None, "auto", None) and not warned()


@pytest.mark.parametrize("old, new", [
    (["weights=run/last.ckpt"], dict(checkpoint="run/last.ckpt", weights="auto")),
    (["weights=run/last.ckpt", "use_ema=false"], dict(checkpoint="run/last.ckpt", weights="live")),
    (["checkpoint=c.ckpt", "use_ema=true"], dict(checkpoint="c.ckpt", weights="auto")),
    (["checkpoint=c.ckpt", "use_ema=false"], dict(checkpoint="c.ckpt", weights="live")),
    (["checkpoint=c.ckpt", "weights=model"], dict(checkpoint="c.ckpt", weights="live")),
    (["weights=null"], dict(checkpoint=None, weights="auto")),  # the old default: no training checkpoint
    (["reference_checkpoint=dense.safetensors"], dict(reference_weights="dense.safetensors")),
])
def test_calibrate_old_spellings(old, new, tmp_path, warned):
    conf = calibrate_conf(tmp_path, *old)
    assert {k: getattr(conf, k) for k in new} == new
    assert conf.use_ema is None and conf.reference_checkpoint is None
    named = {"weights=run": "use `checkpoint`", "use_ema": "use `weights`", "weights=model": "use weights=live",
             "reference_checkpoint": "use `reference_weights`"}
    for spelling, replacement in named.items():
        if any(o.startswith(spelling) for o in old):
            assert replacement in warned(), warned()


@pytest.mark.parametrize("both, keys", [
    (["weights=run/last.ckpt", "checkpoint=other.ckpt"], r"weights='run/last.ckpt' and checkpoint='other.ckpt'"),
    (["use_ema=false", "weights=ema"], r"use_ema=False and weights='ema'"),
    (["use_ema=true", "weights=live"], r"use_ema=True and weights='live'"),
    (["reference_checkpoint=a", "reference_weights=b"], r"reference_checkpoint='a' and reference_weights='b'"),
])
def test_calibrate_old_and_new_keys_disagreeing_is_an_error(both, keys, tmp_path):
    with pytest.raises(ConfigError, match=keys + " are both given"):
        calibrate_conf(tmp_path, *both)


# the weight choice `model` → `live` (export, training-checkpoint reader, validation videos)

def test_export_weights_model_means_live(warned):
    from fpsa_train.export import ExportConfig

    assert ExportConfig(checkpoint="c", out="o", weights="model").weights == "live"
    assert "weights=model is deprecated: use weights=live" in warned()
    with pytest.raises(ConfigError, match=r"weights='raw': expected one of \('auto', 'ema', 'live'\)"):
        ExportConfig(checkpoint="c", out="o", weights="raw")


def test_pick_weights_model_means_live(warned):
    import torch

    from fpsa_train.lit.training_checkpoint import TrainingCheckpoint, pick_weights

    ckpt = TrainingCheckpoint({"w": torch.zeros(1)}, {"w": torch.ones(1)}, None, 0, "lightning", "c")
    assert pick_weights(ckpt, "model")[1] == "live" and pick_weights(ckpt, "auto")[1] == "ema"
    assert "use weights=live" in warned()


def test_val_video_weights(tmp_path, warned):
    conf = resolve(compose_train(["+experiment=tiny"], tmp_path))
    assert conf.val_video.weights == "auto"
    model = resolve(compose_train(["+experiment=tiny", "val_video.weights=model"], tmp_path))
    assert model.val_video.weights == "live" and "val_video.weights=model is deprecated" in warned()
    # `ema` asks for the EMA: a run that keeps none is refused when it would sample videos (auto takes the live ones)
    no_ema = ["+experiment=tiny", "optim.ema_decay=0", "val_video.every_n_steps=10"]
    with pytest.raises(ConfigError, match="val_video.weights=ema, but optim.ema_decay=0"):
        resolve(compose_train([*no_ema, "val_video.weights=ema"], tmp_path))
    assert resolve(compose_train(no_ema, tmp_path)).val_video.weights == "auto"


def test_a_deploy_folder_that_records_model_weights_re_exports_with_live():
    """Exports made before the rename record `source.weights: model`; the re-export command says `live`."""
    from pathlib import Path

    from fpsa_train.deploy import reexport_command

    manifest = {"source": {"checkpoint": "/r/last.ckpt", "weights": "model", "schedule": "checkpoint"}}
    assert reexport_command(Path("/d"), manifest) == \
        "python -m fpsa_train.export checkpoint=/r/last.ckpt out=/d overwrite=true weights=live"
