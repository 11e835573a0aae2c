"""Checkpoints are never lost and never silently wrong (lit/checkpointing.py, lit/resume.py): written every interval
and at the end whatever the validation interval, verified by checksum before a resume, never renamed out of
resume's sight, a finished run is not retrained, a preemption saves and exits non-zero, and a refused run leaves
the run's record alone. Each test is the regression test of a failure seen before (named in its docstring)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fpsa_train.config import ConfigError
from fpsa_train.lit.checkpointing import LEFTOVER, PREEMPTED_EXIT_CODE, prune, remove_leftovers
from fpsa_train.lit.resume import differences, unreadable_reason
from fpsa_train.train import train
from tests.conftest import REPO, compose_train
from tests.test_resume import RUN, losses

# 40 samples in batches of 4 on one process: 10 batches per epoch, so steps 10 and 20 end an epoch. Dense attention
# and one block keep the steps fast where the schedule plays no part; FPS runs where it does.
ONE = [*RUN, "trainer.devices=1", "trainer.val_every_n_steps=1000"]
FAST = [*(o for o in ONE if o != "fps=default"), "fps=dense", "model.token_order=raster", "model.num_layers=1"]


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True)["global_step"]


def test_saves_every_interval_at_epoch_ends_and_at_the_last_step(tmp_path):
    """Regression: with checkpoints every 5 steps and validation every 20 (Lightning's ModelCheckpoint), the save due
    at step 10, the epoch's last batch, never happened; a run of 23 steps ended with steps 21-23 unsaved."""
    run = tmp_path / "run"
    train(compose_train([*FAST, "trainer.max_steps=23", "trainer.checkpoint_every_n_steps=5",
                         "trainer.val_every_n_steps=20", "trainer.keep_checkpoints=10"], run))
    assert ckpt_names(run) == ["last.ckpt", *(f"step{s:07d}.ckpt" for s in (5, 10, 15, 20, 23))]
    assert os.readlink(run / "checkpoints" / "last.ckpt") == "step0000023.ckpt"  # relative: the folder can move
    assert step_of(run / "checkpoints" / "last.ckpt") == 23
    epoch_end = torch.load(run / "checkpoints" / "step0000010.ckpt", weights_only=True, mmap=True)
    assert epoch_end["LatentDataModule"] == {"epoch": 0, "batches": 10}


def test_resumes_from_an_epoch_end_and_the_end_of_a_run_on_the_same_curve(tmp_path):
    """A run that stopped at an epoch's end (step 10) and is extended continues exactly as an uninterrupted run;
    rerunning a finished run is a no-op that says so. Regression: the rerun retrained the last steps and wrote a
    last.ckpt whose data position skipped an epoch, so the extended curve differed."""
    every = ["trainer.checkpoint_every_n_steps=4"]
    reference = tmp_path / "reference"
    train(compose_train([*FAST, *every, "trainer.max_steps=14"], reference))
    expected = losses(reference)

    run = tmp_path / "run"
    first = train(compose_train([*FAST, *every, "trainer.max_steps=10"], run))
    assert first["finished"] and step_of(run / "checkpoints" / "last.ckpt") == 10
    again = train(compose_train([*FAST, *every, "trainer.max_steps=10"], run))
    assert again["finished"] and again["steps"] == 10 and again["resumed_from"].endswith("last.ckpt")
    assert step_of(run / "checkpoints" / "last.ckpt") == 10  # nothing retrained, nothing rewritten
    assert sorted(losses(run)) == list(range(10))

    extended = train(compose_train([*FAST, *every, "trainer.max_steps=14"], run))
    assert extended["steps"] == 14
    got = losses(run)
    assert [got[s] for s in range(10, 14)] == [expected[s] for s in range(10, 14)]  # bit-identical continuation


def test_rerunning_a_finished_run_says_so(tmp_path, caplog):
    args = [*FAST, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2"]
    train(compose_train(args, tmp_path))
    with caplog.at_level("WARNING", logger="fpsa_train.train"):
        metrics = train(compose_train(args, tmp_path))
    assert metrics["finished"] and metrics["steps"] == 3
    assert "nothing to do: this run already finished" in caplog.text and "trainer.max_steps" in caplog.text
    summary = json.loads((tmp_path / "summary.json").read_text())  # what scripts driving runs read
    assert summary["finished"] is True and summary["steps"] == 3


def _zero_inside_largest_tensor(path: Path, nbytes: int = 65536) -> None:
    """Zero `nbytes` in the middle of the checkpoint's largest tensor record: the zip structure stays intact and
    torch.load reads it without complaint (the weights simply change)."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # the data starts after the local header (30 bytes + name + extra field)
        f.seek(record.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2 - nbytes // 2
    data[start:start + nbytes] = bytes(nbytes)
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_the_middle_is_skipped_by_checksum(tmp_path):
    """Regression: 16,384 weights zeroed in the middle of the newest checkpoint loaded silently and changed the loss
    curve; the CRC-32 torch stores per record now refuses it and the previous checkpoint is used."""
    args = [*FAST, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4"]
    train(compose_train(args, tmp_path / "a"))
    expected = losses(tmp_path / "a")
    run = tmp_path / "b"
    train(compose_train(args, run))
    newest = run / "checkpoints" / "step0000008.ckpt"
    before = torch.load(newest, weights_only=True)["state_dict"]
    _zero_inside_largest_tensor(newest)
    after = torch.load(newest, weights_only=True)["state_dict"]  # what a resume without the checksum would train on
    assert sum(int((before[k] != after[k]).sum()) for k in before) > 1000

    assert "checksum mismatch" in unreadable_reason(newest)
    assert unreadable_reason(newest, verify_checksums=False) is None  # the structure alone cannot tell
    (run / "logs" / "metrics.csv").unlink()
    with pytest.warns(UserWarning, match=r"resuming from .*step0000004\.ckpt instead.*last\.ckpt: checksum mismatch"):
        metrics = train(compose_train(args, run))
    assert metrics["resumed_from"].endswith("step0000004.ckpt")
    got = losses(run)
    assert sorted(got) == [4, 5, 6, 7] and all(got[s] == expected[s] for s in got)


def test_after_a_corrupt_newest_checkpoint_saves_keep_their_names_and_the_count(tmp_path):
    """Regression: after resuming past a corrupt step0000008.ckpt, Lightning wrote step0000008-v1.ckpt and
    last-v1.ckpt, which resume ignores (the next kill went back to step 4), and stale files were never removed."""
    args = [*FAST, "trainer.checkpoint_every_n_steps=4", "trainer.keep_checkpoints=2"]
    run = tmp_path / "run"
    train(compose_train([*args, "trainer.max_steps=8"], run))
    ckpts = run / "checkpoints"
    data = (ckpts / "step0000008.ckpt").read_bytes()
    (ckpts / "step0000008.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / "step0000012.ckpt.tmp-999999").write_bytes(b"a killed save")  # leftovers of killed saves
    (ckpts / ".step0000012.ckpt.tmp").mkdir()
    with pytest.warns(UserWarning, match="resuming from .*step0000004"):
        train(compose_train([*args, "trainer.max_steps=16"], run))
    assert ckpt_names(run) == ["last.ckpt", "step0000012.ckpt", "step0000016.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "step0000016.ckpt" and step_of(ckpts / "last.ckpt") == 16


def test_prune_keeps_the_newest_and_drops_an_abandoned_timeline(tmp_path):
    for step in (2, 4, 6, 8, 20):
        (tmp_path / f"step{step:07d}.ckpt").write_bytes(b"x")
    (tmp_path / "step0000010.ckpt").mkdir()  # a DeepSpeed folder
    removed = prune(tmp_path, current=10, keep=2)
    assert sorted(p.name for p in removed) == ["step0000002.ckpt", "step0000004.ckpt", "step0000006.ckpt",
                                               "step0000020.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000008.ckpt", "step0000010.ckpt"]


def test_leftovers_of_killed_saves_are_recognised_and_nothing_else():
    for name in ("step0000012.ckpt.tmp-4242", ".step0000012.ckpt.tmp-4242", ".step0000012.ckpt.tmp",
                 ".step0000012.ckpt.old", ".last.ckpt.tmp-7", ".step0000012.ckpt.tmp-node1-4242-0123abcd",
                 ".step0000012.ckpt.old-node1-4242-0123abcd"):
        assert LEFTOVER.match(name), name
    for name in ("step0000012.ckpt", "last.ckpt", "notes.tmp-1", "step0000012.ckpt.bak"):
        assert not LEFTOVER.match(name), name
    assert remove_leftovers(Path("/nonexistent")) == []


def _launch(run: Path, extra: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "fpsa_train", *ONE, *extra, f"hydra.run.dir={run}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after_steps(proc: subprocess.Popen, run: Path, steps: int, signum: int) -> str:
    metrics = run / "logs" / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(run)) >= steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signum)
    return proc.communicate(timeout=180)[0]


def test_sigterm_saves_at_the_next_step_and_exits_non_zero_then_resumes(tmp_path):
    """Regression: SIGTERM ended the run with exit status 0 and no checkpoint, so a requeue-on-failure wrapper
    took it for finished and the work since the last interval was lost."""
    long = ["trainer.max_steps=400", "trainer.checkpoint_every_n_steps=1000", "trainer.log_every_n_steps=1"]
    run = tmp_path / "run"
    proc = _launch(run, long)
    out = _signal_after_steps(proc, run, 3, signal.SIGTERM)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    saved = [p for p in ckpt_names(run) if p.startswith("step")]
    assert len(saved) == 1 and "preempted by SIGTERM" in out, out[-3000:]
    step = step_of(run / "checkpoints" / saved[0])
    assert step >= 3 and step_of(run / "checkpoints" / "last.ckpt") == step

    resumed = _launch(run, [*long[:1], "trainer.max_steps=" + str(step + 2), *long[1:]])
    out = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") == step + 2


def test_slurm_requeue_signal_saves_requeues_and_exits_non_zero(tmp_path):
    """Slurm's requeue convention (Lightning's): `--signal=SIGUSR1@90` warns the job ahead of its time limit; the
    run saves, global rank 0 runs `scontrol requeue $SLURM_JOB_ID`, and the process exits non-zero."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "fpsa", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = tmp_path / "run"
    proc = _launch(run, ["trainer.max_steps=400", "trainer.checkpoint_every_n_steps=1000"], slurm)
    out = _signal_after_steps(proc, run, 2, signal.SIGUSR1)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert [p for p in ckpt_names(run) if p.startswith("step")], out[-3000:]


def test_a_refused_run_keeps_the_record_and_names_the_differing_fields(tmp_path):
    """Regression: a run refused for a config mismatch had already overwritten the run directory's .hydra/ record,
    and its message said only "a different model and schedule"."""
    args = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"]
    run = tmp_path / "run"
    first = _launch(run, args)
    assert first.wait(timeout=240) == 0, first.communicate()[0][-3000:]
    record = {p.name: p.read_text() for p in (run / ".hydra").iterdir()}
    assert sorted(record) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "max_steps=2" in record["overrides.yaml"]

    refused = _launch(run, [*args, "model.rope_theta=5000", "fps.regimes.0.sparsity.window=[1,1,1]"])
    out = refused.communicate(timeout=240)[0]
    assert refused.returncode != 0
    assert "model.rope_theta: 10000.0 in the checkpoint, 5000.0 now" in out, out[-3000:]
    assert "schedule.regimes.early.sparsity.window" in out, out[-3000:]
    assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == record


def test_differences_name_every_leaf():
    saved = {"model": {"dim": 64, "tile_shape": [2, 4, 4]}, "schedule": {"regimes": [{"name": "a", "topk": 2}]}}
    current = {"model": {"dim": 64, "tile_shape": [2, 8, 8], "extra": 1},
               "schedule": {"regimes": [{"name": "a", "topk": 3}]}}
    assert differences(saved, current) == ["model.tile_shape: [2, 4, 4] in the checkpoint, [2, 8, 8] now",
                                           "model.extra: '<absent>' in the checkpoint, 1 now",
                                           "schedule.regimes.a.topk: 2 in the checkpoint, 3 now"]


def test_a_lightning_checkpoint_that_is_not_ours_is_refused_as_such(tmp_path):
    """Regression: resuming from another project's Lightning checkpoint failed with
    `KeyError: 'checkpoint has no ema state'`."""
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"l.weight": torch.ones(2, 2)}, "global_step": 1, "epoch": 0,
                "pytorch-lightning_version": "2.6.6"}, foreign)
    with pytest.raises(ConfigError, match=r"foreign\.ckpt is not an fpsa training checkpoint.*'l\.weight'"):
        train(compose_train([*ONE, "trainer.max_steps=2", f"trainer.resume={foreign}"], tmp_path / "run"))
