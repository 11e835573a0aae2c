"""3D-tile sparsity masks: which key tiles each query tile attends (DESIGN.md, numerics item 6).

Format. Tokens are in tile-major order (models/token_order.py), so a tile is one contiguous run of tokens and a
mask over tokens collapses to a mask over tile pairs. We store it the way block-sparse kernels read it
(flash-attention / Triton tutorial block-sparse layouts): per (batch, head, query tile) a `count` and a row of
ascending key-tile `indices`, padded with -1. A kernel program for query tile u loops over
`indices[b, h, u, :counts[b, h, u]]` and never touches a skipped pair, so work is proportional to the kept
pairs, not to N². `to_dense`/`from_dense` convert to a bool (B, H, Nq, Nk) matrix for tests and set algebra.
B and H may be 1 for a mask shared by the batch and heads (static masks); `expand` broadcasts it (as views).

Patterns.
- `window_mask`: a static 3D sliding window in tiles, as in STA and FPSAttention (the paper's best is (6,6,1)).
  It is clipped at the grid edges (edge tiles see fewer tiles; the window is not shifted inward).
- `topk_mask`: dynamic, content dependent: keep the k key tiles with the highest pooled scores
  (`pooled_tile_scores`: mean-pooled q·k per tile pair), the query's own tile always among them.
- `union_mask`: window ∪ top-k keeps the local neighbourhood plus a few far, content-relevant tiles.
- `select_keep`: the same top-k (∪ window) selection for a kernel, as a `KeepMask`: the dense bool matrix with a
  bound on any row's kept tiles that is known before selecting (k, plus the window's volume). It is built on the
  GPU without reading anything back to the host, which `TileMask.from_dense` must do to size its indices, and the
  kernel's planner (kernels/plan.py) sizes its arrays from that bound, so selection and planning never stall the
  host. `topk_mask`, `window_mask` and `select_tiles` go through the same functions, so the two forms agree. On a
  GPU the top-k and the union run as one Triton kernel (fpsa_kernels.select), equal to them bit for bit.
- `LearnedSelector`: a trainable threshold per head on standardised pooled scores. The selection is hard in the
  forward pass; a straight-through gate (value exactly 1, gradient of a sigmoid) lets the loss reach the scores
  and the threshold, and a regulariser holds the soft density near the target.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor, nn

from fpsa_train.models.token_order import TokenLayout


@dataclass
class TileMask:
    """Block-sparse layout over tile pairs, in the counts + indices form that kernels consume."""

    counts: Tensor
    """int32 (B, H, Nq): how many key tiles each query tile attends."""
    indices: Tensor
    """int32 (B, H, Nq, Kmax): key-tile indices, ascending; the first `counts` valid, the rest -1."""
    num_kv_tiles: int
    """Nk, the number of key tiles (the dense width)."""

    def __post_init__(self) -> None:
        if self.counts.dim() != 3 or self.indices.dim() != 4 or self.indices.shape[:3] != self.counts.shape:
            raise ValueError(f"TileMask: counts (B, H, Nq) and indices (B, H, Nq, Kmax) expected, got "
                             f"{tuple(self.counts.shape)} and {tuple(self.indices.shape)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Dense shape (B, H, Nq, Nk)."""
        return (*self.counts.shape, self.num_kv_tiles)

    def to_dense(self) -> Tensor:
        """bool (B, H, Nq, Nk)."""
        idx = self.indices.long()
        idx = torch.where(idx < 0, self.num_kv_tiles, idx)  # padding → a spare column that is dropped
        dense = torch.zeros(*self.counts.shape, self.num_kv_tiles + 1, dtype=torch.bool, device=idx.device)
        dense.scatter_(-1, idx, True)
        return dense[..., : self.num_kv_tiles]

    @staticmethod
    def from_dense(dense: Tensor) -> TileMask:
        """bool (B, H, Nq, Nk) → TileMask with ascending indices and Kmax = max count (at least 1)."""
        if dense.dim() != 4:
            raise ValueError(f"TileMask.from_dense: bool (B, H, Nq, Nk) expected, got shape {tuple(dense.shape)}")
        dense = dense.bool()
        counts = dense.sum(-1, dtype=torch.int32)  # (B, H, Nq)
        kmax = max(int(counts.max()) if counts.numel() else 0, 1)
        # A stable sort of "not kept" puts the kept columns first, in ascending column order.
        order = torch.sort((~dense).to(torch.uint8), dim=-1, stable=True).indices[..., :kmax]  # (B, H, Nq, Kmax)
        valid = torch.arange(kmax, device=dense.device) < counts[..., None]
        indices = torch.where(valid, order, -1).to(torch.int32)
        return TileMask(counts, indices, dense.shape[-1])

    def density(self) -> Tensor:
        """fp32 (B, H): mean over query tiles of counts / Nk."""
        return (self.counts.float() / self.num_kv_tiles).mean(-1)

    @property
    def max_kept(self) -> int:
        """A bound on any row's count, from the shape alone (Kmax): what a planner sizes its arrays by."""
        return self.indices.shape[-1]

    def expand(self, batch: int, heads: int) -> TileMask:
        """Broadcast B and H dims of 1 to (batch, heads) (views: call .contiguous() before a kernel needs it)."""
        b, h, nq = self.counts.shape
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"TileMask.expand: cannot broadcast (B, H) = ({b}, {h}) to ({batch}, {heads})")
        return TileMask(self.counts.expand(batch, heads, nq),
                        self.indices.expand(batch, heads, nq, self.indices.shape[-1]), self.num_kv_tiles)

    def to(self, device: torch.device | str) -> TileMask:
        return TileMask(self.counts.to(device), self.indices.to(device), self.num_kv_tiles)


@dataclass(frozen=True, eq=False)
class KeepMask:
    """A tile mask as its dense bool matrix plus a bound on any row's kept tiles that holds by construction: the
    form a selection on the GPU can produce without reading the mask back (see the module docstring)."""

    keep: Tensor
    """bool (B|1, H|1, Nq, Nk): kept (query tile, key tile) pairs."""
    max_kept: int
    """No row keeps more key tiles than this (not necessarily the largest count)."""

    @property
    def num_kv_tiles(self) -> int:
        return self.keep.shape[-1]

    def to_dense(self) -> Tensor:
        return self.keep

    def density(self) -> Tensor:
        """fp32 (B|1, H|1): mean over query tiles of the kept fraction, as TileMask.density."""
        return self.keep.float().mean((-1, -2))

    def union(self, other: KeepMask) -> KeepMask:
        """Per (batch, head, query tile) union of the key sets; B and H dims of 1 broadcast."""
        return KeepMask(self.keep | other.keep, union_bound(self.num_kv_tiles, self.max_kept, other.max_kept))


def union_bound(num_tiles: int, a: int, b: int) -> int:
    """The most key tiles a row of the union of two masks keeps, given theirs."""
    return min(num_tiles, a + b)


def dense_mask(num_tiles: int, *, device: torch.device | str = "cpu") -> TileMask:
    """Every query tile attends every key tile: (1, 1, N, N)."""
    if num_tiles < 1:
        raise ValueError(f"dense_mask: num_tiles must be >= 1, got {num_tiles}")
    counts = torch.full((1, 1, num_tiles), num_tiles, dtype=torch.int32, device=device)
    indices = torch.arange(num_tiles, dtype=torch.int32, device=device).expand(1, 1, num_tiles, num_tiles)
    return TileMask(counts, indices.contiguous(), num_tiles)


def tile_coords(tile_grid: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """int64 (N, 3): (t, h, w) tile coordinates of tile v, tiles numbered in raster order over the tile grid."""
    axes = [torch.arange(n, device=device) for n in tile_grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)


def window_mask(tile_grid: tuple[int, int, int], window: tuple[int, int, int], *,
                device: torch.device | str = "cpu") -> TileMask:
    """Static 3D sliding window, in tiles: (1, 1, N, N).

    Query tile u keeps key tile v when on every axis the offset d = v - u satisfies -((w-1)//2) <= d <= w//2
    (centred; an even extent puts its extra tile on the later side), clipped at the grid edges (edge tiles keep
    fewer tiles). An extent larger than the grid on an axis (w > grid) keeps that whole axis.
    """
    return TileMask.from_dense(window_keep(tile_grid, window, device).keep)


def window_keep(tile_grid: tuple[int, int, int], window: tuple[int, int, int],
                device: torch.device | str = "cpu") -> KeepMask:
    """`window_mask` as a KeepMask (1, 1, N, N), cached per (grid, window, device): it is static, and building it
    on a GPU per call would copy from the host (a synchronisation). An interior tile keeps the most tiles, the
    window's volume clipped to the grid: the product over axes of min(w, grid)."""
    if len(window) != 3 or any(int(w) < 1 for w in window):
        raise ValueError(f"window_mask: window must be three tile extents >= 1, got window={tuple(window)}")
    return _window_keep(tuple(int(g) for g in tile_grid), tuple(int(w) for w in window), torch.device(device))


@functools.lru_cache(maxsize=64)
def _window_keep(tile_grid: tuple[int, int, int], window: tuple[int, int, int], device: torch.device) -> KeepMask:
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode when first built inside it
        coords = tile_coords(tile_grid, device)  # (N, 3)
        offsets = coords[None, :, :] - coords[:, None, :]  # (Nq, Nk, 3): key minus query
        lo = torch.tensor([-((w - 1) // 2) for w in window], device=device)
        hi = torch.tensor([w // 2 for w in window], device=device)
        whole = torch.tensor([w > g for w, g in zip(window, tile_grid)], device=device)
        keep = (((offsets >= lo) & (offsets <= hi)) | whole).all(-1)  # (Nq, Nk)
    return KeepMask(keep[None, None], math.prod(min(w, g) for w, g in zip(window, tile_grid)))


def token_ranges(layout: TokenLayout) -> Tensor:
    """int64 (N+1,): tile v holds the tokens [off[v], off[v+1]) in tile-major order."""
    sizes = layout.tile_sizes()
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def token_tiles(layout: TokenLayout, device: torch.device | str = "cpu") -> Tensor:
    """int64 (L,): the tile of every token, in tile-major order. Cached per (layout, device), like every static
    index here: a host-to-device copy per call would synchronise with the GPU."""
    return _token_tiles(layout, torch.device(device))


@functools.lru_cache(maxsize=64)
def _token_tiles(layout: TokenLayout, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        sizes = layout.tile_sizes()
        return torch.repeat_interleave(torch.arange(sizes.numel()), sizes).to(device)


@functools.lru_cache(maxsize=64)
def _pooling_index(layout: TokenLayout, device: torch.device) -> tuple[int, Tensor, Tensor]:
    """(g, the tile of each run of g tokens int64 (L/g,), tokens per tile fp32 (N,)) on `device`, cached: g is the
    largest count of tokens that divides every tile's size, so runs of g consecutive tokens never straddle tiles."""
    with torch.inference_mode(False):
        sizes = layout.tile_sizes()
        g = math.gcd(*sizes.tolist())
        return g, token_tiles(layout, device)[::g].contiguous(), sizes.to(device, torch.float32)


def pooled_tile_scores(q: Tensor, k: Tensor, layout: TokenLayout) -> Tensor:
    """Mean-pool q and k per tile, then scores = pooled_q @ pooled_kᵀ / sqrt(D): fp32 (B, H, N, N).

    q, k: (B, H, L, D) in tile-major order. Partial edge tiles are averaged over their actual tokens.
    Differentiable in q and k. Sums are in fp32, first over runs of g tokens that divide every tile (g = 24 at
    Wan's 480p and 720p grids with 6×8×8 tiles), then per tile: on a GPU the first reads q and k once in their own
    dtype (no fp32 copy of them is written), and the per-tile scatter has g times fewer rows to add.
    """
    if layout.order != "tile":
        raise ValueError(f"pooled_tile_scores: needs tokens in tile-major order, got layout.order={layout.order!r}")
    if q.dim() != 4 or k.shape != q.shape or q.shape[2] != layout.seq_len:
        raise ValueError(f"pooled_tile_scores: q, k must both be (B, H, L={layout.seq_len}, D), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    g, tile_of_run, sizes = _pooling_index(layout, q.device)  # (L/g,), (N,)
    n, d = sizes.numel(), q.shape[-1]

    def pool(x: Tensor) -> Tensor:
        runs = x.unflatten(2, (-1, g)).sum(3, dtype=torch.float32)  # (B, H, L/g, D)
        summed = runs.new_zeros(x.shape[0], x.shape[1], n, d).index_add_(2, tile_of_run, runs)  # (B, H, N, D)
        return summed / sizes[:, None]

    return pool(q) @ pool(k).transpose(-1, -2) / math.sqrt(d)  # (B, H, N, N)


def topk_mask(scores: Tensor, k: int) -> TileMask:
    """Keep min(k, N) key tiles per query tile: its own tile (forced in) plus the k-1 best-scoring others.

    scores: (B, H, N, N). Ties go to the lower key index; NaN scores rank last.
    """
    return TileMask.from_dense(topk_keep(scores, k).keep)


def topk_keep(scores: Tensor, k: int) -> KeepMask:
    """`topk_mask` as a KeepMask (B, H, N, N) with max_kept = min(k, N), built with no host read."""
    if k < 1:
        raise ValueError(f"top-k selection: k must be >= 1, got k={k}")
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"top-k selection: scores must be (B, H, N, N), got {tuple(scores.shape)}")
    n = scores.shape[-1]
    with torch.no_grad():
        s = scores.float().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        s = torch.where(s == 0, 0.0, s)  # -0.0 ties with +0.0 (a GPU sort may order keys by their bits)
        own = torch.eye(n, dtype=torch.bool, device=s.device)
        # Rank by (own first, then score descending); the stable sort breaks ties by lower index.
        key = torch.where(own, math.inf, torch.where(s == math.inf, torch.finfo(s.dtype).max, s))
        top = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : min(k, n)]  # (B, H, N, k)
        dense = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, top, True)
    return KeepMask(dense, min(k, n))


def select_keep(q: Tensor, k: Tensor, layout: TokenLayout, topk: int,
                window: tuple[int, int, int] | None = None, fused: bool | None = None) -> KeepMask:
    """The top-k patterns' selection as a KeepMask (B, H, N, N): the `topk` key tiles with the best pooled scores
    (own tile forced in), united with the static `window` for window ∪ top-k. A hard selection (no gradient); no
    host read anywhere, so on a GPU it only queues work. `select_tiles` makes its TileMask from this, so the
    kernel and the reference select the same tiles.

    `fused`: the top-k and the union as one Triton kernel (fpsa_kernels.select `topk_keep_triton`, imported here:
    this module must import without triton), equal bit for bit to `topk_keep` ∪ the window in torch operations;
    None (the default) takes the kernel on a GPU and torch elsewhere; True on CPU tensors runs it in Triton's
    interpreter (TRITON_INTERPRET=1, the tests)."""
    static = None if window is None else window_keep(layout.tile_grid, window, q.device)
    with torch.no_grad():
        scores = pooled_tile_scores(q, k, layout)
        if scores.is_cuda if fused is None else fused:
            from fpsa_kernels.select import topk_keep_triton

            n = scores.shape[-1]
            bound = min(topk, n) if static is None else union_bound(n, min(topk, n), static.max_kept)
            return KeepMask(topk_keep_triton(scores, topk, None if static is None else static.keep), bound)
        chosen = topk_keep(scores, topk)
    return chosen if static is None else chosen.union(static)


def union_mask(a: TileMask, b: TileMask) -> TileMask:
    """Per (batch, head, query tile) union of the key sets; B and H dims of 1 broadcast."""
    if a.num_kv_tiles != b.num_kv_tiles or a.counts.shape[-1] != b.counts.shape[-1]:
        raise ValueError(f"union_mask: shapes (B, H, Nq, Nk) {a.shape} and {b.shape} differ in Nq or Nk")
    return TileMask.from_dense(a.to_dense() | b.to_dense().to(a.counts.device))


class LearnedSelector(nn.Module):
    """Trainable tile selection for one attention layer: a per-head threshold on standardised pooled scores.

    z[b,h,u,v] = (scores[b,h,u,v] - mean_v) / std_v + bias[h]; kept = z > 0, or v == u, or v in `static`.
    Standardising per query row makes the bias a density knob: for standard-normal scores a bias of
    Φ⁻¹(ρ) keeps a fraction ρ of the tiles, which is the initialisation.

    Gradient (straight-through surrogate): `gate` = 1 + (soft - soft.detach()) with soft = sigmoid(z / T). Its
    forward value is exactly 1.0, so multiplying the kept tile pairs' unnormalised probabilities by
    gate[b,h,u,v] changes nothing in the forward pass, while the backward passes d(loss)/d(gate) through the
    sigmoid to the scores (hence q, k) and to the bias. Limitation: dropped pairs are never computed, so they
    get no gradient: the task loss can only learn to drop tiles, never to add one. `reg_loss` =
    (mean soft - ρ)² is what pushes the density back up (or down) towards the target.

    `heads` selects the bias entries of a head range when the scores hold only those heads (Ulysses sequence
    parallelism gives each rank H/sp heads). `reg_loss` is then weighted by the range's share of the heads,
    (H_range/H)·(mean soft over the range - ρ)²: summed over the ranks of a group it is the mean over head groups
    of their squared deviation, equal to the all-heads value when the groups' densities agree and never below it
    (Jensen). Making it exact would need an all-reduce per layer; holding every head group near the target is
    what the regulariser is for.
    """

    def __init__(self, num_heads: int, target_density: float, temperature: float = 1.0, eps: float = 1e-6):
        super().__init__()
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"LearnedSelector: target_density must be in (0, 1], got {target_density}")
        if not temperature > 0.0:
            raise ValueError(f"LearnedSelector: temperature must be > 0, got {temperature}")
        if num_heads < 1:
            raise ValueError(f"LearnedSelector: num_heads must be >= 1, got {num_heads}")
        self.num_heads, self.target_density, self.temperature, self.eps = num_heads, target_density, temperature, eps
        # Φ⁻¹(1) is infinite: clamp to a finite bias (about 4.75 standard deviations) that still keeps ~all.
        init = NormalDist().inv_cdf(min(max(target_density, 1e-6), 1.0 - 1e-6))
        self.bias = nn.Parameter(torch.full((num_heads,), init))

    def forward(self, scores: Tensor, static: TileMask | None = None,
                heads: slice | None = None) -> tuple[TileMask, Tensor, Tensor]:
        """scores (B, H, N, N) → (mask, gate fp32 (B, H, N, N) of value 1.0, reg_loss scalar).

        H is all `num_heads`, or the heads of the range `heads` (a slice of the head index)."""
        bias = self.bias if heads is None else self.bias[heads]  # (H,)
        if scores.dim() != 4 or scores.shape[1] != bias.numel() or scores.shape[-1] != scores.shape[-2]:
            raise ValueError(f"LearnedSelector: scores must be (B, H={bias.numel()}, N, N) for heads "
                             f"{heads or 'all'} of {self.num_heads}, got {tuple(scores.shape)}")
        s = scores.float()
        mean = s.mean(-1, keepdim=True)  # (B, H, N, 1)
        var = s.var(-1, unbiased=False, keepdim=True)  # (B, H, N, 1)
        z = (s - mean) * torch.rsqrt(var + self.eps) + bias.float()[None, :, None, None]  # (B, H, N, N)
        n = s.shape[-1]
        with torch.no_grad():
            keep = (z > 0) | torch.eye(n, dtype=torch.bool, device=s.device)
            if static is not None:
                if static.num_kv_tiles != n or static.counts.shape[-1] != n:
                    raise ValueError(f"LearnedSelector: static mask {static.shape} does not match scores "
                                     f"{tuple(s.shape)}")
                keep = keep | static.to_dense().to(s.device)
        soft = torch.sigmoid(z / self.temperature)
        gate = 1.0 + (soft - soft.detach())  # exactly 1.0 forward: x - x == 0 for every finite x
        reg_loss = (soft.mean() - self.target_density) ** 2 * (bias.numel() / self.num_heads)
        return TileMask.from_dense(keep), gate, reg_loss

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, target_density={self.target_density}, temperature={self.temperature}"
