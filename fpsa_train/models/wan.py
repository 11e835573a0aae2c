"""The Wan2.1 text-to-video diffusion transformer, exactly as published (reference/wan.md §2 and §7).

Module names equal the original checkpoint's keys (`blocks.N.self_attn.q`, `head.modulation`, ...), so the
original key format is our state dict and the diffusers format is a rename (models/state_dict.py).

What must be exact, and is:
- q/k RMSNorm over the full width (all heads together), before the split into heads;
- interleaved 3D RoPE split 44/42/42 (models/rope.py);
- sinusoidal time embedding cos-then-sin on t ∈ [0, 1000], computed in float64; time MLP, modulation, the
  residual stream and the head in fp32, whatever the autocast dtype (the original wraps them in fp32 autocast);
- per-block modulation from e0 = time_projection(e); the head's from e itself;
- cross-attention ungated, unmodulated, pre-normed by the one affine LayerNorm (norm3), over text zero-padded to
  `text_len` without a mask;
- unpatchify channel layout (p_t, p_h, p_w, c), c fastest.

Self-attention runs through `self_attn.core` (models/attention.py), which a transform replaces on a built model.
All samples of a batch share one latent shape (bucketed data), so no key-padding mask is needed.

Sequence parallelism is a transform too (fpsa_train/sequence_parallel.py, never imported here). Its seam is the
plain attribute `sequence_parallel` (None by default; no parameters, so no state dict keys) of the model and of
every SelfAttention: the model asks it to `shard` the tile-major tokens and their RoPE rows to this rank's slice
and to `gather` the head's output back to all tokens; a SelfAttention hands its core to `attend`, which runs the
core on all tokens of this rank's heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fpsa_train.models.attention import SDPAttention
from fpsa_train.models.config import WanConfig
from fpsa_train.models.rope import apply_rope, rope_angles, rope_cos_sin
from fpsa_train.models.token_order import TokenLayout


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever the parameter dtype (bf16 under DeepSpeed) or autocast state."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] embedding of timesteps t (B,) on the 0..1000 scale, frequencies 10000^(−i/half), in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)  # (half,)
    angles = torch.outer(t.to(torch.float64), freqs)  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the original's order of operations)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (with or without affine), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class _Attention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (all heads together), as both attentions use."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # (B, L, dim) → (B, L, H, D)


class SelfAttention(_Attention):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__(dim, num_heads, eps)
        self.core: nn.Module = SDPAttention()
        self.sequence_parallel = None  # set by sequence_parallel.py: runs the core across the ranks of a group

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout,
                attn_kwargs: dict) -> torch.Tensor:
        q = apply_rope(self.heads(self.norm_q(self.q(x))), *rope).transpose(1, 2)  # (B, L, H, D) → (B, H, L, D)
        k = apply_rope(self.heads(self.norm_k(self.k(x))), *rope).transpose(1, 2)  # (B, H, L, D)
        v = self.heads(self.v(x)).transpose(1, 2)  # (B, H, L, D)
        if self.sequence_parallel is None:
            out = self.core(q, k, v, layout, **attn_kwargs)
        else:  # L is this rank's tokens; the core sees all tokens of this rank's heads
            out = self.sequence_parallel.attend(self.core, q, k, v, layout, attn_kwargs)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, H, L, D) → (B, L, dim)


class CrossAttention(_Attention):
    """Text cross-attention: q from the video tokens, k/v from all `text_len` text tokens (no mask, no RoPE)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x))).transpose(1, 2)  # (B, H, L, D)
        k = self.heads(self.norm_k(self.k(context))).transpose(1, 2)  # (B, H, Lt, D)
        v = self.heads(self.v(context)).transpose(1, 2)  # (B, H, Lt, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, L, dim)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout, attn_kwargs: dict) -> torch.Tensor:
        # x: (B, L, dim) fp32 residual stream; e0: (B, 6, dim) fp32
        with _no_autocast(x.device.type):
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, rope, layout, attn_kwargs)
        x = x + y.float() * gate_sa
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn(self.norm2(x) * (1 + scale_ff) + shift_ff)
        return x + y.float() * gate_ff


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x.device.type):
            shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)  # each (B, 1, dim)
            return _linear_fp32(self.head, self.norm(x.float()) * (1 + scale) + shift)  # (B, L, prod(p)·c)


class WanModel(nn.Module):
    """Wan2.1 T2V DiT. `forward(x, t, context)`: latents (B, C, F, H, W), timesteps (B,) on 0..1000, text
    (B, ≤text_len, text_dim) or a list of unpadded (L_i, text_dim) → velocity (B, C_out, F, H, W) in fp32."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=tuple(cfg.patch_size),
                                         stride=tuple(cfg.patch_size))
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._layout_cache: dict = {}
        self.sequence_parallel = None  # set by sequence_parallel.py: shards the tokens across the ranks of a group
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original initialisation: xavier-uniform Linears with zero bias, N(0, 0.02) for the text and time
        embeddings, xavier for the flattened patch kernel, a zero output layer; modulations stay randn/√dim."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def layout(self, grid: tuple[int, int, int]) -> TokenLayout:
        return TokenLayout(tuple(grid), self.cfg.token_order, tuple(self.cfg.tile_shape))

    def _layout_tensors(self, layout: TokenLayout, device: torch.device) -> tuple:
        """(rope (cos, sin), perm, inv) for a grid on a device, cached: shapes repeat from step to step, and the
        permutations should not be copied to the GPU on every forward. RoPE rows follow the layout's token
        order (positions travel with their tokens); perm/inv are None in raster order."""
        key = (layout, str(device))
        if key not in self._layout_cache:
            with torch.inference_mode(False):  # built once, used by training and validation alike
                angles = rope_angles(layout.grid, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_max_len)
                perm, inv = layout.permutation(device), layout.inverse_permutation(device)
                if perm is not None:
                    angles = angles[perm.cpu()]
                self._layout_cache = {key: (rope_cos_sin(angles, device), perm, inv)}  # keep the latest grid only
        return self._layout_cache[key]

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad text to `text_len` (no mask, as published) and project: (B, text_len, dim)."""
        if isinstance(context, (list, tuple)):
            padded = context[0].new_zeros(len(context), self.cfg.text_len, self.cfg.text_dim)
            for i, c in enumerate(context):
                padded[i, : c.shape[0]] = c[: self.cfg.text_len]
            context = padded
        elif context.shape[1] < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        elif context.shape[1] > self.cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens; the model takes at most "
                             f"text_len={self.cfg.text_len}")
        return self.text_embedding(context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | list[torch.Tensor],
                attn_kwargs: dict | None = None) -> torch.Tensor:
        attn_kwargs = attn_kwargs or {}
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) is not divisible by patch_size {self.cfg.patch_size}")
        layout = self.layout((f // pt, h // ph, w // pw))
        rope, perm, inv = self._layout_tensors(layout, x.device)

        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).float()  # (B, L, dim), raster order
        if perm is not None:
            tokens = tokens[:, perm]  # (B, L, dim), tile-major
        if self.sequence_parallel is not None:
            tokens, rope = self.sequence_parallel.shard(tokens, rope)  # (B, L/sp, dim): this rank's slice

        with _no_autocast(x.device.type):
            e = _linear_fp32(self.time_embedding[2],
                             F.silu(_linear_fp32(self.time_embedding[0], sinusoidal_embedding(t, self.cfg.freq_dim))))
            e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))  # (B, 6, dim)
        context = self.embed_text(context)  # (B, text_len, dim)

        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, context, rope, layout, attn_kwargs, use_reentrant=False)
            else:
                tokens = block(tokens, e0, context, rope, layout, attn_kwargs)

        out = self.head(tokens, e)  # (B, L, pt·ph·pw·c) fp32
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.gather(out)  # (B, L/sp, ·) → (B, L, ·) on every rank of the group
        if inv is not None:
            out = out[:, inv]  # back to raster order
        return self.unpatchify(out, layout.grid)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, pt·ph·pw·c) raster tokens → (B, c, F, H, W), with c varying fastest in the channel index."""
        b = out.shape[0]
        (gf, gh, gw), (pt, ph, pw) = grid, self.cfg.patch_size
        out = out.view(b, gf, gh, gw, pt, ph, pw, self.cfg.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, c, F', pt, H', ph, W', pw)
        return out.reshape(b, self.cfg.out_dim, gf * pt, gh * ph, gw * pw)
