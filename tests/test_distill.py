"""Self-distillation (objective.teacher=dense): the target is a frozen dense copy of the starting weights; the
teacher is neither trained nor saved; bad combinations fail at compose time naming the key."""

from __future__ import annotations

import pytest
import torch

from fpsa_train.config import ConfigError, ObjectiveConfig, OptimConfig, resolve
from fpsa_train.fps.schedule import Schedule
from fpsa_train.fps.transform import apply_fps_attention
from fpsa_train.lit.module import FlowMatchingModule
from fpsa_train.models.build import build_model
from fpsa_train.models.checkpoint import save_wan_weights
from fpsa_train.train import train
from tests.conftest import compose_train

RUN = ["+experiment=tiny", "data=synthetic", "trainer.max_steps=4", "trainer.val_every_n_steps=100",
       "trainer.checkpoint_every_n_steps=100", "data.num_samples=8", "data.val_samples=4", "data.batch_size=4",
       "seed=2"]


def _batch(conf, n=2):
    g = torch.Generator().manual_seed(0)
    lat = (conf.model.in_dim, conf.data.latent_frames, conf.data.latent_height, conf.data.latent_width)
    return {"latents": torch.randn(n, *lat, generator=g),
            "context": torch.randn(n, 7, conf.model.text_dim, generator=g)}


def _module(conf, teacher_weights, distill_weight=1.0, with_fps=True):
    torch.manual_seed(0)
    model = build_model(conf.model)
    teacher = build_model(conf.model)
    teacher.load_state_dict(teacher_weights)
    schedule = None
    if with_fps:
        schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
        apply_fps_attention(model, schedule)
    objective = ObjectiveConfig(teacher="dense", distill_weight=distill_weight)
    return FlowMatchingModule(model, objective, OptimConfig(), schedule, teacher=teacher)


def test_loss_is_the_distance_to_the_teacher(tmp_path):
    conf = resolve(compose_train(RUN, tmp_path))
    batch, sigma = _batch(conf), torch.tensor([0.95, 0.3])
    noise = torch.randn_like(batch["latents"])
    other = build_model(conf.model).state_dict()  # a teacher with weights of its own
    module = _module(conf, other)
    student, teacher = module.model, module._teacher[0]
    losses = module.per_sample_loss(batch, sigma, noise, distill=True)
    from fpsa_train.flow import noisy_input

    x, target = noisy_input(batch["latents"], noise, sigma)
    t = sigma * 1000
    with torch.no_grad():
        expected = (student(x, t, batch["context"], attn_kwargs={"sigma": sigma}) - teacher(x, t, batch["context"]))
    assert torch.allclose(losses, expected.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)
    plain = module.per_sample_loss(batch, sigma, noise)  # validation: the flow-matching loss, teacher unused
    with torch.no_grad():
        fm = (student(x, t, batch["context"], attn_kwargs={"sigma": sigma}) - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(plain, fm, rtol=1e-5, atol=1e-7) and not torch.allclose(plain, losses)

    half = _module(conf, other, distill_weight=0.5)
    mixed = half.per_sample_loss(batch, sigma, noise, distill=True)
    assert torch.allclose(mixed, 0.5 * losses + 0.5 * plain, rtol=1e-5, atol=1e-7)


def test_a_dense_student_equal_to_its_teacher_has_zero_loss_and_the_teacher_gets_no_gradient(tmp_path):
    conf = resolve(compose_train(RUN, tmp_path))
    torch.manual_seed(0)
    weights = build_model(conf.model).state_dict()
    module = _module(conf, weights, with_fps=False)
    module.model.load_state_dict(weights)
    batch = _batch(conf)
    losses = module.per_sample_loss(batch, torch.tensor([0.9, 0.5]), torch.randn_like(batch["latents"]), distill=True)
    assert losses.abs().max() == 0
    losses.sum().backward()
    teacher = module._teacher[0]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_teacher") for k in module.state_dict())  # not saved, not trained


def test_training_with_a_teacher_runs_and_saves_no_teacher(tmp_path):
    conf = resolve(compose_train(RUN, tmp_path / "w"))
    torch.manual_seed(1)
    save_wan_weights(build_model(conf.model), tmp_path / "start")
    start = next((tmp_path / "start").glob("*.safetensors"))
    metrics = train(compose_train([*RUN, f"model.weights={start}", "objective.teacher=dense"], tmp_path / "run"))
    assert metrics["steps"] == 4 and metrics["train/loss"] == metrics["train/loss"]  # finite, not NaN
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not [k for k in state["state_dict"] if "teacher" in k]


@pytest.mark.parametrize("overrides, key", [
    (["objective.teacher=dense"], "model.weights"),
    (["objective.teacher=teach"], "objective.teacher"),
    (["objective.distill_weight=1.5"], "objective.distill_weight"),
    (["objective.teacher=dense", "model.weights=/x.safetensors", "trainer=zero3"], "ZeRO-3"),
    (["objective.teacher=dense", "model.weights=/x.safetensors", "trainer.sp_size=2"], "sp_size"),
])
def test_bad_teacher_configs_name_the_key(overrides, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(compose_train([*RUN, *overrides], tmp_path))
