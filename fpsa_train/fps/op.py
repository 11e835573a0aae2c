"""`fpsa::attention`: the FP8 kernel's inference forward as a `torch.library` custom op, so torch.compile can
compile the DiT around it.

Why an op. `fps/kernel.py` `fps_attention` does host work on every call: it selects the top-k mask from q and k and
reads its counts on the host, builds (or looks up) the work plan, makes TMA descriptors and launches Triton. Dynamo
cannot trace that, so a compiled DiT broke its graph in every attention layer (under the CPU interpreter it could
not even run). A custom op is one opaque node to the compiler: its real implementation runs eagerly with real
tensors, and its fake implementation (`register_fake`) tells the compiler what comes out without running it. The
projections, norms, RoPE, modulation, cross-attention and FFN around it compile into one graph.

What crosses the boundary. An op takes tensors and primitive values only, so the token layout travels as its grid
and tile shape (the kernel's token order is always tile-major), and the regime as its schedule entry in JSON
(`regime_spec`: the form export writes to schedule.json, parsed back and validated by the same schedule code, cached
both ways, so nothing about a regime is restated here). Under Dynamo both are trace-time constants: FPSAttention
computes each regime's spec when its schedule is set, outside any compiled region, and passes the string (torch
2.11's Dynamo cannot turn a Regime, a frozen dataclass, into a constant; 2.13 can). A compiled graph holds its regime
and grid, and Dynamo guards on them, so each regime of the schedule and each resolution gets its own graph.

Why a third output. The op returns (out, lse, density): density is the fraction of tile pairs computed (the mask's
`density()`, mean over batch and heads), which FPSAttention keeps for logging and the sampler's trace. Computed
inside the op it stays a device tensor: nothing in the compiled region reads it on the host. Dense and window masks
are static, so their density is computed once per layout and regime and cached.

Eager calls are the direct call. The implementation is `fps_attention(q, k, v, layout, regime, mask, forward=...)`
with no mask for dense and window (fps/kernel.py's cached plans), the top-k selection that fps_attention itself
makes without one (`masks.select_keep`, no host read; made here to keep its density), and for learned regimes the
given mask as a KeepMask with the selector's bound (its TileMask was read on the host once already; it is not
rebuilt here). So the op's output is bit for bit the direct call's (tests/fps/test_op.py).

Which forward. `forward` ("triton" | "gluon", fpsa_kernels.KernelConfig.forward) picks the kernel that computes
the call: the Triton forward, or the warp-specialised Gluon one (Hopper, head dim 128; it raises elsewhere, on the
CPU interpreter too). A primitive string, so a compiled graph holds it as a constant, as it holds the regime.

Scope: inference. No autograd formula is registered (calling it on inputs that require grad raises); training keeps
`fps_attention`'s autograd.Function, which FPSAttention calls when grad is needed. Learned regimes select their mask
with the layer's selector outside the op and pass it as `keep`.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor

from fpsa_train.fps.masks import KeepMask, select_keep
from fpsa_train.fps.reference import select_tiles
from fpsa_train.fps.schedule import Regime, regime_config, regime_from_config, regimes_from_data
from fpsa_train.models.token_order import TokenLayout


@torch.compiler.assume_constant_result
def regime_spec(regime: Regime) -> str:
    """The regime as the op takes it: its schedule entry (as `Schedule.to_dict` writes it) in canonical JSON.

    A trace-time constant under Dynamo from torch 2.13 (2.11 cannot take a frozen dataclass as the argument of an
    `assume_constant_result` function: compute the spec outside the compiled region, as FPSAttention does); cached,
    so eager calls pay a dict lookup. (The cache sits in a separate function: Dynamo traces through an lru_cache
    wrapper, into OmegaConf.)"""
    return _regime_spec(regime)


@functools.lru_cache(maxsize=None)
def _regime_spec(regime: Regime) -> str:
    return json.dumps(OmegaConf.to_container(OmegaConf.structured(regime_config(regime))), sort_keys=True)


@functools.lru_cache(maxsize=None)
def regime_of_spec(spec: str, tile_shape: tuple[int, int, int]) -> Regime:
    """The inverse of `regime_spec`, validated as a schedule file is."""
    try:
        data = json.loads(spec)
    except json.JSONDecodeError as err:
        raise ValueError(f"fpsa::attention: regime {spec!r} is not JSON ({err}); pass regime_spec(regime)") from None
    return regime_from_config(regimes_from_data([data])[0], "fpsa::attention regime", tile_shape)


_STATIC_DENSITY: dict[tuple, Tensor] = {}


def _static_density(q: Tensor, k: Tensor, layout: TokenLayout, regime: Regime, spec: str) -> Tensor:
    """Fraction of tile pairs a dense or window regime keeps on this layout (fp32 scalar on q's device), cached."""
    key = (layout, spec, str(q.device))
    if key not in _STATIC_DENSITY:
        _STATIC_DENSITY[key] = select_tiles(q, k, layout, regime).mask.density().mean()
    return _STATIC_DENSITY[key].clone()  # a fresh output: the cached one would alias every call's (and the cache)


# cudagraph_unsafe: a top-k plan is sized on the host and every call allocates its plan and outputs, so CUDA graphs
# (torch.compile mode="reduce-overhead") must be split around the op, which Inductor's graph partition does.
@torch.library.custom_op("fpsa::attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attention(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], grid: list[int], tile_shape: list[int],
              regime: str, max_kept: int = 0, forward: str = "triton") -> tuple[Tensor, Tensor, Tensor]:
    """FPS attention forward (fps/kernel.py `fps_attention`) for one regime: (out bf16 (B, H, L, D) contiguous,
    lse fp32 (B, H, L), density fp32 ()).

    q, k, v: (B, H, L, D), tokens in tile-major order of the layout (grid, tile_shape); regime: `regime_spec(r)`;
    keep: bool (B|1, H|1, N, N) kept tile pairs for a learned regime (its selector's mask), else None (the regime
    selects its own); max_kept: no row of keep keeps more key tiles than this (the selector's TileMask knows it:
    its width), which sizes the plan without reading keep on the host; 0 takes N, always true but a larger plan;
    forward: which kernel computes it, "triton" or "gluon" (KernelConfig.forward; the module docstring)."""
    from fpsa_train.fps.kernel import fps_attention  # here, not at the top: triton is Linux-only

    layout = TokenLayout(tuple(grid), "tile", tuple(tile_shape))
    reg = regime_of_spec(regime, layout.tile_shape)
    if reg.pattern == "learned" and keep is None:
        raise ValueError(f"fpsa::attention: regime {reg.name!r} is `learned`: pass its selector's mask as keep "
                         "(FPSAttention does)")
    if reg.pattern in ("dense", "window"):  # fps_attention uses its cached static plan
        out, lse = fps_attention(q, k, v, layout, reg, forward=forward)
        return out, lse, _static_density(q, k, layout, reg, regime)
    if keep is not None:
        mask = KeepMask(keep, max_kept or keep.shape[-1])
    else:  # the selection fps_attention makes when given no mask (no host read), kept for its density
        mask = select_keep(q, k, layout, reg.topk_of(len(layout.tile_sizes())), reg.window)
    out, lse = fps_attention(q, k, v, layout, reg, mask, forward=forward)
    return out, lse, mask.density().mean()


@attention.register_fake
def _(q, k, v, keep, grid, tile_shape, regime, max_kept=0, forward="triton"):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"fpsa::attention: q, k, v must be (B, H, L, D) of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, seq, _ = q.shape
    out = q.new_empty(q.shape, dtype=torch.bfloat16)  # contiguous, as the kernel writes it
    lse = q.new_empty((b, h, seq), dtype=torch.float32)
    return out, lse, q.new_empty((), dtype=torch.float32)


def fps_attention_op(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, regime: Regime | str,
                     keep: Tensor | None = None, max_kept: int = 0,
                     forward: str = "triton") -> tuple[Tensor, Tensor, Tensor]:
    """`fpsa::attention` on the objects FPSAttention holds: (out, lse, density), see `attention`.

    `regime`: a Regime, or its `regime_spec`. Under torch.compile pass the spec (FPSAttention does): a Regime
    reaches `regime_spec` as a frozen dataclass, which torch 2.11's Dynamo cannot make a trace-time constant.
    `forward`: "triton" or "gluon", the kernel that computes it (see `attention`)."""
    if layout.order != "tile":
        raise ValueError("the kernel needs tokens in tile-major order: set model.token_order=tile")
    spec = regime if isinstance(regime, str) else regime_spec(regime)
    return torch.ops.fpsa.attention(q, k, v, keep, list(layout.grid), list(layout.tile_shape), spec, max_kept,
                                    forward)
