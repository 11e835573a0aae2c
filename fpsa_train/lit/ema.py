"""Exponential moving average of the weights, kept in fp32 beside the model.

shadow ← decay·shadow + (1−decay)·param after every optimizer step. Only trainable floating-point parameters are
tracked. The shadow lives on the parameters' device; its state dict goes into every checkpoint so a resumed run
continues the same average, and export uses it by default.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()
                       if p.requires_grad and p.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def to(self, device: torch.device) -> "EMA":
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:20]}, "
                           f"unexpected {sorted(unexpected)[:20]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into the model (cast to each parameter's dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])
