"""Attention layers whose computation is delegated to replaceable processor objects.

As in diffusers, an :class:`Attention` module owns the projections (``to_q``, ``to_k``,
``to_v``, ``to_out.0``, the checkpoint's key names) and hands the computation to
``self.processor``. Features that change attention (the Q-cache, the reference K/V bank)
install processors through the U-Net's ``add_control``; the model code never changes.

Per-call state reaches every processor as keyword arguments (``attention_kwargs``, like
diffusers' ``cross_attention_kwargs``). The U-Net always passes ``timesteps`` (b, t), each
frame's timestep, and ``shared``, a dict that lives for one forward pass; callers add their
own, e.g. the reference bank's rows. Processors ignore what they do not use.
"""

from __future__ import annotations

from typing import Any

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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, **attention_kwargs: Any) -> torch.Tensor:
        return self.processor(self, x, context, **attention_kwargs)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(b, n, heads*d) -> (b, heads, n, d)."""
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(b, heads, n, d) -> (b, n, heads*d)."""
        return rearrange(t, "b h n d -> b n (h d)")


# On a CPU, attention over at most this many keys (temporal attention over a window's frames) runs
# as two matmuls and an explicit softmax: there the fused kernel and aten's softmax are slower for
# such short rows (measured at the U-Net's shapes: 1.5x in fp32, 3.5-4.3x in bf16; tools/bench_ops.py).
SHORT_KEYS = 32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + attn_mask) v over (b, heads, n, d); the softmax in float32."""
    if q.device.type == "cpu" and k.shape[-2] <= SHORT_KEYS:
        scores = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        return (weights / weights.sum(-1, keepdim=True)).to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class AttnProcessor:
    """Plain attention (:func:`attend`, scale d_head^-0.5)."""

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None, **attention_kwargs: Any) -> torch.Tensor:
        q, k, v = self.project(attn, x, context)
        return self.output(attn, attend(q, k, v))

    @staticmethod
    def project(attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (of ``context``, else of ``x``), split into heads: (b, heads, n, d)."""
        context = x if context is None else context
        return attn.split_heads(attn.to_q(x)), attn.split_heads(attn.to_k(context)), attn.split_heads(attn.to_v(context))

    @staticmethod
    def output(attn: Attention, out: torch.Tensor) -> torch.Tensor:
        """The layer's output projection of per-head results (b, heads, n, d)."""
        return attn.to_out(attn.merge_heads(out))


class PerRow:
    """Per-call attention state that describes each sample row of a U-Net call.

    A caller that splits one batch into several U-Net calls (guidance branches, ``max_batch``,
    ranks) hands each call the rows it runs: :func:`rows_of`.
    """

    def rows(self, index: slice | torch.Tensor) -> PerRow:
        raise NotImplementedError


def rows_of(attention_kwargs: dict[str, Any] | None, index: slice | torch.Tensor) -> dict[str, Any] | None:
    """``attention_kwargs`` for the sample rows ``index`` of the batch they describe."""
    if not attention_kwargs:
        return attention_kwargs
    return {k: v.rows(index) if isinstance(v, PerRow) else v for k, v in attention_kwargs.items()}
