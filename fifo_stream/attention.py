"""Attention layers whose computation is delegated to replaceable processor objects.

As in diffusers, an :class:`Attention` module owns the projections (``to_q``,
``to_k``, ``to_v``, ``to_out.0``, the checkpoint's key names) and hands the
computation to ``self.processor``. Features that change attention (the Q-cache,
the reference K/V bank) install processors; the model code never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given.

    ``name`` is the layer's state-dict path in the U-Net (set by the U-Net), so
    processors can be chosen per layer.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.name = ""
        self.processor: AttnProcessor = AttnProcessor()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, x, context)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(b, n, heads*d) -> (b, heads, n, d)."""
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(b, heads, n, d) -> (b, n, heads*d)."""
        return rearrange(t, "b h n d -> b n (h d)")


class AttnProcessor:
    """Plain attention through ``scaled_dot_product_attention`` (scale d_head^-0.5)."""

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.project(attn, x, context)
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.to_out(attn.merge_heads(out))

    @staticmethod
    def project(attn: Attention, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, split into heads: (b, heads, n, d)."""
        return attn.split_heads(attn.to_q(x)), attn.split_heads(attn.to_k(context)), attn.split_heads(attn.to_v(context))
