"""Ulysses sequence parallelism: the ranks of a group split one sample's tokens, and inside self-attention its heads.

Why: Wan2.1 14B at 720p has 75,600 tokens per sample; activations of one sample do not fit one GPU for training.
DeepSpeed-Ulysses (Jacobs et al., 2023) shards the sequence: every token-local op (norms, modulation, q/k/v/o
projections, RoPE, cross-attention to the full text, FFN, head) runs on this rank's L/sp tokens, and only
self-attention, which mixes tokens, needs them all. There an all-to-all turns (B, H, L/sp, D) — local tokens, all
heads — into (B, H/sp, L, D) — all tokens, this rank's heads; the attention core (SDPA or FPSAttention) runs on
the full sequence for H/sp heads with the full-grid `layout`, and the inverse all-to-all brings the output back to
local tokens. Per layer that is two all-to-alls in the forward (q, k, v together, then the output) and two in the
backward (plus the forward's again when activation checkpointing recomputes the block), each rank sending
(sp−1)/sp of its local activations.

Groups. `dp_coordinates` fixes the convention the data loader relies on: consecutive ranks form one group,
group k = ranks [k·sp, (k+1)·sp); dp_rank = rank // sp (which data shard), sp_rank = rank % sp (which token slice
and head group). All ranks of a group must see the same batch (same latents, text, σ and noise).

Where tokens are split (the seam in models/wan.py: `WanModel.sequence_parallel` and
`SelfAttention.sequence_parallel`, plain attributes, so the state dict keys do not change):
after patch embedding and the tile-major permutation each rank keeps its contiguous slice of the tokens and of the
RoPE (cos, sin) rows; after the head the outputs are all-gathered along tokens before the inverse permutation and
unpatchify, so every rank of a group returns the full prediction.

Gradient convention. Every rank of a group computes the same loss on the gathered output. So the backward of the
gather keeps this rank's slice of the output gradient (no communication), the backward of the shard is zero
padding (plain slicing), and the all-to-alls' backwards are each other. Each rank's parameter gradients are then
partial sums over its own tokens: summed over the ranks of a group they are the exact gradient of the sample's
loss. The training loop multiplies the loss by sp_size, so that the usual data-parallel averaging over all
world ranks (Σ over world / world_size) yields the exact average over the dp_size distinct batches.

FPS attention under SP: the core sees H/sp heads, and `attend` passes `heads=slice(...)` (this rank's head
range) so learned selectors use their bias entries of those heads. FP8 scales and top-k selection are per head
and need nothing. Per-rank statistics cover the rank's heads: `last_density` and `last_fp8_stats` of a core are
over its local heads (the mean of `last_density` over a group's ranks is the single-rank value: every rank holds
the same number of heads); the selectors' density regulariser is each rank's head share of it (see
`LearnedSelector`), so summed over a group it is the mean over head groups of (density − target)², which equals
the single-rank value when the groups' densities agree and is never below it.

Collectives: `dist.all_to_all_single` on NCCL; gloo (CPU, the tests) supports it too (checked on torch 2.13),
so there is no fallback path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


def dp_coordinates(global_rank: int, world_size: int, sp_size: int) -> tuple[int, int, int]:
    """(dp_rank, dp_size, sp_rank) of a rank: consecutive ranks form one sequence-parallel group."""
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"trainer.sp_size={sp_size} must be a positive divisor of the world size {world_size} "
                         "(number of nodes × devices per node)")
    if not 0 <= global_rank < world_size:
        raise ValueError(f"rank {global_rank} is outside the world of {world_size} ranks")
    return global_rank // sp_size, world_size // sp_size, global_rank % sp_size


@dataclass
class SPGroups:
    """This rank's place in the sequence- and data-parallel grid."""

    group: dist.ProcessGroup | None
    """The process group of this rank's sequence-parallel group (None only in single-process tests of errors)."""
    size: int
    """sp_size: ranks per group."""
    rank: int
    """sp_rank: this rank's position in its group (its token slice and head group)."""
    dp_size: int
    """Number of groups (distinct batches per step)."""
    dp_rank: int
    """This rank's group (which data shard it reads)."""

    def __deepcopy__(self, memo) -> SPGroups:
        return self  # process groups cannot be copied; a copied model shares its groups


def init_sp_groups(sp_size: int) -> SPGroups:
    """Create the sequence-parallel groups (torch.distributed must be initialised) and return this rank's.

    Every rank calls `new_group` for every group, in the same order (torch.distributed requires it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"trainer.sp_size={sp_size}: sequence parallelism needs torch.distributed to be "
                           "initialised first (init_process_group)")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size, sp_rank = dp_coordinates(rank, world, sp_size)
    mine = None
    for k in range(dp_size):
        group = dist.new_group(list(range(k * sp_size, (k + 1) * sp_size)))
        if k == dp_rank:
            mine = group
    return SPGroups(mine, sp_size, sp_rank, dp_size, dp_rank)


# ---------------------------------------------------------------- autograd-aware collectives


def _all_to_all(x: Tensor, group) -> Tensor:
    """Exchange equal chunks of dim 0: chunk j goes to rank j, and chunk j of the result came from rank j."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def _seq_to_heads(x: Tensor, group) -> Tensor:
    sp = dist.get_world_size(group)
    b, h, l_local, d = x.shape
    x = x.reshape(b, sp, h // sp, l_local, d).transpose(0, 1)  # (sp, B, H/sp, L/sp, D): chunk j = head group j
    y = _all_to_all(x, group)  # (sp, B, H/sp, L/sp, D): chunk j = rank j's tokens of this rank's heads
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * l_local, d)  # (B, H/sp, L, D)


def _heads_to_seq(x: Tensor, group) -> Tensor:
    sp = dist.get_world_size(group)
    b, h_local, seq, d = x.shape
    x = x.reshape(b, h_local, sp, seq // sp, d).permute(2, 0, 1, 3, 4)  # (sp, B, H/sp, L/sp, D): j = rank j's tokens
    y = _all_to_all(x, group)  # (sp, B, H/sp, L/sp, D): chunk j = this rank's tokens of head group j
    return y.transpose(0, 1).reshape(b, sp * h_local, seq // sp, d)  # (B, H, L/sp, D)


class _AllToAll(torch.autograd.Function):
    """`_seq_to_heads` (to_heads=True) or `_heads_to_seq`; the backward of each is the other."""

    @staticmethod
    def forward(ctx, x: Tensor, group, to_heads: bool) -> Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def seq_to_heads(x: Tensor, group) -> Tensor:
    """(B, H, L/sp, D) local tokens, all heads → (B, H/sp, L, D) all tokens, this rank's heads (differentiable)."""
    return _AllToAll.apply(x, group, True)


def heads_to_seq(x: Tensor, group) -> Tensor:
    """(B, H/sp, L, D) all tokens, this rank's heads → (B, H, L/sp, D) local tokens, all heads (differentiable)."""
    return _AllToAll.apply(x, group, False)


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 1; backward keeps this rank's slice (every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int) -> Tensor:
        ctx.rank, ctx.local = rank, x.shape[1]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)  # (B, L, ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local), None, None


def gather_tokens(x: Tensor, groups: SPGroups) -> Tensor:
    """(B, L/sp, ...) → (B, L, ...) on every rank of the group; the gradient convention of the module docstring."""
    return _GatherTokens.apply(x, groups.group, groups.rank)


# ---------------------------------------------------------------- the model transform


class SequenceParallel:
    """What the seam in models/wan.py calls: shard tokens, all-to-all around the attention core, gather outputs."""

    def __init__(self, groups: SPGroups):
        self.groups = groups

    def __deepcopy__(self, memo) -> SequenceParallel:
        return self  # holds process groups only

    def _local(self, seq_len: int) -> tuple[int, int]:
        sp = self.groups.size
        if seq_len % sp:
            raise ValueError(f"trainer.sp_size={sp} must divide the token count {seq_len} (the patched latent grid "
                             "F'·H'·W'); pick a resolution, frame count or sp_size that divides it")
        return self.groups.rank * (seq_len // sp), seq_len // sp

    def shard(self, tokens: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """tokens (B, L, dim) and RoPE rows (L, D/2) each → this rank's contiguous slice of L/sp tokens."""
        start, n = self._local(tokens.shape[1])
        return tokens.narrow(1, start, n), tuple(r.narrow(0, start, n) for r in rope)

    def gather(self, out: Tensor) -> Tensor:
        """(B, L/sp, C) → (B, L, C): the full output on every rank of the group."""
        return gather_tokens(out, self.groups)

    def heads(self, num_heads: int) -> slice:
        """This rank's head range after the all-to-all."""
        per_rank = num_heads // self.groups.size
        return slice(self.groups.rank * per_rank, (self.groups.rank + 1) * per_rank)

    def attend(self, core: nn.Module, q: Tensor, k: Tensor, v: Tensor, layout, attn_kwargs: dict) -> Tensor:
        """Run `core` on all tokens of this rank's heads: q, k, v (B, H, L/sp, D) → out (B, H, L/sp, D)."""
        b, h = q.shape[:2]
        qkv = seq_to_heads(torch.cat([q, k, v]), self.groups.group)  # (3B, H/sp, L, D): one all-to-all for three
        q, k, v = qkv.split(b)
        out = core(q, k, v, layout, heads=self.heads(h), **attn_kwargs)  # (B, H/sp, L, D)
        return heads_to_seq(out, self.groups.group)  # (B, H, L/sp, D)


def apply_sequence_parallel(model: nn.Module, groups: SPGroups) -> nn.Module:
    """Make a built WanModel run Ulysses sequence parallelism over `groups` (in place; returns the model).

    Sets the `sequence_parallel` attribute of the model and of every block's SelfAttention; modules, parameters
    and state dict keys stay as they are, and the attention core is not touched, so FPS attention can be applied
    before or after. A group of size 1 leaves the model unchanged.
    """
    if groups.size == 1:
        return model
    heads = model.cfg.num_heads
    if heads % groups.size:
        raise ValueError(f"trainer.sp_size={groups.size} must divide model.num_heads={heads} (Ulysses splits the "
                         "heads across the ranks of a group)")
    if getattr(model, "sequence_parallel", None) is not None:
        raise ValueError("apply_sequence_parallel: the model is already sequence parallel")
    sp = SequenceParallel(groups)
    model.sequence_parallel = sp
    for block in model.blocks:
        block.self_attn.sequence_parallel = sp
    return model
