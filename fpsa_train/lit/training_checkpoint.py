"""Reading the training checkpoints a run writes, in every form they take, and the keys they carry.

The one reader behind export (the weights, the EMA, the run config), calibrate (the weights) and resume (the step
and the run config, before Lightning restores the rest). Three forms:
- a Lightning checkpoint file (`last.ckpt`, `stepNNNNNNN.ckpt`): one torch file, the LightningModule's state dict
  under `state_dict` beside the client state (step, EMA, run config);
- a DeepSpeed ZeRO checkpoint folder (what Lightning's DeepSpeed strategy writes under the same names): every
  rank's partition, consolidated here (lit/zero_checkpoint.py); the client state is in its model-states file;
- the single file Lightning's `convert_zero_checkpoint_to_fp32_state_dict` makes of such a folder, read as the
  first form.
Files are read with `torch.load(weights_only=True)`, memory-mapped: nothing is unpickled, and a tensor is read
only when it is used.

The keys are defined here and nowhere else; FlowMatchingModule (lit/module.py) writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fpsa_train.lit.config import WEIGHT_CHOICES, weight_choice  # noqa: F401  WEIGHT_CHOICES re-exported
from fpsa_train.models.checkpoint_config import CheckpointError

STATE_DICT = "state_dict"  # Lightning: the LightningModule's state dict (keys `model.<our key>`, MODULE_PREFIXES)
GLOBAL_STEP = "global_step"  # Lightning: the optimizer steps trained
DEEPSPEED_MODULE = "module"  # DeepSpeed's model-states file: the module's state dict (empty parameters under ZeRO-3)
RUN_CONFIG_KEY = "fpsa_run_config"  # FlowMatchingModule.run_config (train.run_config): architecture, schedule, clip
EMA_KEY = "ema"  # the EMA shadow (lit/ema.py) in our key names, without a prefix
EMA_PARTITIONED_KEY = "ema_partitioned"  # True when EMA_KEY holds this rank's ZeRO-3 slices, not full tensors
# Lightning's state-dict keys are the module attribute path: `model.<our key>`, under DeepSpeed maybe
# `_forward_module.model.<our key>`.
MODULE_PREFIXES = ("_forward_module.model.", "model.")


def client_state(path: str | Path) -> dict:
    """The top-level dict of a checkpoint (tensors memory-mapped, not read): the Lightning file, or for a DeepSpeed
    folder its model_states file (which carries Lightning's client state)."""
    path = Path(path)
    if path.is_dir():
        path = min(path.rglob("*model_states.pt"))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass
class TrainingCheckpoint:
    """A training checkpoint's contents in our key names (no `model.` prefix), the full tensors of every form."""

    weights: dict[str, torch.Tensor]
    """The live weights, as training left them (under ZeRO: the fp32 master weights)."""
    ema: dict[str, torch.Tensor] | None
    """The EMA of the trainable weights, when the run kept one (optim.ema_decay > 0)."""
    run_config: dict | None
    """What the run wrote under RUN_CONFIG_KEY (architecture, schedule, clip size), None when absent."""
    global_step: int | None
    kind: str
    """`lightning` (a file) or `deepspeed` (a ZeRO folder)."""
    path: Path


def _unwrap(state_dict: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    for prefix in MODULE_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    raise CheckpointError(f"{where}: expected the LightningModule's `model.*` keys, got e.g. {list(state_dict)[:4]}")


def read_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """The weights, EMA, run config and step of a Lightning checkpoint file, a DeepSpeed ZeRO checkpoint folder or
    a consolidated file. A file that is not a Lightning checkpoint, or whose weights are not the LightningModule's
    `model.*`, is a CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        from fpsa_train.lit.zero_checkpoint import read_zero_checkpoint  # here: it imports the key names above

        weights, client = read_zero_checkpoint(path)
        weights, kind = _unwrap(weights, path), "deepspeed"
    elif path.is_file():
        try:
            client = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  refused pickles, truncated or foreign files: say which file
            raise CheckpointError(f"{path}: cannot read it as a training checkpoint with torch.load(weights_only=True)"
                                  f" ({type(e).__name__}: {e})") from e
        if not isinstance(client, dict) or STATE_DICT not in client:
            raise CheckpointError(f"{path}: not a Lightning checkpoint (no `{STATE_DICT}`); pass a checkpoint a "
                                  "training run writes (outputs/<name>/<run>/checkpoints/last.ckpt)")
        weights, kind = _unwrap(client[STATE_DICT], path), "lightning"
    else:
        raise FileNotFoundError(f"checkpoint={str(path)!r} does not exist")
    return TrainingCheckpoint(weights, client.get(EMA_KEY), client.get(RUN_CONFIG_KEY), client.get(GLOBAL_STEP),
                              kind, path)


def pick_weights(ckpt: TrainingCheckpoint, choice: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict `choice` asks for (one of WEIGHT_CHOICES, lit/config.py; `auto`: the EMA when the checkpoint
    has one) and which weights it is ("ema" or "live"). The EMA covers the trainable weights; the rest come from the
    live weights."""
    choice = weight_choice(choice, "weights")
    if choice == "live" or (choice == "auto" and not ckpt.ema):
        return ckpt.weights, "live"
    if not ckpt.ema:
        raise CheckpointError(f"{ckpt.path}: weights=ema but the checkpoint has no EMA (trained with "
                              "optim.ema_decay=0); take weights=live")
    unexpected = sorted(ckpt.ema.keys() - ckpt.weights.keys())
    bad = [k for k, t in ckpt.ema.items() if k in ckpt.weights and t.shape != ckpt.weights[k].shape]
    if unexpected or bad:
        raise CheckpointError(f"{ckpt.path}: the checkpoint's EMA does not match its weights (unexpected "
                              f"{unexpected[:10]}, shape differs for {bad[:10]}); take weights=live")
    return {**ckpt.weights, **ckpt.ema}, "ema"
