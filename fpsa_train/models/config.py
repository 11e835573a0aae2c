"""Architecture of the Wan2.1 text-to-video DiT, as a dataclass with a docstring per field.

The published sizes (reference/wan.md §1) are `WAN_1_3B` and `WAN_14B`; `tiny` in configs/model/ is the same
code path at a size that trains on a laptop CPU. Fields that the original `config.json` does not carry
(patch size, qk-norm, cross-attention norm, text width) are fixed by the original code and kept here only so a
test can build small variants; loading a real checkpoint checks them against the weights' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_ORDERS = ("raster", "tile")


@dataclass
class WanConfig:
    dim: int = 1536
    """Hidden width (1536 for 1.3B, 5120 for 14B)."""
    ffn_dim: int = 8960
    """Feed-forward inner width (8960 for 1.3B, 13824 for 14B)."""
    num_heads: int = 12
    """Attention heads; head_dim = dim / num_heads (128 for both published models)."""
    num_layers: int = 30
    """Number of transformer blocks."""
    in_dim: int = 16
    """Latent channels in (16 for T2V)."""
    out_dim: int = 16
    """Latent channels out."""
    text_dim: int = 4096
    """Width of the text-encoder output (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    text_len: int = 512
    """Text tokens after zero-padding; cross-attention attends all of them, unmasked, as published."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Patchify kernel/stride (t, h, w) over the latent."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base, shared by the three axes."""
    rope_max_len: int = 1024
    """Positions per axis in the RoPE table."""
    token_order: str = "raster"
    """Order of the tokens inside the blocks: `raster` (t, h, w as published) or `tile` (tile-major for
    `tile_shape`; RoPE positions travel with their tokens and the output is un-permuted before unpatchify)."""
    tile_shape: list[int] = field(default_factory=lambda: [6, 8, 8])
    """3D tile (t, h, w) in patched tokens for `token_order: tile`; edge tiles may be partial."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (per-block checkpointing)."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(
                f"head_dim = model.dim/model.num_heads = {head_dim} must be even and >= 6 for the 3D RoPE split"
            )
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"model.token_order={self.token_order!r}: expected one of {TOKEN_ORDERS}")
        for name in ("patch_size", "tile_shape"):
            value = list(getattr(self, name))
            if len(value) != 3 or any(int(v) < 1 for v in value):
                raise ValueError(f"model.{name}={value}: expected three positive integers (t, h, w)")
        for name in ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim} must be even (cos and sin halves)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def architecture(self) -> dict:
        """The fields that define the weights (what an exported `config.json` must carry)."""
        keys = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                "text_len", "patch_size", "eps")
        return {k: (list(getattr(self, k)) if k == "patch_size" else getattr(self, k)) for k in keys}


WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
