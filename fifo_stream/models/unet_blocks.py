"""The layers of the VideoCrafter2 3D U-Net (:mod:`fifo_stream.models.unet` assembles them).

Frames are folded into the batch, ``(b t) c h w``, for every 2D layer; temporal layers
unfold them. Attention layers take the per-call ``attention_kwargs`` and pass them to
their processors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of shape (len(t), dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def per_frame(timesteps: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Timesteps per sample (b,) or per frame (b, t) as per frame (b, t)."""
    if timesteps.dim() == 1:
        timesteps = timesteps[:, None].expand(b, t)
    if timesteps.shape != (b, t):
        raise ValueError(f"timesteps must have shape ({b},) or ({b}, {t}), got {tuple(timesteps.shape)}")
    return timesteps


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as upstream's ResBlocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (p.float() if p is not None else None for p in (self.weight, self.bias))
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # The CPU kernel normalizes bf16 input in float32 itself, given float32 parameters: no upcast copies.
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3,1,1) stages over time, with a residual."""

    def __init__(self, channels: int, dropout: float = 0.1):
        super().__init__()

        def stage(drop: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(32, channels), nn.SiLU()]
            if drop:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*layers)

        self.conv1, self.conv2, self.conv3, self.conv4 = stage(False), stage(True), stage(True), stage(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """2D residual block with a timestep embedding, followed by a temporal conv block."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, temporal_conv: bool):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels)  # upstream key spelling
        self.temporal_conv = temporal_conv

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if self.temporal_conv:
            h = rearrange(h, "(b t) c h w -> b c t h w", b=batch)
            h = rearrange(self.temopral_conv(h), "b c t h w -> (b t) c h w")
        return h


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products into contiguous halves rather than one chunked: GELU of a strided half is slower.
        w, b = self.proj.weight, self.proj.bias
        half = w.shape[0] // 2
        return F.linear(x, w[:half], b[:half]) * F.gelu(F.linear(x, w[half:], b[half:]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention (self-attention again when ``context_dim`` is None), GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, attention_kwargs: dict) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), **attention_kwargs)
        x = x + self.attn2(self.norm2(x), context, **attention_kwargs)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w tokens, cross-attending to the text context."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attention_kwargs: dict) -> torch.Tensor:
        _, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, attention_kwargs)
        if self.use_linear:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class TemporalTransformer(nn.Module):
    """Transformer over time at every pixel; both attentions are self-attention (no context)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head, None) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def forward(self, x: torch.Tensor, attention_kwargs: dict) -> torch.Tensor:
        b, _, _, h, w = x.shape
        y = rearrange(self.norm(x), "b c t h w -> (b h w) c t")
        if not self.use_linear:
            y = self.proj_in(y)
        y = rearrange(y, "n c t -> n t c")
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, None, attention_kwargs)
        if self.use_linear:
            y = self.proj_out(y)
        else:
            y = rearrange(self.proj_out(rearrange(y, "n t c -> n c t")), "n c t -> n t c")
        return x + rearrange(y, "(b h w) t c -> b c t h w", b=b, h=h, w=w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetBlock(nn.ModuleList):
    """A sequence of layers, each fed what it needs (upstream's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, batch: int, attention_kwargs: dict) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attention_kwargs)
            elif isinstance(layer, TemporalTransformer):
                x = rearrange(x, "(b t) c h w -> b c t h w", b=batch)
                x = rearrange(layer(x, attention_kwargs), "b c t h w -> (b t) c h w")
            else:
                x = layer(x)
        return x
