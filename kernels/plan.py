"""Work plan of the tile-sparse attention kernel: which query rows each program owns and which key chunks it reads.

Why a plan: the kernel's programs must touch only kept tile pairs, and partial edge tiles must not be padded to
full blocks (DESIGN.md asks for < 5% padding waste). So the plan works on token ranges, not tiles:

- **Query items**: a program owns `BLOCK_M` consecutive query rows of one *query group* (`item_group`, first row
  `item_row`, `item_rows` valid). Sparse masks: one group per query tile, items aligned to the tile (a tile of 288
  tokens is items of 128, 128, 32 rows). Dense: one group for the whole sequence, so items ignore tile edges.
- **Key chunks**: per (batch, head, group), the kept key tiles are merged into runs of consecutive tiles (contiguous
  tokens in tile-major order) and each run is cut into chunks of `BLOCK_N` keys. A chunk starts at `chunk_start`, a
  multiple of 16 tokens (TMA wants 16-byte aligned starts along V's contiguous token axis, 1 byte per FP8 value),
  and its valid keys are columns [`chunk_lo`, `chunk_hi`): a run starting mid-way through 16 tokens begins with up to
  15 masked columns, and only a run's first and last chunks are partial. So a window of three 192-token edge tiles
  costs 5 chunks (576 keys, exact), not 6 (768).

Masks broadcast over batch and heads (B or H = 1) keep that shape here; the kernel reads them with stride 0.
`waste` reports the fraction of computed score entries that are padding (rows or keys outside the kept pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Plan:
    block_m: int
    block_n: int
    item_group: Tensor
    """int32 (I,): the query group of each item, ordered by decreasing work (longest first)."""
    item_row: Tensor
    """int32 (I,): first query row (token) of each item."""
    item_rows: Tensor
    """int32 (I,): valid rows of each item (<= block_m)."""
    chunk_start: Tensor
    """int32 (B|1, H|1, G, C): first key token of each chunk (a multiple of 16)."""
    chunk_lo: Tensor
    """int32 (B|1, H|1, G, C): first valid column of each chunk."""
    chunk_hi: Tensor
    """int32 (B|1, H|1, G, C): end of the valid columns (0 past the group's count)."""
    chunk_count: Tensor
    """int32 (B|1, H|1, G): chunks per group."""
    chunks: Tensor = field(init=False, repr=False)
    """int32 (B|1, H|1, G, C): the three above packed for the kernel, (start / 16) << 16 | lo << 8 | hi."""
    useful: int
    """Score entries of the kept tile pairs, summed over the mask's batch and heads."""
    computed: int
    """Score entries the kernel computes (block_m × block_n per item and chunk), same sum."""

    def __post_init__(self) -> None:
        if self.block_n > 128 or self.block_m > 256:
            raise ValueError(f"blocks of at most 256 query rows and 128 keys (got {self.block_m}×{self.block_n})")
        self.chunks = (self.chunk_start // 16) << 16 | self.chunk_lo << 8 | self.chunk_hi

    @property
    def waste(self) -> float:
        return self.computed / max(self.useful, 1) - 1.0


def dense_plan(seq_len: int, block_m: int, block_n: int, device: torch.device | str = "cpu") -> Plan:
    """Every query row against every key: one group, items of block_m rows, chunks of block_n keys."""
    starts = torch.arange(0, seq_len, block_n, dtype=torch.int32, device=device)
    lens = (seq_len - starts).clamp(max=block_n)
    rows = torch.arange(0, seq_len, block_m, dtype=torch.int32, device=device)
    items = rows.numel()
    return Plan(block_m, block_n,
                item_group=torch.zeros(items, dtype=torch.int32, device=device), item_row=rows,
                item_rows=(seq_len - rows).clamp(max=block_m).to(torch.int32),
                chunk_start=starts.view(1, 1, 1, -1), chunk_lo=torch.zeros_like(starts).view(1, 1, 1, -1),
                chunk_hi=lens.view(1, 1, 1, -1).to(torch.int32),
                chunk_count=torch.full((1, 1, 1), starts.numel(), dtype=torch.int32, device=device),
                useful=seq_len * seq_len, computed=items * block_m * starts.numel() * block_n)


def sparse_plan(keep: Tensor, offsets: Tensor, block_m: int, block_n: int, allow_empty: bool = False) -> Plan:
    """Plan for a tile mask. keep: bool (B|1, H|1, N, N) kept (row tile, column tile) pairs; offsets: (N+1,) token
    offsets of the tiles in tile-major order. Every query tile must keep at least one key tile, unless
    `allow_empty` (the backward's transposed plan: a key tile no query attends gets zero gradient)."""
    if keep.dim() != 4 or keep.shape[-1] != keep.shape[-2] or offsets.numel() != keep.shape[-1] + 1:
        raise ValueError(f"keep must be (B, H, N, N) with offsets (N+1,); got {tuple(keep.shape)} and "
                         f"{tuple(offsets.shape)}")
    if not allow_empty and not keep.any(-1).all():
        raise ValueError("every query tile must keep at least one key tile (an empty row has no softmax)")
    dev = keep.device
    off = offsets.to(dev, torch.int64)
    n = keep.shape[-1]
    pad = torch.zeros_like(keep[..., :1])
    starts_run = keep & ~torch.cat([pad, keep[..., :-1]], -1)  # first tile of a run of consecutive key tiles
    ends_run = keep & ~torch.cat([keep[..., 1:], pad], -1)  # last tile of a run
    big = torch.iinfo(torch.int64).max
    # the k-th run start pairs with the k-th run end: both ascend along the key tiles
    run_start = torch.where(starts_run, off[:-1], big).sort(-1).values  # (B, H, N, N)
    run_end = torch.where(ends_run, off[1:], big).sort(-1).values
    runs = max(int(starts_run.sum(-1).max()), 1)
    run_start, run_end = run_start[..., :runs], run_end[..., :runs]  # (B, H, N, R)
    valid = run_start != big
    run_start = torch.where(valid, run_start, 0)
    aligned = run_start // 16 * 16  # where the run's first chunk starts
    run_chunks = torch.where(valid, (run_end - aligned + block_n - 1) // block_n, 0)  # (B, H, N, R)
    cum = run_chunks.cumsum(-1)
    count = cum[..., -1]  # (B, H, N)
    c = torch.arange(max(int(count.max()), 1), device=dev).expand(*count.shape, -1).contiguous()  # (B, H, N, C)
    r = torch.searchsorted(cum, c, right=True).clamp(max=runs - 1)  # the run each chunk slot falls in
    first = cum.gather(-1, r) - run_chunks.gather(-1, r)  # chunks before that run
    start = aligned.gather(-1, r) + (c - first) * block_n
    lo = (run_start.gather(-1, r) - start).clamp(min=0)
    hi = (run_end.gather(-1, r) - start).clamp(max=block_n)
    used = c < count.unsqueeze(-1)
    start, lo, hi = (torch.where(used, x, 0).to(torch.int32) for x in (start, lo, hi))

    sizes = off[1:] - off[:-1]  # (N,)
    item_counts = (sizes + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(n, device=dev), item_counts)  # (I,)
    first_item = torch.repeat_interleave(item_counts.cumsum(0) - item_counts, item_counts)
    row_in_tile = (torch.arange(group.numel(), device=dev) - first_item) * block_m
    rows = (sizes[group] - row_in_tile).clamp(max=block_m)
    order = torch.argsort(count.amax((0, 1))[group], descending=True, stable=True)  # longest first
    group, row = group[order], (off[:-1][group] + row_in_tile)[order]

    bh = count.shape[0] * count.shape[1]
    useful = int((keep * (sizes[:, None] * sizes[None, :])).sum())
    computed = int(count.sum(dim=(0, 1))[group].sum()) * block_m * block_n if bh else 0
    return Plan(block_m, block_n, item_group=group.to(torch.int32), item_row=row.to(torch.int32),
                item_rows=rows[order].to(torch.int32), chunk_start=start, chunk_lo=lo, chunk_hi=hi,
                chunk_count=count.to(torch.int32), useful=useful,
                computed=computed)
