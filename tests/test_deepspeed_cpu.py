"""DeepSpeed ZeRO-3 on two CPU ranks (gloo) through `python -m fpsa_train trainer=zero3`: it trains with the EMA on
(each rank averaging its parameter slices), checkpoints atomically, resumes after kill -9 with the same loss
curve, and export joins the ranks' EMA slices into the full average. Validation videos render under ZeRO-3 (with
the live weights: each rank holds only its EMA slice), in the reference run and in the resumed one alike."""

from __future__ import annotations

import pytest
import torch

from fpsa_train.lit.training_checkpoint import read_training_checkpoint
from tests.test_resume import finish, kill_when, launch, losses

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.deepspeed

ZERO3 = ["trainer=zero3", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=12",
         "optim.ema_decay=0.9", "trainer.val_every_n_steps=6", "val_video.every_n_steps=6", "val_video.steps=2"]


def test_zero3_with_ema_resumes_after_kill_9(tmp_path):
    reference = tmp_path / "reference"
    log = finish(launch(reference, ZERO3), timeout=600)
    expected = losses(reference)
    assert sorted(p.name for p in (reference / "val_videos").iterdir()) == [
        f"step{s:07d}_latent_preview.{ext}" for s in (6, 12) for ext in ("mp4", "png")]
    assert log.count("slice of the EMA") == 1  # the live-weights warning, once, from rank 0
    ckpt = reference / "checkpoints" / "step0000012.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in (ckpt / "checkpoint").iterdir() if "model" in p.name) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporaries left behind

    state = read_training_checkpoint(ckpt)  # the training-checkpoint reader: full fp32 weights and the joined EMA
    assert state.ema is not None and state.ema.keys() == {k for k in state.weights if not k.endswith("_buffer")}
    name = "blocks.0.self_attn.q.weight"
    assert state.ema[name].shape == state.weights[name].shape
    assert not torch.equal(state.ema[name], state.weights[name])  # an average, not a copy

    run = tmp_path / "killed"
    kill_when(launch(run, ZERO3), run / "checkpoints" / "step0000004.ckpt", timeout=400)
    finish(launch(run, ZERO3), timeout=600)
    assert {p.name for p in (run / "val_videos").iterdir()} >= {"step0000012_latent_preview.mp4",
                                                                 "step0000012_latent_preview.png"}
    got = losses(run)
    assert [got[s] for s in range(4, 12)] == [expected[s] for s in range(4, 12)]
    resumed = read_training_checkpoint(run / "checkpoints" / "step0000012.ckpt")
    assert all(torch.equal(resumed.ema[k], state.ema[k]) for k in state.ema)
