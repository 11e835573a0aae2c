"""Exponential moving average of the weights, kept in fp32 beside the model.

shadow ← decay·shadow + (1−decay)·param after every optimizer step; with `warmup`, the decay at optimizer step t
is min(decay, (1 + t) / (10 + t)) (0.1 at the first step, 0.9 at step 80, 0.99 at step 890, 0.999 from step
8,990), so the average of a short run from scratch is not its random initialisation (t is the trainer's step,
restored on resume). Only trainable floating-point parameters are tracked. The shadow is built by
`attach(model)` once the strategy has placed the model (Lightning's on_fit_start), so it lives where the
parameters live, and its state dict goes into every checkpoint: a resumed run continues the same average, and
export uses it by default.

Under DeepSpeed ZeRO-3 a parameter is partitioned: each rank holds only its flat slice `p.ds_tensor` (numel
ceil(n/world), the last one zero-padded), and `p` itself is empty outside forward and backward. The EMA then
averages each rank's slice (`partitioned` = True): no rank ever holds a full-size shadow (56 GB in fp32 for 14B),
and each rank's checkpoint file carries its own slices. `consolidate_partitions` joins the ranks' slices back
into full tensors (export does this).

`applied(model)` lends the averaged weights to the model for a while (validation videos sample with them) and
gives the live ones back bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _tracked(model: nn.Module):
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point():
            yield name, p


def _values(p: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: the ZeRO-3 partition when the parameter is partitioned, else the parameter."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    def __init__(self, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.shadow: dict[str, torch.Tensor] | None = None
        self.partitioned = False
        self._pending: dict[str, torch.Tensor] | None = None  # a checkpoint's state loaded before attach

    def attach(self, model: nn.Module) -> "EMA":
        """Start the average from the model's current weights (or from a loaded state), on their device."""
        params = dict(_tracked(model))
        self.partitioned = any(hasattr(p, "ds_tensor") for p in params.values())
        self.shadow = {n: _values(p).detach().float().clone() for n, p in params.items()}
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return self

    def decay_at(self, step: int | None) -> float:
        """The decay of the update at optimizer step `step` (0-based; None: the plain decay)."""
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        if self.shadow is None:
            raise RuntimeError("EMA.update before EMA.attach(model)")
        weight = 1 - self.decay_at(step)
        for name, p in _tracked(model):
            if name in self.shadow:
                self.shadow[name].lerp_(_values(p).detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.shadow is None:
            raise RuntimeError("EMA.state_dict before EMA.attach(model)")
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.shadow is None:
            self._pending = dict(state)
            return
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:20]}, "
                           f"unexpected {sorted(unexpected)[:20]}")
        wrong = [n for n, t in state.items() if t.shape != self.shadow[n].shape]
        if wrong:
            kind = "ZeRO-3 partitions" if self.partitioned else "full tensors"
            raise ValueError(f"EMA state shapes differ from the model's ({kind} expected), e.g. {wrong[0]}: "
                             f"{tuple(state[wrong[0]].shape)} vs "
                             f"{tuple(self.shadow[wrong[0]].shape)}; resume with the same strategy and world size")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into the model (cast to each parameter's dtype); full tensors only."""
        if self.shadow is None or self.partitioned:
            raise RuntimeError("EMA.copy_to needs an attached, unpartitioned EMA")
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: nn.Module):
        """Inside, the model computes with the averaged weights (cast to each parameter's dtype); on exit, also on
        an error, the live weights are back bit for bit. The live weights wait in CPU memory meanwhile (one copy
        of the model in its dtype per process), so this costs no accelerator memory. Full tensors only: a ZeRO-3
        rank holds only its slice of each average."""
        if self.shadow is None or self.partitioned:
            raise RuntimeError("EMA.applied needs an attached, unpartitioned EMA")
        params = dict(_tracked(model))
        if params.keys() != self.shadow.keys():
            diff = sorted(params.keys() ^ self.shadow.keys())
            raise KeyError(f"EMA.applied: the model's trainable parameters are not the averaged ones, e.g. {diff[:5]}")
        live = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])


def consolidate_partitions(ranks: list[dict[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]) \
        -> dict[str, torch.Tensor]:
    """Full tensors from the ZeRO-3 EMA slices of every rank (in rank order): concatenate, drop the padding."""
    out = {}
    for name, shape in shapes.items():
        missing = [r for r, state in enumerate(ranks) if name not in state]
        if missing:
            raise KeyError(f"the ZeRO-3 EMA of rank(s) {missing} has no {name!r}")
        flat = torch.cat([state[name].reshape(-1) for state in ranks])
        numel = torch.Size(shape).numel()
        if flat.numel() < numel:
            raise ValueError(f"ZeRO-3 EMA slices of {name!r} hold {flat.numel()} values, the parameter {numel}")
        out[name] = flat[:numel].reshape(shape).clone()
    return out
