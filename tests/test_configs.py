"""Every experiment composes and instantiates; bad configs fail early with the key's name."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from fpsa_train.config import ConfigError, TrainConfig, resolve
from fpsa_train.models.build import build_model
from tests.conftest import compose_train

EXPERIMENTS = ["tiny", "wan1_3b", "wan14b"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    overrides = [f"+experiment={experiment}"]
    if experiment != "tiny":
        overrides.append(f"model.weights={tmp_path}")  # the folder only has to be named to compose
    conf = resolve(compose_train(overrides, tmp_path))
    assert isinstance(conf, TrainConfig) and conf.model.name == experiment
    device = None if experiment == "tiny" else "meta"
    model = build_model(conf.model, device=device, load_weights=False)
    assert len(model.blocks) == conf.model.num_layers
    if device == "meta":
        assert all(p.is_meta for p in model.parameters())
    else:
        assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("experiment", ["wan1_3b", "wan14b"])
def test_real_run_without_checkpoint_names_the_key(experiment, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.weights.*local|model\.weights.*Wan2\.1"):
        resolve(compose_train([f"+experiment={experiment}"], tmp_path))


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    conf = resolve(compose_train(["+experiment=wan1_3b", f"model.weights={tmp_path}/nope"], tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(conf.model)


def test_unknown_key_fails_at_compose_with_its_name(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["+experiment=tiny", "model.dimm=3"], tmp_path)
    assert "dimm" in str(err.value) + str(err.value.__cause__)


def test_unknown_top_level_key_fails(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["+experiment=tiny", "optim.learning_rate=3"], tmp_path)
    assert "learning_rate" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_compose(tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_train(["+experiment=tiny", "model.num_layers=two"], tmp_path)
    assert "num_layers" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("model.token_order=zigzag", "model.token_order"),
    ("objective.timestep_sampling=beta", "objective.timestep_sampling"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("optim.ema_decay=1.5", "optim.ema_decay"),
    ("model.num_heads=3", "model.num_heads"),
    ("data.text_dim=32", "data.text_dim"),
])
def test_invalid_value_names_the_key(override, key, tmp_path):
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        resolve(compose_train(["+experiment=tiny", override], tmp_path))


def test_tiny_is_the_default_model(tmp_path):
    conf = resolve(compose_train([], tmp_path))
    assert conf.model.name == "tiny" and conf.model.weights is None and conf.trainer.precision == "auto"
    from fpsa_train.train import resolve_precision

    assert resolve_precision("auto") == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    assert resolve_precision("bf16-true") == "bf16-true"


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
def test_model_checkpoint_is_loaded_by_the_training_path(key_format, tmp_path):
    from fpsa_train.models.checkpoint import save_wan_weights

    conf = resolve(compose_train(["+experiment=tiny"], tmp_path))
    source = build_model(conf.model)
    save_wan_weights(source, tmp_path / "weights", key_format=key_format)
    conf = resolve(compose_train(["+experiment=tiny", f"model.weights={tmp_path / 'weights'}"], tmp_path))
    loaded = build_model(conf.model)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("strategy,precision,expected", [
    ("deepspeed", "bf16-mixed", torch.bfloat16), ("deepspeed", "16-mixed", torch.float16),
    ("deepspeed", "32-true", None), ("ddp", "bf16-mixed", None), ("auto", "bf16-true", torch.bfloat16),
])
def test_weight_dtype_is_the_dtype_the_trainer_keeps(strategy, precision, expected):
    from fpsa_train.config import TrainerConfig
    from fpsa_train.train import weight_dtype

    assert weight_dtype(TrainerConfig(strategy=strategy, precision=precision)) is expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_build_equals_the_fp32_build_cast(dtype, tmp_path):
    """Loading into bf16/fp16 gives exactly the fp32 load cast (what DeepSpeed did before); a random init drawn in
    that dtype has the initialisation's structure; the default dtype is restored, also after an error."""
    from fpsa_train.models.build import default_dtype
    from fpsa_train.models.checkpoint import save_wan_weights

    conf = resolve(compose_train(["+experiment=tiny"], tmp_path))
    source = build_model(conf.model)
    save_wan_weights(source, tmp_path / "weights")
    conf = resolve(compose_train(["+experiment=tiny", f"model.weights={tmp_path / 'weights'}"], tmp_path))
    loaded = build_model(conf.model, dtype=dtype)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == dtype and torch.equal(a.to(dtype), b), name

    random = build_model(resolve(compose_train(["+experiment=tiny"], tmp_path)).model, dtype=dtype)
    assert {p.dtype for p in random.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32
    assert not random.head.head.weight.any() and not random.blocks[0].ffn[0].bias.any()
    w = random.blocks[0].ffn[0].weight.float()  # xavier-uniform: std √(2 / (fan_in + fan_out))
    assert abs(w.std().item() / (2 / sum(w.shape)) ** 0.5 - 1) < 0.1
    with pytest.raises(RuntimeError, match="inside"), default_dtype(dtype):
        assert torch.get_default_dtype() == dtype
        raise RuntimeError("inside")
    assert torch.get_default_dtype() == torch.float32


def test_train_builds_the_model_in_the_kept_dtype(tmp_path, caplog):
    from fpsa_train.train import train

    with caplog.at_level("INFO", logger="fpsa_train.train"):
        metrics = train(compose_train(["+experiment=tiny", "data=synthetic", "fps=dense", "trainer.max_steps=2",
                                       "trainer.precision=bf16-true", "logger.wandb=false"], tmp_path))
    assert "parameters (bfloat16)" in caplog.text and metrics["steps"] == 2
    assert math.isfinite(metrics["train/loss"])  # trained in bf16 to a finite loss


@pytest.mark.parametrize("tool, key", [("preprocess", "fps"), ("sample", "fps"), ("export", "dtype")])
def test_tool_keys_named_like_a_training_group_compose(tool, key):
    """Regression: `python -m fpsa_train.preprocess ... fps=16` failed ("Config group override must be a string or a
    list") while the CLIs' configs sat beside the training groups, `fps/` among them."""
    import importlib

    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIGS

    importlib.import_module(f"fpsa_train.{tool}")  # registers the tool's schema
    value = {"fps": "16", "dtype": "float32"}[key]
    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        cfg = compose(config_name=tool, overrides=[f"{key}={value}"])
    assert str(cfg[key]) in (value, f"{value}.0")


@pytest.mark.parametrize("tool", ["sample", "evaluate"])
def test_sampling_tools_take_kernel_forward_and_refuse_a_bad_one(tool):
    """`kernel_forward` (the FP8 kernel's inference forward) composes with the sampling CLIs, default triton; a bad
    value fails when the config is resolved, naming the key and the choices."""
    import importlib

    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIGS

    importlib.import_module({"sample": "fpsa_train.sample", "evaluate": "fpsa_train.eval.config"}[tool])
    base = ["deploy=d", "prompt=p"] if tool == "sample" else ["candidates=[d]"]
    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        assert resolve(compose(config_name=tool, overrides=base)).kernel_forward == "triton"
        assert resolve(compose(config_name=tool, overrides=[*base, "kernel_forward=gluon"])).kernel_forward == "gluon"
        with pytest.raises((ConfigError, ValueError), match=r"kernel_forward='cuda'.*'triton', 'gluon'"):
            resolve(compose(config_name=tool, overrides=[*base, "kernel_forward=cuda"]))


@pytest.mark.parametrize("override", ["+model.dimm=3", "++model.dimm=3", "+trainer.max_stepz=3", "+dimm=3",
                                      "+fps.regimes.0.sparsity.windoww=[1,1,1]"])
def test_adding_an_unknown_key_with_plus_fails_naming_it(override, tmp_path):
    """Regression: `+model.dimm=3` (the form Hydra's own error message suggests) was accepted and ignored."""
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key `{key}`.*fix the name"):
        resolve(compose_train(["+experiment=tiny", override], tmp_path))


def test_unknown_key_message_suggests_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean `model\.dim`"):
        resolve(compose_train(["+experiment=tiny", "+model.dimm=3"], tmp_path))


@pytest.mark.parametrize("data", [["data=synthetic", "data.latent_frames=3", "data.latent_height=8",
                                   "data.latent_width=8"],
                                  ["data.num_frames=9", "data.buckets=[[64,64],[32,64]]"]])
def test_topk_larger_than_the_clips_tile_count_is_logged_before_training(data, tmp_path, caplog):
    """Regression: training accepted a top-k above the token grid's tile count in silence (a regime that is dense
    for those clips; the diffusers path refuses it)."""
    overrides = ["+experiment=tiny", *data, "fps.regimes.2.sparsity.pattern=topk", "fps.regimes.2.sparsity.window=null"]
    with caplog.at_level("WARNING", logger="fpsa_train.config"):
        resolve(compose_train([*overrides, "fps.regimes.2.sparsity.topk=50"], tmp_path))
    assert re.search(r"regime 'late': topk=50 exceeds the \d+ tiles.*trains dense.*sparsity\.topk", caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fpsa_train.config"):
        resolve(compose_train([*overrides, "fps.regimes.2.sparsity.topk=1"], tmp_path))  # within the grid
    assert "exceeds" not in caplog.text


@pytest.mark.parametrize("experiment", ["demo_base", "proving", "demo_qat", "demo"])
def test_world_experiments_compose_at_the_sizes_their_comments_state(experiment, tmp_path):
    """The proving ground must be a grid where sparsity means something (issue 17: ≥ 48 tiles) at a head size the
    Hopper kernel runs; the others are the demo's small grid. Tiles per axis: latent size / patch / tile, rounded up
    (a partial last tile counts)."""
    conf = resolve(compose_train([f"+experiment={experiment}"], tmp_path))
    m, d = conf.model, conf.data
    assert m.dim // m.num_heads in (64, 128)
    (h, w), frames = d.buckets[0], d.num_frames
    latent = ((frames - 1) // 4 + 1, h // 8 // m.patch_size[1], w // 8 // m.patch_size[2])  # tokens per axis
    tiles = math.prod(math.ceil(n / t) for n, t in zip(latent, m.tile_shape))
    expected = {"proving": (1280, 48)}.get(experiment, (320, 12))
    assert (math.prod(latent), tiles) == expected
    if experiment != "demo_base":  # the others start from the shipped base, which must load into them
        model = build_model(conf.model, device="cpu", load_weights=True)
        assert sum(p.numel() for p in model.parameters()) == 4_813_120
