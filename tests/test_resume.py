"""Fault tolerance: kill -9 a two-process DDP run (gloo, CPU) mid-epoch, rerun the same command, and the loss curve
continues exactly as the uninterrupted run's; a corrupt newest checkpoint falls back to the previous one."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fpsa_train.config import ConfigError
from fpsa_train.data.sampler import ShardedBatchSampler
from fpsa_train.lit.resume import candidates, resume_checkpoint, unreadable_reason
from fpsa_train.train import train
from tests.conftest import REPO, compose_train

# 40 samples in batches of 4 over 2 ranks: 5 batches per rank per epoch, so step 8 is in the middle of epoch 1.
RUN = ["+experiment=tiny", "data=synthetic", "fps=default", "trainer.accelerator=cpu", "trainer.deterministic=true",
       "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=1000", "trainer.checkpoint_every_n_steps=4",
       "data.num_samples=40", "data.val_samples=8", "data.batch_size=4", "data.latent_frames=3",
       "data.latent_height=8", "data.latent_width=8", "logger.wandb=false", "logger.tensorboard=false", "seed=7"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=30"]


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step from metrics.csv (a resumed run appends; the last row of a step wins)."""
    out = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def launch(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "fpsa_train", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,  # its own group: kill takes rank 1 too
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, target: Path, timeout: float) -> None:
    """SIGKILL the launcher and its ranks (one process group) as soon as `target` exists: no chance to clean up."""
    deadline = time.time() + timeout
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert target.exists(), f"{target.name} did not appear"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_kill_9_mid_epoch_then_rerun_continues_the_same_curve(tmp_path):
    reference = tmp_path / "reference"
    finish(launch(reference, DDP))
    expected = losses(reference)
    assert sorted(expected) == list(range(30))  # steps 0..29 logged once each

    run = tmp_path / "killed"
    target = run / "checkpoints" / "step0000008.ckpt"
    kill_when(launch(run, DDP), target, timeout=180)
    state = torch.load(target, weights_only=True, map_location="cpu")
    assert state["global_step"] == 8 and state["LatentDataModule"] == {"epoch": 1, "batches": 3}

    out = finish(launch(run, DDP))  # the same command
    assert "resuming from" in out.lower() or "Restored all states" in out, out[-3000:]
    got = losses(run)
    steps = [s for s in expected if s >= 8]
    assert [got[s] for s in steps] == [expected[s] for s in steps]  # bit-identical continuation (fp32, CPU)
    final_ref = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == final_ref["global_step"] == 30  # the last step (saved whatever the interval)
    for key in ("state_dict", "ema"):
        assert all(torch.equal(final[key][k], final_ref[key][k]) for k in final_ref[key]), key


def test_corrupt_last_checkpoint_falls_back_with_a_warning(tmp_path):
    single = [*RUN, "trainer.devices=1", "trainer.max_steps=8"]
    train(compose_train(single, tmp_path / "a"))
    expected = losses(tmp_path / "a")

    run = tmp_path / "b"
    train(compose_train(single, run))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000004.ckpt", "step0000008.ckpt"]
    assert os.path.realpath(ckpts / "last.ckpt") == str((ckpts / "step0000008.ckpt").resolve())
    data = (ckpts / "step0000008.ckpt").read_bytes()
    (ckpts / "step0000008.ckpt").write_bytes(data[: len(data) // 2])  # a disk that lost its tail
    (run / "logs" / "metrics.csv").unlink()

    with pytest.warns(UserWarning, match=r"resuming from .*step0000004.ckpt.*last.ckpt: not a complete torch file"):
        metrics = train(compose_train(single, run))
    assert metrics["resumed_from"].endswith("step0000004.ckpt") and metrics["steps"] == 8
    got = losses(run)
    assert sorted(got) == [4, 5, 6, 7] and all(got[s] == expected[s] for s in got)


def test_resume_never_and_explicit_paths(tmp_path):
    assert resume_checkpoint("never", tmp_path) is None
    assert resume_checkpoint("auto", tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="trainer.resume='/no/such.ckpt'.*missing"):
        resume_checkpoint("/no/such.ckpt", tmp_path)
    (tmp_path / "step0000010.ckpt").write_bytes(b"garbage")
    (tmp_path / "step0000002.ckpt").write_bytes(b"garbage")
    assert [p.name for p in candidates(tmp_path)] == ["step0000010.ckpt", "step0000002.ckpt"]
    with pytest.warns(UserWarning, match="no readable checkpoint"):
        assert resume_checkpoint("auto", tmp_path) is None
    folder = tmp_path / "ds.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    assert unreadable_reason(tmp_path / "ds.ckpt") == "no DeepSpeed model_states file"
    torch.save({"x": torch.ones(2)}, folder / "mp_rank_00_model_states.pt")
    assert unreadable_reason(tmp_path / "ds.ckpt") is None
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 truncated")
    assert "zero_pp_rank_1" in unreadable_reason(tmp_path / "ds.ckpt")


def test_a_run_dir_of_another_model_is_refused(tmp_path):
    short = [*RUN, "trainer.devices=1", "trainer.max_steps=4"]
    train(compose_train(short, tmp_path))
    with pytest.raises(ConfigError, match=r"belongs to another run: schedule: \{'regimes': .*… in the checkpoint, "
                                                r"None now.*trainer\.resume=never"):
        train(compose_train([*short, "fps=dense", "trainer.max_steps=5"], tmp_path))


def test_sampler_resumes_mid_epoch_and_shards_by_data_parallel_rank():
    def sampler(rank: int, replicas: int = 2) -> ShardedBatchSampler:
        return ShardedBatchSampler(22, 4, shuffle=True, seed=3, drop_last=True, num_replicas=replicas, rank=rank)

    s0, s1 = sampler(0), sampler(1)
    for s in (s0, s1):
        s.set_epoch(2)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == len(s0) == 2  # 5 full batches → 4 usable over 2 ranks
    assert not set(sum(b0, [])) & set(sum(b1, []))  # disjoint shares
    s0.resume_at(2, 1)
    assert list(s0) == b0[1:]  # skips what epoch 2 consumed ...
    assert list(s0) == b0  # ... once
    s0.resume_at(1, 1)
    assert list(s0) == b0  # a resume point of another epoch skips nothing
    s0.set_epoch(3)
    assert list(s0) != b0  # reshuffled per epoch
