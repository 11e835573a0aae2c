"""Atomic Lightning checkpoints: written to a temporary file in the same folder, fsynced, then renamed
(fpsa_train/atomic.py).

A run killed mid-save leaves the previous checkpoint intact instead of a truncated `last.ckpt`; the temporary file
it leaves is removed when training starts again (lit/checkpointing.py).
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fpsa_train.atomic import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))
