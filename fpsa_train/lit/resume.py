"""Which checkpoint a run resumes from (`trainer.resume`), and whether a checkpoint can be trusted.

`auto` looks in `<run_dir>/checkpoints` for `last.ckpt` and the `stepNNNNNNN.ckpt` files and takes the newest
one that reads: a checkpoint is a file (Lightning) or a folder (DeepSpeed: one shard per rank). Checkpoints are
written atomically (temporary name, then rename), so a killed save never leaves a truncated one under its final
name; what can still happen is damage afterwards (a full or failing disk, a partial copy, a bad transfer). Such a
checkpoint is skipped with a warning that names it and why, and the previous one is used.

Integrity: every torch file (a Lightning checkpoint, each DeepSpeed shard) is a zip archive in which `torch.save`
stores a CRC-32 of every record. Before resuming, every record's CRC is recomputed (`trainer.verify_checksums`;
about 1.7 GB/s on one core): a checkpoint whose bytes were zeroed or flipped in the middle (which `torch.load`
reads without complaint: the weights simply change) is refused like a truncated one. Then a Lightning
checkpoint must unpickle with `weights_only=True` (memory-mapped) and hold a `state_dict` and a `global_step`
(read, as the run config is, by lit/training_checkpoint.py, the reader export and calibrate use).

A checkpoint must also belong to this run: one of another architecture or schedule is refused naming every field
that differs, and a Lightning checkpoint that fpsa did not write is refused as such.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from fpsa_train.errors import ConfigError
from fpsa_train.lit.checkpointing import STEP_NAME
from fpsa_train.lit.config import RESUME_AUTO, RESUME_NEVER
from fpsa_train.lit.training_checkpoint import DEEPSPEED_MODULE, GLOBAL_STEP, RUN_CONFIG_KEY, STATE_DICT, client_state

log = logging.getLogger(__name__)


def damaged_record(path: Path) -> str | None:
    """The first record of the torch file `path` whose CRC-32 differs from the one stored with it, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # a damaged local header or directory
        return f"unreadable archive ({err})"
    return None if bad is None else f"checksum mismatch in record {bad}"


def unreadable_reason(path: Path, verify_checksums: bool = True) -> str | None:
    """Why `path` cannot be resumed from (None when it is whole); `verify_checksums` recomputes every CRC-32."""
    if path.is_dir():  # DeepSpeed: <path>/latest and <path>/<tag>/*_states.pt
        shards = sorted(path.rglob("*_states.pt"))
        if not any(f.name.endswith("model_states.pt") for f in shards):
            return "no DeepSpeed model_states file"
        for f in shards:
            if not zipfile.is_zipfile(f):
                return f"{f.relative_to(path)} is not a complete torch file"
            if verify_checksums and (bad := damaged_record(f)):
                return f"{f.relative_to(path)}: {bad} (damaged after it was written)"
        return None
    if not path.is_file():
        return "missing"
    if not zipfile.is_zipfile(path):
        return "not a complete torch file (truncated or overwritten)"
    if verify_checksums and (bad := damaged_record(path)):
        return f"{bad} (damaged after it was written)"
    try:
        state = client_state(path)
    except Exception as err:  # noqa: BLE001  any failure to read means: do not resume from it
        return f"torch.load failed: {type(err).__name__}: {err}"
    missing = [k for k in (STATE_DICT, GLOBAL_STEP) if k not in state]
    return f"no {', '.join(missing)} in it" if missing else None


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in `ckpt_dir`, newest first: last.ckpt, then step checkpoints by descending step."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_NAME.match(p.name)),
                   key=lambda p: int(STEP_NAME.match(p.name).group(1)), reverse=True)
    last = ckpt_dir / "last.ckpt"
    return ([last] if os.path.lexists(last) else []) + steps


def resume_checkpoint(resume: str, ckpt_dir: str | Path, verify_checksums: bool = True) -> str | None:
    """The checkpoint to resume from for `trainer.resume` (None: start fresh)."""
    if resume == RESUME_NEVER:
        return None
    if resume != RESUME_AUTO:
        reason = unreadable_reason(Path(resume), verify_checksums)
        if reason is not None:
            raise FileNotFoundError(f"trainer.resume={resume!r}: cannot resume from it ({reason}); pass another "
                                    "checkpoint, trainer.resume=auto (newest readable in the run) or never")
        return resume
    skipped = []
    for path in candidates(Path(ckpt_dir)):
        reason = unreadable_reason(path, verify_checksums)
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


def checkpoint_step(path: str | Path) -> int:
    """The optimizer steps a checkpoint has trained (Lightning's `global_step`)."""
    return int(client_state(path).get(GLOBAL_STEP, 0))


def differences(saved, current, prefix: str = "") -> list[str]:
    """`key: checkpoint value → this run's value` for every leaf where two plain-data configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            out += differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current) \
            and any(isinstance(x, (dict, list)) for x in saved):
        # items with a name (regimes) are labelled by it: their index is not the one in the user's config
        labels = [a["name"] if isinstance(a, dict) and a.get("name") == getattr(b, "get", lambda _: None)("name")
                  else i for i, (a, b) in enumerate(zip(saved, current))]
        return [d for label, a, b in zip(labels, saved, current) for d in differences(a, b, f"{prefix}{label}.")]
    if saved != current:
        return [f"{prefix.rstrip('.')}: {_short(saved)} in the checkpoint, {_short(current)} now"]
    return []


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_same_run(path: str, current: dict | None, state: dict | None = None) -> int:
    """Refuse to resume a checkpoint of another architecture or schedule (a reused run directory, say), naming
    every field that differs, and a Lightning checkpoint that fpsa did not write. Returns the checkpoint's step
    (read from the same load). `state`: the checkpoint's `client_state`, when the caller has it open already."""
    state = client_state(path) if state is None else state
    step = int(state.get(GLOBAL_STEP, 0))
    saved = state.get(RUN_CONFIG_KEY)
    if saved is None:
        weights = list(state.get(STATE_DICT) or state.get(DEEPSPEED_MODULE) or {})
        if not weights or not all(k.startswith("model.") for k in weights):
            raise ConfigError(f"{path} is not an fpsa training checkpoint: it carries no run config "
                              f"({RUN_CONFIG_KEY}) and its weights are named like {weights[:2]} instead of "
                              "'model.blocks...'. Resume from a checkpoint written by `python -m fpsa_train`; to "
                              "start from pretrained Wan weights pass model.weights=<folder> instead")
        log.warning("%s carries no run config; resuming without checking that it is the same model", path)
        return step
    if current is None:
        return step
    differ = [d for key in ("model", "schedule") for d in differences(saved.get(key), current.get(key), f"{key}.")]
    if differ:
        shown = "; ".join(differ[:12]) + (f"; and {len(differ) - 12} more" if len(differ) > 12 else "")
        raise ConfigError(f"{path} belongs to another run: {shown}. Pass the old values to continue that run, or "
                          "trainer.resume=never or another hydra.run.dir to start a new one")
    return step
