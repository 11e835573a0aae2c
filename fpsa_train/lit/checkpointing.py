"""When training checkpoints are written, what they are called, how many are kept, and what a preemption does.

Our own callback rather than Lightning's ModelCheckpoint, because of what that one did to runs here:
- a save due on an epoch's last batch was deferred to the next validation and, with validation less frequent
  than checkpoints, never happened (every 25 steps with validation every 100: step 50 was never written);
- a run whose `max_steps` is not a multiple of the interval ended with its last steps unsaved;
- after a corrupt newest checkpoint, its new saves became `step…-v1.ckpt` / `last-v1.ckpt`, which resume ignores;
- SIGTERM (a preemption, `scancel`, a Kubernetes eviction) ended the run at the epoch's end with exit status 0 and
  nothing saved, so a requeue-on-failure wrapper took the run for finished.

The rules here:
- **Every `every_n_steps` optimizer steps, and at the last step** (`trainer.max_steps`), in `on_train_batch_end`,
  whatever the validation interval. Both are written from the same point of the loop, so the data position they
  record (the DataModule's epoch and batches) is the one an uninterrupted run has there; a save in
  `on_train_end` would record the fit loop's already-advanced epoch and a resumed run would skip the rest of it.
- **Names are fixed**: `stepNNNNNNN.ckpt`, replaced atomically when it exists (the checkpoint IO and the DeepSpeed
  strategy write to a temporary name and rename), and `last.ckpt`, a relative symlink to the newest, replaced
  atomically too.
- **`keep` step checkpoints**, the newest by step number; step checkpoints above the current step are from a
  timeline this run abandoned (it resumed from an older checkpoint because the newer ones were unreadable, or was
  pointed at one by `trainer.resume`) and are removed when the run passes a save. Temporary leftovers of a killed
  save (`.stepNNNNNNN.ckpt.tmp-<pid>`, DeepSpeed's `.stepNNNNNNN.ckpt.tmp-<host>-<pid>-<random>` folders) are
  removed when training starts.
- **Preemption**: SIGTERM, or under Slurm the requeue signal of Lightning's convention (SIGUSR1, sent ahead of
  the time limit by `#SBATCH --signal=SIGUSR1@90`), asks for a checkpoint at the next optimizer-step boundary.
  Any rank receiving it stops all of them (one all-reduce of a flag per step); the checkpoint is written, the run
  stops, and `train()` raises `Preempted`, which `python -m fpsa_train` turns into exit status 143 (128 +
  SIGTERM: "terminated", never "finished"). On the requeue signal global rank 0 also runs `scontrol requeue
  $SLURM_JOB_ID`, Slurm's requeue convention; rerunning the same command resumes from the checkpoint.
  SIGKILL cannot be caught: a killed run loses at most one interval.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from fpsa_train.atomic import symlink_atomic

log = logging.getLogger(__name__)

STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")
LAST = "last.ckpt"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended
# Temporary names of a save in progress (fpsa_train/atomic.py): AtomicCheckpointIO's `.<name>.tmp-<pid>` (before
# it, `<name>.tmp-<pid>`), a `last.ckpt` link being replaced (the same form), and the DeepSpeed strategy's hidden
# folders `.<name>.tmp-<host>-<pid>-<random>` / `.<name>.old-...` (`temp_sibling`; before it, `.<name>.tmp` /
# `.<name>.old`).
LEFTOVER = re.compile(r"^\.?(step\d+|last)\.ckpt\.tmp-\d+$"
                      r"|^\.step\d+\.ckpt\.(tmp|old)(-[A-Za-z0-9]+-\d+-[0-9a-f]{8})?$")


def step_name(step: int) -> str:
    return f"step{step:07d}.ckpt"


class Preempted(RuntimeError):
    """Training stopped on a preemption signal after writing a checkpoint; rerun the same command to resume."""

    def __init__(self, step: int, path: str, signum: int):
        self.step, self.path, self.signum = step, path, signum
        super().__init__(f"preempted by {signal.Signals(signum).name}: checkpoint {path} written at step {step}; "
                         "rerun the same command to continue")


def requeue_signal() -> int | None:
    """The signal Slurm sends ahead of a requeue when the job runs under Slurm (Lightning's convention), else None."""
    if not SLURMEnvironment.detect():
        return None
    return int(SLURMEnvironment().requeue_signal or signal.SIGUSR1)


class StepCheckpoint(L.Callback):
    """Checkpoints every `every_n_steps` and at `max_steps`, `keep` of them, and a checkpoint on preemption (see the
    module docstring)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, keep: int):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.saved_step: int | None = None
        self.preempted: Preempted | None = None
        self._seen_step = -1
        self._signal: int | None = None
        self._previous_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------------------------------- signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if trainer.is_global_zero:
            remove_leftovers(self.dirpath)
        # After Lightning registered its own handlers (it does so just before this hook): ours replace them for
        # the signals that mean "save and stop"; the originals come back in on_train_end / teardown.
        if threading.current_thread() is threading.main_thread():
            for signum in {int(signal.SIGTERM), requeue_signal()} - {None}:
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal(trainer))

    def _on_signal(self, trainer: L.Trainer):
        def handler(signum, frame) -> None:
            if self._signal is None:
                log.warning("received %s: saving a checkpoint at the next step boundary, then stopping",
                            signal.Signals(signum).name)
                launcher = trainer.strategy.launcher  # ranks this process started itself (one-node DDP)
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)
            self._signal = signum
        return handler

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # -------------------------------------------------------------------------------------------- saving

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch inside gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        stop = self._signal is not None
        if trainer.world_size > 1:  # every rank takes part, every step, so that all stop at the same one
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        due = step % self.every_n_steps == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps)
        if (due or stop) and step != self.saved_step:
            self.save(trainer, step)
        if stop:
            signum = self._signal or int(signal.SIGTERM)  # a rank that only heard it from another rank
            self.preempted = Preempted(step, str(self.dirpath / step_name(step)), signum)
            if signum == requeue_signal() and trainer.is_global_zero:
                _slurm_requeue()
            trainer.should_stop = True

    def save(self, trainer: L.Trainer, step: int) -> None:
        path = self.dirpath / step_name(step)
        # The full state, optimizer included (explicit: Lightning logs a line when weights_only is left unset);
        # atomic (AtomicCheckpointIO / FPSDeepSpeedStrategy); every rank calls it.
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            link_last(self.dirpath, path.name)
            for old in prune(self.dirpath, step, self.keep):
                log.info("removed checkpoint %s (keep_checkpoints=%d)", old.name, self.keep)
        trainer.strategy.barrier("fpsa_step_checkpoint")
        self.saved_step = step
        log.info("checkpoint %s written", path)


def link_last(dirpath: Path, target: str) -> None:
    """Point `last.ckpt` at `target` (a name in the same folder) through a temporary link renamed over it."""
    if os.path.isdir(dirpath / LAST) and not os.path.islink(dirpath / LAST):
        shutil.rmtree(dirpath / LAST)  # a real folder of that name (an old DeepSpeed save) cannot be renamed over
    symlink_atomic(target, dirpath / LAST)


def step_checkpoints(dirpath: Path) -> dict[int, Path]:
    """{step: path} of the `stepNNNNNNN.ckpt` files or folders in `dirpath`."""
    if not dirpath.is_dir():
        return {}
    return {int(m.group(1)): p for p in dirpath.iterdir() if (m := STEP_NAME.match(p.name))}


def prune(dirpath: Path, current: int, keep: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep` at or below `current`, and those above `current` (an
    abandoned timeline, see the module docstring); returns what was deleted."""
    steps = step_checkpoints(dirpath)
    kept = sorted((s for s in steps if s <= current), reverse=True)[:keep]
    removed = []
    for step, path in sorted(steps.items()):
        if step in kept:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def remove_leftovers(dirpath: Path) -> list[Path]:
    """Delete what killed saves leave behind (temporary files, hidden DeepSpeed folders); returns their paths."""
    if not dirpath.is_dir():
        return []
    removed = []
    for path in dirpath.iterdir():
        if LEFTOVER.match(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, left by a save that did not finish", path.name)
    return removed


def _slurm_requeue() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        log.warning("requeue signal received but SLURM_JOB_ID is not set: not requeueing")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("scontrol requeue %s failed (%s): requeue the job yourself", job, err)
        return
    if result.returncode:
        log.warning("scontrol requeue %s failed (exit %d: %s)", job, result.returncode, result.stderr.strip())
    else:
        log.info("requeued Slurm job %s", job)
