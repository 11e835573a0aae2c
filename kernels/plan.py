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
ordered longest first (so the longest programs start first and the tail of the launch is short ones), by a sort
on the GPU: the number of items depends on the tile sizes only, so its shape is static too.

Two implementations of `tile_plan`, equal tensor for tensor: `tile_plan_torch`, about 35 small torch operations (the
reference, and the CPU path), and on a GPU `tile_plan_triton`, two Triton kernels (one program per (batch, head,
query tile) row writes the row's chunk lists, then one program orders the items and reduces the rows' bound checks):
the torch one's launches cost more host time than the GPU spends on them (docs/bench_select_h200.md).

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
    chunks: Tensor | None = field(default=None, repr=False)
    """int32 (B|1, H|1, G, C): the three above packed for the kernel, (start / 16) << 16 | lo << 8 | hi; packed here
    when not given (the GPU planner writes it beside them)."""

    def __post_init__(self) -> None:
        if self.block_n > 128 or self.block_m > 256:
            raise ValueError(f"blocks of at most 256 query rows and 128 keys (got {self.block_m}×{self.block_n})")
        if self.chunks is None:
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
    max_items: int
    """The most items of one query tile (host)."""

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
                         rows.to(device), tuple(sorted(costs.tolist(), reverse=True)), int(item_counts.max()))


def tile_plan(keep: Tensor, spans: TileSpans, max_kept: int, allow_empty: bool = False) -> Plan:
    """Plan for a tile mask, with no host read of it: keep bool (B|1, H|1, N, N) on spans' device, every row keeping
    at most `max_kept` key tiles (and at least one unless `allow_empty`): checked on the device, asynchronously
    (a failed check is a device-side assert, as an out-of-range index would be).

    On a GPU two Triton kernels build it (`tile_plan_triton`); elsewhere (CPU, the meta device) the torch statement
    `tile_plan_torch` does, the reference they equal tensor for tensor."""
    if keep.is_cuda:
        return tile_plan_triton(keep, spans, max_kept, allow_empty)
    return tile_plan_torch(keep, spans, max_kept, allow_empty)


def _bound_message(least: int, max_kept: int) -> str:
    return f"the tile mask keeps fewer than {least} or more than max_kept={max_kept} tiles in a row"


def tile_plan_torch(keep: Tensor, spans: TileSpans, max_kept: int, allow_empty: bool = False) -> Plan:
    """`tile_plan` in torch operations (about 35 small ones): the reference of the Triton planner, and the CPU path.
    Per row, the r-th run of kept tiles is found by a search over running counts of run starts and ends."""
    n, dev = keep.shape[-1], keep.device
    runs, slots, bn = spans.max_runs(max_kept), spans.max_chunks(max_kept), spans.block_n
    kept = keep.sum(-1)  # (B, H, N)
    least = 0 if allow_empty else 1
    torch._assert_async(((kept >= least) & (kept <= max_kept)).all(), _bound_message(least, max_kept))
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


@triton.jit
def _min_i32(a, b):
    return tl.minimum(a, b)


@triton.jit
def _plan_rows_kernel(keep, off, chunk_arrays, chunk_count, row_ok, N, C, max_kept, least, H,
                      keep_sb, keep_sh, keep_su, keep_sv,
                      BLOCK_N: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The chunk lists of one (batch, head, query group) row, program (group u, b·H + h): `tile_plan_torch`'s
    runs, found per slot instead of per run. Per key tile (NP lanes, a power of two >= N): whether it starts or ends
    a run of kept tiles, the end token of its run (a reverse min-scan over the run ends), and for a run's first tile
    the run's chunks. Their running sum `through` is non-decreasing, so the run holding chunk slot c is the first
    tile whose `through` exceeds c: a binary search, log2(NP) gathers per slot. Writes all C slots (zeros past the
    count) of the four (B|1, H|1, N, C) planes of `chunk_arrays` (start, lo, hi, packed), the count, and whether
    the row keeps between `least` and `max_kept` tiles."""
    u = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh * N + u  # the row of the (B|1, H|1, N) outputs
    tiles = tl.arange(0, NP)
    inside = tiles < N
    keep_row = keep + (bh // H) * keep_sb + (bh % H) * keep_sh + u * keep_su
    kept = tl.load(keep_row + tiles * keep_sv, mask=inside, other=0) != 0
    kept_before = tl.load(keep_row + (tiles - 1) * keep_sv, mask=inside & (tiles > 0), other=0) != 0
    kept_after = tl.load(keep_row + (tiles + 1) * keep_sv, mask=tiles + 1 < N, other=0) != 0
    first = kept & ~kept_before  # the tile starts a run of kept tiles
    last = kept & ~kept_after  # the tile ends one
    tile_start = tl.load(off + tiles, mask=inside, other=0).to(tl.int32)
    tile_end = tl.load(off + tiles + 1, mask=inside, other=0).to(tl.int32)
    # the end token of the run through each kept tile: that of the nearest tile at or after it that ends a run
    run_end = tl.associative_scan(tl.where(last, tile_end, 2147483647), 0, _min_i32, reverse=True)
    aligned = tile_start // 16 * 16  # where a run starting at the tile has its first chunk
    run_chunks = (tl.where(first, run_end - aligned, 0) + BLOCK_N - 1) // BLOCK_N  # 0 but at a run's first tile
    through = tl.cumsum(run_chunks, 0)  # chunks of the runs starting at or before the tile
    before = through - run_chunks
    count = tl.sum(run_chunks, 0)
    n_kept = tl.sum(kept.to(tl.int32), 0)
    tl.store(chunk_count + row, count)
    tl.store(row_ok + row, ((n_kept >= least) & (n_kept <= max_kept)).to(tl.int8))
    plane = tl.num_programs(1) * N * C
    for c0 in range(0, C, BLOCK_C):
        slot = c0 + tl.arange(0, BLOCK_C)
        # binary lifting: t = the number of tiles whose `through` is <= slot (capped at NP - 1, past the count)
        t = tl.zeros([BLOCK_C], dtype=tl.int32)
        for level in tl.static_range(1, LOG_NP + 1):  # steps of NP / 2, NP / 4, ..., 1 tiles
            t = tl.where(tl.gather(through, t + ((NP >> level) - 1), 0) <= slot, t + (NP >> level), t)
        run_start = tl.gather(tile_start, t, 0)
        start = tl.gather(aligned, t, 0) + (slot - tl.gather(before, t, 0)) * BLOCK_N
        lo = tl.maximum(run_start - start, 0)
        hi = tl.minimum(tl.gather(run_end, t, 0) - start, BLOCK_N)
        used = slot < count
        start = tl.where(used, start, 0)
        lo = tl.where(used, lo, 0)
        hi = tl.where(used, hi, 0)
        out = chunk_arrays + row * C + slot
        mine = slot < C
        tl.store(out, start, mask=mine)
        tl.store(out + plane, lo, mask=mine)
        tl.store(out + 2 * plane, hi, mask=mine)
        tl.store(out + 3 * plane, (start >> 4) << 16 | lo << 8 | hi, mask=mine)


@triton.jit
def _plan_items_kernel(chunk_count, row_ok, off, items, ok, N, BH, num_items, max_items,
                       BLOCK_M: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr, ITEM_BITS: tl.constexpr,
                       BLOCK_BH: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program, after `_plan_rows_kernel`: the items of every query group, longest first, into the three (I,)
    planes of `items` (group, first row, rows), and into `ok` whether every row's kept tiles were in bounds.

    A group's work is its largest chunk count over the mask's batch and heads. Groups are sorted by one int64 key,
    (work, NP − 1 − group, items of the group) in bit fields, descending: the most work first, ties to the lower
    group (`tile_plan_torch`'s stable argsort, whose items are in group order); the running sum of the items in that
    order is where each group's items go."""
    g = tl.arange(0, NP)
    inside = g < N
    work = tl.zeros([NP], dtype=tl.int32)
    for bh0 in range(0, BH, BLOCK_BH):
        bh = bh0 + tl.arange(0, BLOCK_BH)
        counts = tl.load(chunk_count + bh[:, None] * N + g[None, :], mask=(bh[:, None] < BH) & inside[None, :],
                         other=0)  # (BLOCK_BH, NP)
        work = tl.maximum(work, tl.max(counts, 0))
    size = tl.load(off + g + 1, mask=inside, other=0) - tl.load(off + g, mask=inside, other=0)
    n_items = (size + BLOCK_M - 1) // BLOCK_M  # int64, 0 on the padding lanes
    key = work.to(tl.int64) << (LOG_NP + ITEM_BITS) | (NP - 1 - g).to(tl.int64) << ITEM_BITS | n_items
    key = tl.sort(key, descending=True)
    group = NP - 1 - ((key >> ITEM_BITS) & (NP - 1)).to(tl.int32)
    n_items = (key & ((1 << ITEM_BITS) - 1)).to(tl.int32)
    first_item = tl.cumsum(n_items, 0) - n_items
    real = group < N
    first_row = tl.load(off + group, mask=real, other=0).to(tl.int32)
    size = tl.load(off + group + 1, mask=real, other=0).to(tl.int32) - first_row
    for j in range(0, max_items):
        mine = j < n_items
        at = items + first_item + j
        tl.store(at, group, mask=mine)
        tl.store(at + num_items, first_row + j * BLOCK_M, mask=mine)
        tl.store(at + 2 * num_items, tl.minimum(size - j * BLOCK_M, BLOCK_M), mask=mine)
    rows = BH * N
    all_ok = tl.full([BLOCK_R], 1, dtype=tl.int8)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        all_ok = tl.minimum(all_ok, tl.load(row_ok + r, mask=r < rows, other=1))
    tl.store(ok, tl.min(all_ok, 0))


def tile_plan_triton(keep: Tensor, spans: TileSpans, max_kept: int, allow_empty: bool = False) -> Plan:
    """`tile_plan` in two Triton kernels, equal to `tile_plan_torch` tensor for tensor: one program per (batch,
    head, query group) row writes the row's chunk lists (`_plan_rows_kernel`), then one program orders the items
    and reduces the rows' bound checks (`_plan_items_kernel`) to one flag that `torch._assert_async` checks on the
    device. Runs on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if keep.dtype != torch.bool or keep.dim() != 4 or not keep.shape[-1] == keep.shape[-2] == spans.num_tiles:
        raise ValueError(f"keep must be bool (B|1, H|1, N, N) with N = {spans.num_tiles} tiles; got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    mb, mh, n, _ = keep.shape
    slots, least, dev = spans.max_chunks(max_kept), 0 if allow_empty else 1, keep.device
    num_items = spans.item_group.numel()
    chunk_arrays = torch.empty((4, mb, mh, n, slots), dtype=torch.int32, device=dev)  # start, lo, hi, packed
    count = torch.empty((mb, mh, n), dtype=torch.int32, device=dev)
    row_ok = torch.empty((mb, mh, n), dtype=torch.int8, device=dev)
    items = torch.empty((3, num_items), dtype=torch.int32, device=dev)  # group, first row, rows
    ok = torch.empty(1, dtype=torch.int8, device=dev)
    lanes = triton.next_power_of_2(n)
    log_lanes = lanes.bit_length() - 1
    _plan_rows_kernel[(n, mb * mh)](keep.view(torch.uint8), spans.offsets, chunk_arrays, count, row_ok, n, slots,
                                    max_kept, least, mh, *keep.stride(), BLOCK_N=spans.block_n, NP=lanes,
                                    LOG_NP=log_lanes, BLOCK_C=min(64, triton.next_power_of_2(slots)), num_warps=4)
    _plan_items_kernel[(1,)](count, row_ok, spans.offsets, items, ok, n, mb * mh, num_items, spans.max_items,
                             BLOCK_M=spans.block_m, NP=lanes, LOG_NP=log_lanes,
                             ITEM_BITS=spans.max_items.bit_length(), BLOCK_BH=max(1, 2048 // lanes),
                             BLOCK_R=1024, num_warps=4)
    torch._assert_async(ok.view(torch.bool), _bound_message(least, max_kept))
    start, lo, hi, chunks = chunk_arrays.unbind(0)
    group, row, rows = items.unbind(0)
    return Plan(spans.block_m, spans.block_n, item_group=group, item_row=row, item_rows=rows, chunk_start=start,
                chunk_lo=lo, chunk_hi=hi, chunk_count=count, chunks=chunks)


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
