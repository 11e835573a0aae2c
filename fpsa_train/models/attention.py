"""The replaceable self-attention core of the DiT.

Every self-attention layer calls `self.core(q, k, v, layout, **attn_kwargs)`, an `nn.Module` attribute. The
default is PyTorch's scaled-dot-product attention (dense, no mask: Wan attends the whole clip). A transform such
as FPS attention swaps `core` on a built model (module swap); the model file never imports it. `layout` tells
the core where each token sits (grid, order, tiles) and `attn_kwargs` carries per-call state such as the noise
level σ that picks the regime of a step-aware schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fpsa_train.models.token_order import TokenLayout


class SDPAttention(nn.Module):
    """Dense attention through `F.scaled_dot_product_attention`; q, k, v are (B, H, L, D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                **attn_kwargs) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
