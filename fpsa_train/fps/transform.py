"""`apply_fps_attention(model, schedule)`: put FPS attention into a built Wan DiT (a module swap).

Every block's `self_attn.core` (dense SDPA by default, models/attention.py) is replaced by `FPSAttention`, which
reads each sample's noise level from `attn_kwargs["sigma"]` and runs the sample through the regime that owns it:
in the Hopper FP8 kernels (fpsa_kernels, through fps/kernel.py: forward, and the Triton backward when training) on
H100/H200, in the PyTorch reference otherwise (`backend`, logged once per choice).
A batch whose samples fall into different regimes is split by regime and reassembled in order, so every sample
is computed exactly as it would be alone. Cross-attention stays dense, as in the paper. The model file never
imports this module.

Under torch.compile (the deploy runtime's opt-in `compile`), two things keep Dynamo's graph whole through every
layer. The regime is chosen once per step by the caller, from σ on the host (`batch_regime`), and passed by name as
`attn_kwargs["regime"]`: choosing it here from the σ tensor would read σ on the host in every layer (a graph break
each, and a sync each in eager runs too). And the kernel's inference forward is the custom op `fpsa::attention`
(fps/op.py), one opaque node with a fake implementation, instead of the host-side planning of a direct call. What
remains outside a whole graph: training (the kernel's autograd.Function), the PyTorch reference (host reads in its
tile loop), learned regimes (their selector's mask is read on the host to size it), and batches that mix regimes.

Which kernel forward runs an inference call is opt-in: `kernel_forward="gluon"` (`apply_fps_attention`) passes
`forward="gluon"` to the op, whose kernel then runs the warp-specialised Gluon forward (fpsa_kernels
KernelConfig.forward: Hopper, head dim 128, 1.16× the Triton forward dense at 1.3B-480p on the H200) instead of the
Triton one; training calls always run the Triton forward, and regimes the reference runs are unaffected.

Each core keeps what training logs and optimises: the realised density per regime from its last forward, the
learned selectors' density regulariser (`aux_loss`), and with `collect_stats` on, the FP8 range statistics of its
Q, K and V (`last_fp8_stats`, fps/fp8.py `e4m3_range_stats`). Selectors are per layer (one module per core), with
a per-head bias each. Under sequence parallelism (fpsa_train/sequence_parallel.py) a core sees only a range of
the heads, passed as `heads=slice(...)`; the selectors use those heads' bias entries, and all three statistics
are over those heads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fpsa_train.fps.fp8 import RangeStats, qkv_range_stats
from fpsa_train.fps.masks import LearnedSelector
from fpsa_train.fps.reference import attention_materialized, attention_tiles, select_tiles
from fpsa_train.fps.schedule import BACKENDS, Schedule, ScheduleError
from fpsa_train.models.token_order import TokenLayout

log = logging.getLogger(__name__)


_announced: set[str] = set()


def _announce(message: str) -> None:
    """Log which implementation runs, once per distinct message (not once per layer and step)."""
    if message not in _announced:
        _announced.add(message)
        log.info(message)


def batch_regime(schedule: Schedule, sigma: torch.Tensor | float) -> str | None:
    """The name of the regime that owns every σ of the batch (None when they fall into different regimes): what a
    caller that knows σ on the host passes as `attn_kwargs["regime"]`. A σ on the GPU is read once, here."""
    which = schedule.regime_index(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).cpu()).unique()
    return schedule.regimes[int(which[0])].name if which.numel() == 1 else None


def kernel_unavailable(q: torch.Tensor) -> str | None:
    """Why the FP8 kernel cannot run on q's device (None when it can)."""
    try:
        from fpsa_kernels import unsupported_reason
    except ImportError as err:  # no triton on this platform
        return f"fpsa_kernels cannot be imported ({err})"
    return unsupported_reason(q)


def check_kernel_forward(kernel_forward: str) -> None:
    """Raise ScheduleError unless `kernel_forward` names a forward of the kernel (fpsa_kernels.config.FORWARDS).
    Where fpsa_kernels cannot be imported (no triton) the kernel never runs, nothing reads the value, and it is not
    checked."""
    try:
        from fpsa_kernels.config import FORWARDS
    except ImportError:  # no triton on this platform
        return
    if kernel_forward not in FORWARDS:
        raise ScheduleError(f"kernel_forward={kernel_forward!r}: expected one of {FORWARDS}")


def kernel_fits(head_dim: int, quantized: bool) -> bool:
    """Whether the kernel implements a regime (`quantized`: its Regime.quantized) at this head dim (FP8 regimes
    only; its head dims)."""
    try:
        from fpsa_kernels.attention import HEAD_DIMS
    except ImportError:
        return False
    return quantized and head_dim in HEAD_DIMS


def reference_reason(device: torch.device, head_dim: int, regime, backend: str = "auto",
                     materialize: bool = False) -> str | None:
    """Why FPS attention runs `regime` in the PyTorch reference on `device` (None: the kernel runs it).

    The one decision behind both FPSAttention's choice per call and what the deploy runtime reports. Raises
    ScheduleError for backend=kernel on a device where the kernel cannot run."""
    return _reference_reason(device, head_dim, regime.quantized, backend, materialize)


def _reference_reason(device: torch.device, head_dim: int, quantized: bool, backend: str,
                      materialize: bool) -> str | None:
    """`reference_reason` on what it reads of the regime (whether it is quantized)."""
    if backend == "reference" or materialize:
        return f"fps.backend={backend}" if backend == "reference" else "materialize=true"
    if not kernel_fits(head_dim, quantized):
        return f"the kernel needs FP8 quantization and its head dims; head_dim is {head_dim}"
    reason = kernel_unavailable(torch.empty(0, device=device))
    if backend == "auto" and (reason is not None or device.type != "cuda"):
        return reason or "no CUDA device"
    if reason is not None:
        raise ScheduleError(f"fps.backend=kernel but {reason}; use fps.backend=auto to fall back to the reference")
    return None


@torch.compiler.assume_constant_result
def use_kernel(device: torch.device, head_dim: int, name: str, quantized: bool, backend: str,
               materialize: bool) -> bool:
    """Whether FPSAttention runs the regime `name` (`quantized`: its Regime.quantized) in the kernel
    (`reference_reason`), announcing a fallback once. A constant under Dynamo (decided, and announced, while
    tracing): its host checks are no part of a compiled graph. It takes primitives, not the Regime: torch 2.11's
    Dynamo turns each argument of an `assume_constant_result` function into a Python constant, which it cannot do
    for a frozen dataclass ("currently can't reconstruct arbitrary frozen dataclass instances"; 2.13 can)."""
    reason = _reference_reason(device, head_dim, quantized, backend, materialize)
    if reason is not None and backend != "reference" and not materialize:
        _announce(f"FPS attention: reference for regime {name!r} ({reason})")
    return reason is None


@torch.compiler.assume_constant_result
def _announce_kernel(device: torch.device, training: bool) -> None:
    """Announce the kernel once per device and mode (while tracing, under Dynamo: logging is no part of a graph)."""
    _announce(f"FPS attention: Hopper FP8 Triton kernel (fpsa_kernels) on {device}, "
              f"{'forward and backward (training)' if training else 'forward'}")


def graph_breaks(schedule: Schedule, device: torch.device, head_dim: int, backend: str = "auto",
                 materialize: bool = False) -> dict[str, str]:
    """{regime: why} for the regimes whose steps break a compiled DiT's graph in every layer; {} when each step is
    one graph (every regime in the kernel's inference op, none learned). See the module docstring."""
    breaks = {}
    for r in schedule.regimes:
        reason = reference_reason(device, head_dim, r, backend, materialize)
        if reason is not None:
            breaks[r.name] = f"the PyTorch reference runs it ({reason})"
        elif r.pattern == "learned":
            breaks[r.name] = "its learned selector's mask is sized on the host"
    return breaks


class FPSAttention(nn.Module):
    """Self-attention core running the regime that each sample's σ selects (kernel or PyTorch reference)."""

    def __init__(self, schedule: Schedule, num_heads: int, layer: int, materialize: bool = False,
                 backend: str = "auto", kernel_forward: str = "triton"):
        super().__init__()
        if backend not in BACKENDS:
            raise ScheduleError(f"fps.backend={backend!r}: expected one of {BACKENDS}")
        check_kernel_forward(kernel_forward)
        self.schedule = schedule  # also sets _specs
        self.layer = layer
        self.materialize = materialize
        self.backend = backend
        self.kernel_forward = kernel_forward  # the op's `forward` for inference calls: "triton" or "gluon"
        self.last_backend: str | None = None  # "kernel" or "reference": what the last forward ran
        self.selectors = nn.ModuleDict({
            r.name: LearnedSelector(num_heads, r.target_density, r.temperature)
            for r in schedule.regimes if r.pattern == "learned"})
        self._last_density: dict[str, torch.Tensor] = {}  # fp32 () per regime, read on the host only when asked
        self.aux_loss: torch.Tensor | None = None
        self.collect_stats = False  # record last_fp8_stats on every forward (costs a pass over Q, K, V)
        self.last_fp8_stats: dict[str, float] = {}  # {"saturated", "underflow"} rates; {} when nothing quantized

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        """Set (or swap, as the deploy runtime's `only_regime` does) the schedule, with each regime's op form.

        `_specs` {name: `regime_spec(regime)`}: what the inference op takes, computed here, outside any compiled
        region, so a compiled forward reads a string from a dict instead of passing the Regime (a frozen
        dataclass) to `regime_spec`, which torch 2.11's Dynamo cannot do (see `use_kernel`)."""
        from fpsa_train.fps.op import regime_spec

        self._schedule = schedule
        self._specs = {r.name: regime_spec(r) for r in schedule.regimes}

    @property
    def last_density(self) -> dict[str, float]:
        """{regime: fraction of tile pairs computed} of the last forward, mean over its samples and heads."""
        return {name: float(d) for name, d in self._last_density.items()}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                sigma: torch.Tensor | float | None = None, heads: slice | None = None, regime: str | None = None,
                **attn_kwargs) -> torch.Tensor:
        """q, k, v (B, H, L, D) → out (B, H, L, D) in v's dtype. Each sample runs in the regime that owns its σ;
        `regime` (a name of the schedule) runs the whole batch in that regime instead, for a caller that chose it
        from σ on the host (`batch_regime`; the deploy runtime does, once per step), so nothing here reads σ."""
        # q, k, v: (B, H, L, D), tokens in tile-major order; H = all heads, or the range `heads` of them
        if regime is not None:
            groups = [(self._regime_named(regime), None)]  # (regime, the samples in it): all of them
        else:
            if sigma is None:
                raise ValueError("FPS attention picks its regime from the noise level: call the model with "
                                 "attn_kwargs={'sigma': σ} (a float or one value per sample)")
            b = q.shape[0]
            sigma = torch.as_tensor(sigma, device=q.device).reshape(-1)
            if sigma.numel() == 1:
                sigma = sigma.expand(b)
            elif sigma.numel() != b:
                raise ValueError(f"sigma has {sigma.numel()} values for a batch of {b}")
            which = self.schedule.regime_index(sigma)  # (B,)
            groups = [(self.schedule.regimes[r], (which == r).nonzero().flatten())  # the samples in regime r
                      for r in torch.unique(which).tolist()]
        outputs, order, aux, stats = [], [], [], []
        self._last_density = {}
        for chosen, idx in groups:
            qr, kr, vr = (q, k, v) if idx is None else (q[idx], k[idx], v[idx])
            selector = self.selectors[chosen.name] if chosen.name in self.selectors else None
            out, density, reg_loss = self._attend(qr, kr, vr, layout, chosen, selector, heads)
            outputs.append(out)
            order.append(idx)
            self._last_density[chosen.name] = density
            if reg_loss is not None:
                aux.append(reg_loss)
            if self.collect_stats and chosen.quantized:
                stats.append(qkv_range_stats(qr, kr, vr, layout, chosen.quant))
        self.aux_loss = torch.stack(aux).sum() if aux else None
        self.last_fp8_stats = sum(stats, RangeStats(0, 0, 0, 0)).rates() if stats else {}
        out = torch.cat(outputs) if len(outputs) == 1 else torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return out.to(v.dtype)  # (B, H, L, D)

    def _regime_named(self, name: str):
        for regime in self.schedule.regimes:
            if regime.name == name:
                return regime
        raise ScheduleError(f"attn_kwargs regime={name!r} is not in the schedule: its regimes are "
                            f"{[r.name for r in self.schedule.regimes]}")

    def _attend(self, q, k, v, layout: TokenLayout, regime, selector, heads: slice | None):
        """One regime's samples: (out (B, H, L, D), density fp32 (), the selector's regulariser or None)."""
        if not use_kernel(q.device, q.shape[-1], regime.name, regime.quantized, self.backend, self.materialize):
            self.last_backend = "reference"
            attend = attention_materialized if self.materialize else attention_tiles
            out, sel = attend(q, k, v, layout, regime, selector, heads=heads)
            return out, sel.mask.density().mean(), sel.reg_loss
        self.last_backend = "kernel"
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        sel = None
        if grad or regime.pattern == "learned":  # the selector's mask (and gate), or the training path's mask
            sel = select_tiles(q, k, layout, regime, selector, heads)
            grad = grad or (torch.is_grad_enabled() and sel.gate is not None and sel.gate.requires_grad)
        _announce_kernel(q.device, grad)
        if not grad:  # inference: the custom op (fps/op.py), which selects top-k masks itself
            from fpsa_train.fps.op import fps_attention_op

            keep, max_kept = (None, 0) if sel is None else (sel.mask.to_dense(), sel.mask.max_kept)
            out, _, density = fps_attention_op(q, k, v, layout, self._specs[regime.name], keep, max_kept,
                                               self.kernel_forward)
            return out, density, None if sel is None else sel.reg_loss
        from fpsa_train.fps.kernel import fps_attention  # here, not at the top: triton is Linux-only

        static = regime.pattern in ("dense", "window")  # fps_attention reuses its cached plan for these
        # training: the Triton forward whatever kernel_forward says (it saves what the backward needs)
        out, _ = fps_attention(q, k, v, layout, regime, None if static else sel.mask, sel.gate)
        return out, sel.mask.density().mean(), sel.reg_loss


def apply_fps_attention(model: nn.Module, schedule: Schedule, materialize: bool = False,
                        backend: str = "auto", kernel_forward: str = "triton") -> nn.Module:
    """Swap every block's self-attention core for FPS attention (in place; returns the model). `kernel_forward`:
    the kernel's forward for inference calls, "triton" (default) or "gluon" (the module docstring; each core checks
    it)."""
    cfg = model.cfg
    if cfg.token_order != "tile":
        raise ScheduleError(f"FPS attention needs tile-major tokens: model.token_order={cfg.token_order!r}, "
                            "set model.token_order=tile")
    for regime in schedule.regimes:
        if regime.quant is not None:
            regime.quant.group_shape(tuple(cfg.tile_shape))  # raises naming the axis if it does not fit the tile
    for i, block in enumerate(model.blocks):
        core = FPSAttention(schedule, cfg.num_heads, i, materialize, backend, kernel_forward)
        device = next(block.parameters()).device  # learned selectors live where their block does
        block.self_attn.core = core if device.type == "meta" else core.to(device)
    log.info("FPS attention (backend %s%s%s) in %d blocks:\n  %s", backend, ", materialised" if materialize else "",
             "" if kernel_forward == "triton" else f", {kernel_forward} kernel forward", len(model.blocks),
             "\n  ".join(r.describe() for r in schedule.regimes))
    return model


def fps_cores(model: nn.Module) -> list[FPSAttention]:
    return [m for m in model.modules() if isinstance(m, FPSAttention)]


def selector_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the learned selectors' density regularisers from the last forward (None when there are none)."""
    losses = [c.aux_loss for c in fps_cores(model) if c.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def fp8_stats(model: nn.Module) -> dict[int, dict[str, float]]:
    """Per layer, the FP8 range statistics of the last forward (layers whose cores collect them and quantized)."""
    return {core.layer: core.last_fp8_stats for core in fps_cores(model) if core.last_fp8_stats}


def realised_density(model: nn.Module) -> dict[str, float]:
    """Mean realised density per regime over the layers, from the last forward."""
    per_regime: dict[str, list[float]] = {}
    for core in fps_cores(model):
        for name, d in core.last_density.items():
            per_regime.setdefault(name, []).append(d)
    return {name: sum(ds) / len(ds) for name, ds in per_regime.items()}
