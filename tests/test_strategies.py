"""Every trainer config composes with every experiment and becomes the Lightning strategy it names; wan14b
defaults to ZeRO-3 with activation checkpointing and bf16; ZeRO-3's partitioned EMA round-trips."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from fpsa_train.config import ConfigError, resolve
from fpsa_train.lit.ema import EMA, consolidate_partitions
from fpsa_train.lit.strategy import CPUDeepSpeedStrategy, FPSDeepSpeedStrategy, build_strategy, deepspeed_config
from tests.conftest import compose_train

TRAINERS = ["default", "ddp", "zero2", "zero3", "zero3_offload"]
EXPERIMENTS = ["tiny", "wan1_3b", "wan14b"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes_with_every_experiment(trainer, experiment, tmp_path):
    overrides = [f"+experiment={experiment}", f"trainer={trainer}", "trainer.devices=8", "trainer.num_nodes=2"]
    if experiment != "tiny":
        overrides.append(f"model.weights={tmp_path}")
    conf = resolve(compose_train(overrides, tmp_path)).trainer
    assert conf.devices == 8 and conf.num_nodes == 2
    strategy = build_strategy(conf, on_cpu=False, micro_batch=1)
    if trainer == "default":
        assert strategy == "auto"
    elif trainer == "ddp":
        assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    else:
        assert type(strategy) is FPSDeepSpeedStrategy
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == (2 if trainer == "zero2" else 3)
        offload = trainer == "zero3_offload"
        assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload


def test_wan14b_defaults_to_zero3_with_activation_checkpointing_and_bf16(tmp_path):
    conf = resolve(compose_train(["+experiment=wan14b", f"model.weights={tmp_path}"], tmp_path))
    assert conf.trainer.strategy == "deepspeed" and conf.trainer.deepspeed.stage == 3
    assert conf.model.activation_checkpointing and conf.trainer.precision == "bf16-mixed"
    assert not conf.trainer.deepspeed.offload_params  # offload is the zero3_offload config's choice


def test_cpu_strategies_talk_gloo(tmp_path):
    ddp = build_strategy(resolve(compose_train(["trainer=ddp"], tmp_path)).trainer, on_cpu=True, micro_batch=4)
    assert ddp._process_group_backend == "gloo"
    zero = build_strategy(resolve(compose_train(["trainer=zero3"], tmp_path)).trainer, on_cpu=True, micro_batch=4)
    assert isinstance(zero, CPUDeepSpeedStrategy) and zero._process_group_backend == "gloo"
    assert zero.config["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("override, key", [
    ("trainer.deepspeed.stage=1", "trainer.deepspeed.stage"),
    ("trainer.strategy=fsdp", "trainer.strategy"),
    ("trainer.sp_size=0", "trainer.sp_size"),
    ("trainer.sp_size=3", "trainer.sp_size"),  # the tiny model has 4 heads
    ("logger.wandb_mode=cloud", "logger.wandb_mode"),
    ("val_video.frames=8", "val_video.frames"),
])
def test_bad_scale_out_values_name_their_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(compose_train([override], tmp_path))


def test_offload_params_needs_zero3(tmp_path):
    with pytest.raises(ConfigError, match="offload_params=true needs trainer.deepspeed.stage=3"):
        resolve(compose_train(["trainer=zero2", "trainer.deepspeed.offload_params=true"], tmp_path))
    cfg = resolve(compose_train(["trainer=zero3_offload"], tmp_path)).trainer
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"


def test_ema_of_zero3_partitions_consolidates_to_the_full_average():
    """Each rank averages its flat ZeRO-3 slice (p.ds_tensor); joined in rank order and trimmed, the slices give
    exactly the EMA that an unpartitioned run computes."""
    torch.manual_seed(0)
    shapes = {"w": (3, 5), "b": (7,)}
    full = {n: torch.randn(s) for n, s in shapes.items()}
    world = 2

    def partitioned(values: dict) -> list[torch.nn.Module]:
        ranks = []
        for r in range(world):
            m = torch.nn.Module()
            for n, t in values.items():
                part = -(-t.numel() // world)  # ceil, as DeepSpeed partitions
                flat = torch.nn.functional.pad(t.reshape(-1), (0, part * world - t.numel()))
                p = torch.nn.Parameter(torch.empty(0))
                p.ds_tensor = flat[r * part:(r + 1) * part].clone()
                m.register_parameter(n, p)
            ranks.append(m)
        return ranks

    plain = torch.nn.Module()
    for n, t in full.items():
        plain.register_parameter(n, torch.nn.Parameter(t.clone()))
    ema_plain, emas = EMA(0.9).attach(plain), [EMA(0.9).attach(m) for m in partitioned(full)]
    assert all(e.partitioned for e in emas) and not ema_plain.partitioned
    update = {n: torch.randn(s) for n, s in shapes.items()}
    for n, t in update.items():
        plain.get_parameter(n).data.copy_(t)
    for e, m in zip(emas, partitioned(update)):
        e.update(m)
    ema_plain.update(plain)
    joined = consolidate_partitions([e.state_dict() for e in emas], shapes)
    assert all(torch.equal(joined[n], ema_plain.shadow[n]) for n in shapes)

    fresh = EMA(0.9)
    fresh.load_state_dict(emas[1].state_dict())  # a checkpoint loaded before attach is applied at attach
    fresh.attach(partitioned(full)[1])
    assert torch.equal(fresh.shadow["w"], emas[1].shadow["w"])
    with pytest.raises(ValueError, match="same strategy and world size"):
        EMA(0.9).attach(plain).load_state_dict(emas[0].state_dict())
