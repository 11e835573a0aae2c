"""FPS attention for one regime in the Hopper FP8 kernels: from a token layout and a regime to the kernel's inputs.

The kernel package (`fpsa_kernels`) takes tensors, scale groups and plans and knows nothing of layouts or
schedules. This module is the framework's side of that seam: a regime's quantization granularity on a layout becomes
the pre-pass's scale groups (`quant_groups`), its sparsity pattern a tile mask (selected from q and k for top-k,
`masks.select_keep`) and the mask a work plan (`plan_for`). Dense and window plans and the scale groups are static
per layout, so they are built once and cached; a top-k mask is selected and planned on the GPU with no host read,
so a call does not wait for the GPU.

Needs triton (a Linux-only dependency): framework code that must import without it (transform.py, op.py) imports
this module where it calls the kernel.
"""

from __future__ import annotations

import functools

import torch

from fpsa_kernels import KernelConfig, Plan, QuantGroups, fp8_attention
from fpsa_kernels.attention import check_supported
from fpsa_kernels.plan import TileSpans, dense_plan, tile_plan, tile_spans
from fpsa_train.fps.fp8 import QuantGranularity, token_group_ids
from fpsa_train.fps.masks import select_keep, token_ranges, token_tiles, window_keep
from fpsa_train.fps.schedule import Regime
from fpsa_train.models.token_order import TokenLayout


def quant_groups(layout: TokenLayout, granularity: QuantGranularity, device: torch.device | str) -> QuantGroups:
    """The pre-pass's scale groups of `granularity` on `layout` (tokens in the layout's order), on `device`: one
    scale per token for `token`, else the group tables, cached per (layout, group shape, device)."""
    if granularity.group == "token":
        return QuantGroups(layout.seq_len)
    group_shape = tuple(int(g) for g in granularity.group_shape(tuple(layout.tile_shape)))
    return _group_tables(tuple(layout.grid), layout.order, tuple(layout.tile_shape), group_shape,
                         str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _group_tables(grid, order, tile_shape, group_shape, device: str) -> QuantGroups:
    return QuantGroups.from_ids(*token_group_ids(TokenLayout(grid, order, tile_shape), group_shape, device))


_STATIC_PLANS: dict[tuple, Plan] = {}


@functools.lru_cache(maxsize=64)
def _layout_spans(layout: TokenLayout, block_m: int, block_n: int, device: str) -> TileSpans:
    """`tile_spans` of the layout's tiles, looked up per layout (their offsets as a tuple cost a host computation)."""
    return tile_spans(tuple(token_ranges(layout).tolist()), block_m, block_n, device)


def plan_for(mask, layout: TokenLayout, regime: Regime | None, block_m: int, block_n: int, device,
             transpose: bool = False) -> Plan:
    """The work plan of `mask` (masks.TileMask, or the KeepMask of `select_keep`); with mask None, the regime's
    static plan (dense or window), cached per layout.

    Nothing here reads the mask on the host (fpsa_kernels.plan `tile_plan`): the plan's arrays are sized by the
    mask's `max_kept`, a bound known without looking (a TileMask's width, a selection's k plus its window), so on a
    GPU building a plan only queues work. A row that keeps no key tile fails a device-side check.

    `transpose`: the plan of the transposed mask (items over key tiles, chunks over the query tiles attending them),
    for the backward's dK/dV kernel; a key tile that no query attends gets an item with no chunks. Any number of
    query tiles may pick the same key tile, so its rows are bounded by the number of tiles only."""

    def plan_of(mask):
        spans = _layout_spans(layout, block_m, block_n, str(device))
        keep = mask.to_dense().to(device)
        if transpose:
            return tile_plan(keep.transpose(-1, -2), spans, spans.num_tiles, allow_empty=True)
        return tile_plan(keep, spans, mask.max_kept)

    if mask is not None:
        return plan_of(mask)
    if regime.pattern not in ("dense", "window"):
        raise ValueError(f"regime {regime.name!r} ({regime.pattern}) selects its tiles from q and k: pass its mask")
    key = (tuple(layout.grid), tuple(layout.tile_shape), regime.pattern, regime.window, block_m, block_n, str(device),
           transpose)
    if key not in _STATIC_PLANS:
        if regime.pattern == "dense":
            _STATIC_PLANS[key] = dense_plan(layout.seq_len, block_m, block_n, device)
        else:
            _STATIC_PLANS[key] = plan_of(window_keep(layout.tile_grid, regime.window, device))
    return _STATIC_PLANS[key]


def fps_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, regime: Regime, mask=None,
                  gate=None, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 tile-sparse attention for one regime of the schedule (DESIGN.md numerics, Hopper), differentiable.

    q, k, v: (B, H, L, D) bf16 (or fp16/fp32), tokens in tile-major order of `layout` (models/token_order.py), any
    strides with a contiguous last dimension; D 64 or 128; any L. `regime` (fps/schedule.py) must quantize; its
    Q/K scale groups, window and top-k are applied as fps/reference.py defines them. `mask` (masks.TileMask or
    KeepMask) is the tile mask to use; None takes the regime's own (dense and window plans are built once per layout
    and cached; top-k masks are selected from q, k by `masks.select_keep`, as the reference's `select_tiles` does,
    and planned with no host read, so the call does not wait for the GPU; a `learned` regime needs its mask given,
    and its selector's `gate` (B, H, N, N), forward value 1, to receive the gate's gradient). `knobs`: fields of
    fpsa_kernels.KernelConfig (block_m, block_n, num_warps, num_stages, qk_imprecise_acc, bwd_blocks = (dQ rows,
    dQ key chunk, dK/dV key rows, dK/dV query chunk), bwd_warps, bwd_stages, forward = "triton" | "gluon" for
    inference calls); an unknown one is a TypeError, and
    one given as None takes its default (so callers can pass "no preference" through).

    Returns (out bf16 (B, H, L, D) contiguous, lse fp32 (B, H, L)), as `fpsa_kernels.fp8_attention`, which runs it:
    when grad is enabled and q, k, v or gate require it, an autograd op whose backward runs the Triton backward over
    the same tile lists (the gradients of the reference's straight-through definition). Raises ValueError for
    unsupported devices, head dims or regimes.
    """
    config = KernelConfig(**{name: value for name, value in knobs.items() if value is not None})
    check_supported(q)
    if not regime.quantized:
        raise ValueError(f"regime {regime.name!r} does not quantize (quant: null): the FP8 kernel needs FP8 inputs; "
                         "run unquantized regimes through the reference (fps/reference.py) or dense SDPA")
    if layout.order != "tile":
        raise ValueError("the kernel needs tokens in tile-major order: set model.token_order=tile")
    if mask is None and regime.pattern in ("topk", "window_topk"):  # dense and window plans are static, cached
        mask = select_keep(q, k, layout, regime.topk_of(len(layout.tile_sizes())), regime.window)
    if mask is None and regime.pattern == "learned":
        raise ValueError(f"regime {regime.name!r} is `learned`: pass the selector's mask")
    if gate is not None:
        if mask is None:
            raise ValueError("a gate needs its mask: pass the selector's mask with its gate")
        want = (q.shape[0], q.shape[1], mask.num_kv_tiles, mask.num_kv_tiles)
        if tuple(gate.shape) != want:
            raise ValueError(f"gate must be (B, H, N, N) = {want}; got {tuple(gate.shape)}")

    def planner(block_m: int, block_n: int, transpose: bool) -> Plan:
        return plan_for(mask, layout, regime, block_m, block_n, q.device, transpose)

    return fp8_attention(q, k, v, quant_groups(layout, regime.quant, q.device), planner, gate,
                         None if gate is None else token_tiles(layout, q.device), config)
