"""End-to-end training of the tiny DiT through Lightning + Hydra config: the loss falls, checkpoints resume."""

from __future__ import annotations

import os

import torch

from fpsa_train.flow import noisy_input, sample_sigma, shift_sigma
from fpsa_train.config import ObjectiveConfig
from fpsa_train.train import train
from tests.conftest import compose_train

SHORT = ["+experiment=tiny", "data=synthetic", "fps=dense", "trainer.max_steps=60", "trainer.val_every_n_steps=30",
         "trainer.checkpoint_every_n_steps=30", "data.num_samples=128", "data.val_samples=16", "seed=3"]


def test_short_run_on_fixed_seed_lowers_the_loss(tmp_path):
    metrics = train(compose_train(SHORT, tmp_path))
    assert metrics["steps"] == 60
    assert metrics["val/loss_end"] < 0.6 * metrics["val/loss_start"], metrics
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert "last.ckpt" in ckpts and "step0000060.ckpt" in ckpts
    assert not [f for f in ckpts if ".tmp" in f]  # atomic writes leave no temporaries
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 60 and set(state["ema"]) == {k[len("model."):] for k in state["state_dict"]}


def test_resume_continues_from_checkpoint(tmp_path):
    first = train(compose_train([*SHORT, "trainer.max_steps=30"], tmp_path))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ema_before = torch.load(ckpt, weights_only=True)["ema"]
    metrics = train(compose_train([*SHORT, "trainer.max_steps=40", f"trainer.resume={ckpt}"], tmp_path / "b"))
    assert metrics["steps"] == 40  # 30 restored + 10 new
    # the resumed session's starting loss is the restored weights' (the first session's last), not the init's
    assert abs(metrics["val/loss_start"] - first["val/loss_end"]) <= 1e-5 * first["val/loss_end"], (first, metrics)
    ema_after = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["ema"]
    name = next(iter(ema_before))
    assert not torch.equal(ema_before[name], ema_after[name])  # the restored average kept moving


def test_sigma_sampling_and_shift():
    cfg = ObjectiveConfig(timestep_sampling="logit_normal", shift=1.0)
    s = sample_sigma(20_000, cfg, generator=torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.02
    shifted = sample_sigma(20_000, ObjectiveConfig(shift=3.0), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_sigma(s, 3.0)) and shifted.median() > 0.7  # shift moves mass to noise
    u = sample_sigma(20_000, ObjectiveConfig(timestep_sampling="uniform", shift=1.0),
                     generator=torch.Generator().manual_seed(0))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.01


def test_flow_pair_endpoints():
    x0, noise = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    x, v = noisy_input(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x[0], x0[0]) and torch.equal(x[1], noise[1]) and torch.equal(v, noise - x0)
