"""OpenCLIP text tower (ViT-H-14 layout) producing VideoCrafter2's cross-attention context.

Parameter names match the checkpoint's ``cond_stage_model.model.*`` keys exactly, so the
weights load strictly with :func:`fifo_stream.checkpoint.load_weights`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FifoStreamError
from .tokenizer import ClipTokenizer, WordTokenizer

_LAYERS = {"last": 0, "penultimate": 1}


class TextEncoderError(FifoStreamError):
    pass


class _Attention(nn.Module):
    """Causal multi-head self-attention with ``nn.MultiheadAttention``'s parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualBlock(width, heads) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP text transformer returning the per-token hidden states (B, context_length, width).

    ``layer="penultimate"`` skips the last block (VideoCrafter2); ``"last"`` runs all.
    ``text_projection`` and ``logit_scale`` exist only so checkpoints load strictly.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 1024,
        heads: int = 16,
        layers: int = 24,
        context_length: int = 77,
        embed_dim: int = 1024,
        layer: str = "penultimate",
    ):
        super().__init__()
        if width % heads:
            raise TextEncoderError(f"text encoder width {width} is not divisible by heads {heads}")
        if layers <= _LAYERS[layer]:
            raise TextEncoderError(f"text encoder needs more than {_LAYERS[layer]} layers for layer {layer!r}, got {layers}")
        self.context_length = context_length
        self.layer = layer
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, heads, layers)
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, context_length, width) for token ids (B, context_length)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise TextEncoderError(f"text tokens must have shape (B, {self.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        blocks = self.transformer.resblocks
        for block in blocks[: len(blocks) - _LAYERS[self.layer]]:
            x = block(x)
        return self.ln_final(x)


class TextEncoder(nn.Module):
    """Prompts to U-Net context: a tokenizer followed by :class:`OpenCLIPTextTower`.

    The tokenizer is OpenCLIP's BPE (VideoCrafter2) unless another one, such as a
    :class:`~fifo_stream.tokenizer.WordTokenizer` for a small grammar, is given.
    """

    def __init__(self, tower: OpenCLIPTextTower | None = None, tokenizer: ClipTokenizer | WordTokenizer | None = None):
        super().__init__()
        self.tower = tower if tower is not None else OpenCLIPTextTower()
        self.tokenizer = tokenizer if tokenizer is not None else ClipTokenizer(context_length=self.tower.context_length)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Context tensor (B, context_length, width) on the tower's device and dtype (differentiable, for training)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.tower(self.tokenizer(prompts).to(self.tower.token_embedding.weight.device))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Context tensor (B, context_length, width) on the tower's device and dtype, without autograd."""
        return self(prompts)
