"""Which checkpoint a run resumes from (`trainer.resume`), and whether a checkpoint can be read at all.

`auto` looks in `<run_dir>/checkpoints` for `last.ckpt` and the `stepNNNNNNN.ckpt` files and takes the newest
one that reads: a checkpoint is a file (Lightning) or a folder (DeepSpeed: one shard per rank). Checkpoints are
written atomically (temporary name, then rename), so a killed save never leaves a truncated one under its final
name; what can still happen is damage afterwards (a full or failing disk, a partial copy). Such a checkpoint is
skipped with a warning that names it and why, and the previous one is used.

Reading is checked cheaply, without loading tensors into memory: every torch file's zip directory must be intact
(a truncated file has none), and a Lightning checkpoint must unpickle with `weights_only=True` (memory-mapped) and
hold a `state_dict` and a `global_step`.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from fpsa_train.config import RESUME_AUTO, RESUME_NEVER, ConfigError

log = logging.getLogger(__name__)

STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be resumed from (None when it looks whole)."""
    if path.is_dir():  # DeepSpeed: <path>/latest and <path>/<tag>/*_states.pt
        shards = sorted(path.rglob("*_states.pt"))
        if not any(f.name.endswith("model_states.pt") for f in shards):
            return "no DeepSpeed model_states file"
        for f in shards:
            if not zipfile.is_zipfile(f):
                return f"{f.relative_to(path)} is not a complete torch file"
        return None
    if not path.is_file():
        return "missing"
    if not zipfile.is_zipfile(path):
        return "not a complete torch file (truncated or overwritten)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  any failure to read means: do not resume from it
        return f"torch.load failed: {type(err).__name__}: {err}"
    missing = [k for k in ("state_dict", "global_step") if k not in state]
    return f"no {', '.join(missing)} in it" if missing else None


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in `ckpt_dir`, newest first: last.ckpt, then step checkpoints by descending step."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_NAME.match(p.name)),
                   key=lambda p: int(STEP_NAME.match(p.name).group(1)), reverse=True)
    last = ckpt_dir / "last.ckpt"
    return ([last] if os.path.lexists(last) else []) + steps


def resume_checkpoint(resume: str, ckpt_dir: str | Path) -> str | None:
    """The checkpoint to resume from for `trainer.resume` (None: start fresh)."""
    if resume == RESUME_NEVER:
        return None
    if resume != RESUME_AUTO:
        reason = unreadable_reason(Path(resume))
        if reason is not None:
            raise FileNotFoundError(f"trainer.resume={resume!r}: cannot resume from it ({reason}); pass another "
                                    "checkpoint, trainer.resume=auto (newest readable in the run) or never")
        return resume
    skipped = []
    for path in candidates(Path(ckpt_dir)):
        reason = unreadable_reason(path)
        if reason is None:
            if skipped:
                rank_zero_warn(f"resuming from {path} instead: the newer checkpoint(s) cannot be read: "
                               + "; ".join(f"{p.name}: {r}" for p, r in skipped))
            log.info("resuming from %s", path)
            return str(path)
        skipped.append((path, reason))
    if skipped:
        rank_zero_warn(f"no readable checkpoint in {ckpt_dir} ({'; '.join(f'{p.name}: {r}' for p, r in skipped)}); "
                       "starting from scratch")
    return None


def saved_run_config(path: str | Path) -> dict | None:
    """The run config a checkpoint carries (lit/module.py RUN_CONFIG_KEY), read without loading its tensors."""
    from fpsa_train.lit.module import RUN_CONFIG_KEY

    path = Path(path)
    if path.is_dir():  # DeepSpeed: the client state is in every model_states file
        path = min(path.rglob("*model_states.pt"))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get(RUN_CONFIG_KEY)


def check_same_run(path: str, current: dict | None) -> None:
    """Refuse to resume a checkpoint of another architecture or schedule (a reused run directory, say)."""
    saved = saved_run_config(path)
    if saved is None or current is None:
        log.warning("%s carries no run config; resuming without checking that it is the same model", path)
        return
    differ = [k for k in ("model", "schedule") if saved.get(k) != current.get(k)]
    if differ:
        raise ConfigError(f"{path} was trained with a different {' and '.join(differ)} than this run's config; pass "
                          "trainer.resume=never or another hydra.run.dir to start a new run (or the old config to "
                          "continue that one)")
