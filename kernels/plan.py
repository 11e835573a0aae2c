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

Built on the GPU without waiting for it. A dynamic (top-k) mask is selected on the GPU once per call, and the plan
of it must not read it back: every host read (a count's maximum to size an array, a boolean index, `.item()`) stalls
the host until the GPU drains, leaving the GPU idle while the host catches up (issue 19: selection and planning with
such reads made the `late` regime's whole call at Wan 1.3B 480p take twice its kernel's time). So every shape here
comes from bounds known before the mask exists: `max_kept`, the most key tiles any row may keep (k, plus the window
for window ∪ top-k), bounds the runs per row and the chunks per row (`TileSpans`, where the bounds are derived).
Slots past a row's `chunk_count` are zero and the kernel never reads them: its loop stops at the count. Items stay
ordered longest first (so the longest programs start first and the tail of the launch is short ones), by an argsort
on the GPU: the number of items depends on the tile sizes only, so its shape is static too.

Masks broadcast over batch and heads (B or H = 1) keep that shape here; the kernel reads them with stride 0
(`mask_strides`). The kernels read the plan through `program_item` (a program's item) and `chunk_of` (a chunk's
packed start and valid columns), defined here beside the packing.
`waste` reports the fraction of computed score entries that are padding (rows or keys outside the kept pairs);
it and `useful`/`computed` are read on the host, so they are computed (and synchronise) only when asked for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
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
    """int32 (B|1, H|1, G): chunks per group (C is a static bound on it, not its maximum)."""
    chunks: Tensor = field(init=False, repr=False)
    """int32 (B|1, H|1, G, C): the three above packed for the kernel, (start / 16) << 16 | lo << 8 | hi."""

    def __post_init__(self) -> None:
        if self.block_n > 128 or self.block_m > 256:
            raise ValueError(f"blocks of at most 256 query rows and 128 keys (got {self.block_m}×{self.block_n})")
        self.chunks = (self.chunk_start // 16) << 16 | self.chunk_lo << 8 | self.chunk_hi

    @functools.cached_property
    def useful(self) -> int:
        """Score entries of the kept tile pairs, summed over the mask's batch and heads: per group, its valid keys
        (each kept key once: the chunks cover them exactly once) times its rows (host read: synchronises)."""
        keys = (self.chunk_hi - self.chunk_lo).sum(-1)  # (B|1, H|1, G); unused slots are 0 − 0
        return int((keys * self._group_rows()).sum())

    @functools.cached_property
    def computed(self) -> int:
        """Score entries the kernel computes (block_m × block_n per item and chunk), same sum (host read)."""
        items = torch.zeros_like(self._group_rows()).index_add_(0, self.item_group.long(),
                                                                torch.ones_like(self.item_group, dtype=torch.int64))
        return int((self.chunk_count.long() * items).sum()) * self.block_m * self.block_n

    @property
    def waste(self) -> float:
        return self.computed / max(self.useful, 1) - 1.0

    def _group_rows(self) -> Tensor:
        """int64 (G,): query rows per group."""
        rows = torch.zeros(self.chunk_count.shape[-1], dtype=torch.int64, device=self.item_group.device)
        return rows.index_add_(0, self.item_group.long(), self.item_rows.long())


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
                chunk_count=torch.full((1, 1, 1), starts.numel(), dtype=torch.int32, device=device))


@dataclass(frozen=True)
class TileSpans:
    """What a sparse plan needs of the tiles, built once per (tile offsets, blocks, device) by `tile_spans`: their
    token offsets and the query items on the device (items depend on tile sizes only), and on the host the numbers
    that bound a row's runs and chunks.

    The chunk bound. A run of kept tiles covering tokens [s, e) costs ceil((e − ⌊s⌋₁₆) / block_n) chunks (its first
    chunk starts at s rounded down to 16). Adding tile v (tokens [s_v, e_v)) to a row's kept set adds at most
    cost_v = ceil((e_v − ⌊s_v⌋₁₆) / block_n) chunks, whichever runs it touches, by ceil(x + y) <= ceil x + ceil y:
    alone it is a new run of exactly cost_v; appended after a run [s, s_v) the run becomes ceil((s_v − ⌊s⌋₁₆ +
    (e_v − s_v)) / block_n) <= its old chunks + cost_v; prepended before a run [e_v, e) it becomes
    ceil((e_v − ⌊s_v⌋₁₆ + e − e_v) / block_n) <= cost_v + its old chunks (e − e_v <= e − ⌊e_v⌋₁₆); joining two runs
    it splits the same way into the two old runs plus cost_v. So by induction over the kept tiles a row keeping at
    most K tiles has at most the sum of the K largest cost_v chunks (for full 384-token tiles and 128-key chunks,
    3 per tile when tile starts are 16-aligned, at most 4). Runs are separated by at least one dropped tile, so a row
    has at most min(K, ceil(N / 2)) of them.
    """

    block_m: int
    block_n: int
    offsets: Tensor
    """int64 (N+1,) on the device: tile v holds the key tokens [offsets[v], offsets[v+1])."""
    item_group: Tensor
    """int64 (I,) on the device: the query tile of each item, in tile order."""
    item_row: Tensor
    """int64 (I,) on the device: first query row of each item."""
    item_rows: Tensor
    """int64 (I,) on the device: valid rows of each item."""
    chunk_costs: tuple[int, ...]
    """Per tile, the most chunks it can add to a row (cost_v above), in descending order (host)."""

    @property
    def num_tiles(self) -> int:
        return len(self.chunk_costs)

    def max_runs(self, max_kept: int) -> int:
        return max(1, min(max_kept, (self.num_tiles + 1) // 2))

    def max_chunks(self, max_kept: int) -> int:
        return max(1, sum(self.chunk_costs[:max_kept]))


@functools.lru_cache(maxsize=64)
def tile_spans(offsets: tuple[int, ...], block_m: int, block_n: int, device: str) -> TileSpans:
    """The TileSpans of tiles at token `offsets` (N+1 ints), cached: built on the host and copied to the device once,
    since a host-to-device copy per call would synchronise too."""
    if block_n % 16:
        raise ValueError(f"block_n must be a multiple of 16 (chunk starts are 16-aligned), got {block_n}")
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode when first built inside it
        off = torch.tensor(offsets, dtype=torch.int64)  # (N+1,)
        sizes = off[1:] - off[:-1]  # (N,)
        costs = (off[1:] - off[:-1] // 16 * 16 + block_n - 1) // block_n  # (N,) cost_v
        item_counts = (sizes + block_m - 1) // block_m
        group = torch.repeat_interleave(torch.arange(sizes.numel()), item_counts)  # (I,)
        first_item = torch.repeat_interleave(item_counts.cumsum(0) - item_counts, item_counts)
        row_in_tile = (torch.arange(group.numel()) - first_item) * block_m
        rows = (sizes[group] - row_in_tile).clamp(max=block_m)
        return TileSpans(block_m, block_n, off.to(device), group.to(device), (off[:-1][group] + row_in_tile).to(device),
                         rows.to(device), tuple(sorted(costs.tolist(), reverse=True)))


def tile_plan(keep: Tensor, spans: TileSpans, max_kept: int, allow_empty: bool = False) -> Plan:
    """Plan for a tile mask, with no host read of it: keep bool (B|1, H|1, N, N) on spans' device, every row keeping
    at most `max_kept` key tiles (and at least one unless `allow_empty`): checked on the device, asynchronously
    (a failed check is a device-side assert, as an out-of-range index would be)."""
    n, dev = keep.shape[-1], keep.device
    runs, slots, bn = spans.max_runs(max_kept), spans.max_chunks(max_kept), spans.block_n
    kept = keep.sum(-1)  # (B, H, N)
    least = 0 if allow_empty else 1
    torch._assert_async(((kept >= least) & (kept <= max_kept)).all(),
                        f"the tile mask keeps fewer than {least} or more than max_kept={max_kept} tiles in a row")
    off = spans.offsets
    pad = torch.zeros_like(keep[..., :1])
    first_of_run = keep & ~torch.cat([pad, keep[..., :-1]], -1)  # (B, H, N, N): first tile of a run of kept tiles
    last_of_run = keep & ~torch.cat([keep[..., 1:], pad], -1)  # last tile of a run
    # the tile where the r-th run starts (ends): the first whose running count of starts (ends) reaches r + 1;
    # n where the row has fewer runs
    nth = torch.arange(1, runs + 1, device=dev).expand(*keep.shape[:-1], runs).contiguous()  # (B, H, N, R)
    first = torch.searchsorted(first_of_run.cumsum(-1), nth)  # (B, H, N, R)
    last = torch.searchsorted(last_of_run.cumsum(-1), nth)
    valid = first < n
    run_start = torch.where(valid, off[first], 0)  # off[n] exists: first <= n
    run_end = off[(last + 1).clamp(max=n)]
    aligned = run_start // 16 * 16  # where the run's first chunk starts
    run_chunks = torch.where(valid, (run_end - aligned + bn - 1) // bn, 0)  # (B, H, N, R)
    cum = run_chunks.cumsum(-1)
    count = cum[..., -1]  # (B, H, N)
    c = torch.arange(slots, device=dev).expand(*count.shape, slots).contiguous()  # (B, H, N, C)
    r = torch.searchsorted(cum, c, right=True).clamp(max=runs - 1)  # the run each chunk slot falls in
    before = cum.gather(-1, r) - run_chunks.gather(-1, r)  # chunks before that run
    start = aligned.gather(-1, r) + (c - before) * bn
    lo = (run_start.gather(-1, r) - start).clamp(min=0)
    hi = (run_end.gather(-1, r) - start).clamp(max=bn)
    used = c < count.unsqueeze(-1)
    start, lo, hi = (torch.where(used, x, 0).to(torch.int32) for x in (start, lo, hi))
    order = torch.argsort(count.amax((0, 1))[spans.item_group], descending=True, stable=True)  # longest first
    return Plan(spans.block_m, bn, item_group=spans.item_group[order].to(torch.int32),
                item_row=spans.item_row[order].to(torch.int32), item_rows=spans.item_rows[order].to(torch.int32),
                chunk_start=start, chunk_lo=lo, chunk_hi=hi, chunk_count=count.to(torch.int32))


def sparse_plan(keep: Tensor, offsets: Tensor, block_m: int, block_n: int, allow_empty: bool = False,
                max_kept: int | None = None) -> Plan:
    """Plan for a tile mask. keep: bool (B|1, H|1, N, N) kept (row tile, column tile) pairs; offsets: (N+1,) token
    offsets of the tiles in tile-major order. Every query tile must keep at least one key tile, unless
    `allow_empty` (the backward's transposed plan: a key tile no query attends gets zero gradient).

    The convenient form, which reads the mask on the host (to check it, and for `max_kept` when not given); the
    hot path calls `tile_plan` with the cached `tile_spans` and a bound it knows beforehand."""
    if keep.dim() != 4 or keep.shape[-1] != keep.shape[-2] or offsets.numel() != keep.shape[-1] + 1:
        raise ValueError(f"keep must be (B, H, N, N) with offsets (N+1,); got {tuple(keep.shape)} and "
                         f"{tuple(offsets.shape)}")
    kept = keep.sum(-1)
    if not allow_empty and not (kept > 0).all():
        raise ValueError("every query tile must keep at least one key tile (an empty row has no softmax)")
    spans = tile_spans(tuple(offsets.tolist()), block_m, block_n, str(keep.device))
    return tile_plan(keep, spans, int(kept.max()) if max_kept is None else max_kept, allow_empty)


def mask_strides(plan: Plan, b: int, h: int) -> tuple[int, int, int]:
    """Element strides of (batch, head, group) into the plan's (B|1, H|1, G, C) chunk arrays, and C (a broadcast
    mask has stride 0; the chunk count array (B|1, H|1, G) is indexed by that offset / C)."""
    mb, mh, ng, c = plan.chunks.shape
    if (mb not in (1, b)) or (mh not in (1, h)):
        raise ValueError(f"the plan's mask is for (B, H) = ({mb}, {mh}); the inputs have ({b}, {h})")
    return (0 if mb == 1 else mh * ng * c), (0 if mh == 1 else ng * c), c


@triton.jit
def program_item(item_group, item_row, item_rows, chunk_count, H, mask_sb, mask_sh, mask_sg, C):
    """This program's plan item: (bh, b, h, group, first row, valid rows, offset of its chunk list, chunk count)."""
    item = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = tl.load(item_group + item)
    mask_base = b * mask_sb + h * mask_sh + g * mask_sg  # chunk lists of this (b, h, group); stride 0 broadcasts
    return bh, b, h, g, tl.load(item_row + item), tl.load(item_rows + item), mask_base, tl.load(
        chunk_count + mask_base // C)


@triton.jit
def chunk_of(chunks, i):
    """(first key, first valid column, end of the valid columns) of chunk i of a chunk list (`Plan.chunks`)."""
    packed = tl.load(chunks + i)  # (start / 16) << 16 | lo << 8 | hi
    return (packed >> 16) * 16, (packed >> 8) & 0xFF, packed & 0xFF
