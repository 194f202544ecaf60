"""The VideoCrafter2 3D U-Net in one file.

Built from the upstream ``unet_config.params`` dict (same keys, same meaning), so
the full-size model and small test models are one class, and its state-dict keys
are the checkpoint's keys under ``model.diffusion_model.`` (including the
upstream spelling ``temopral_conv``).

Layout: frames are folded into the batch, ``(b t) c h w``, for every 2D layer;
temporal layers unfold them. Timesteps may be given per sample ``(b,)`` or per
frame ``(b, t)``; context per sample ``(b, n, d)`` or per frame ``(b, t, n, d)``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttnProcessor
from .errors import FifoStreamError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of shape (len(t), dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as upstream's ResBlocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


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
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        y = rearrange(self.norm(x), "b c t h w -> (b h w) c t")
        if not self.use_linear:
            y = self.proj_in(y)
        y = rearrange(y, "n c t -> n t c")
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
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

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, batch: int) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = rearrange(x, "(b t) c h w -> b c t h w", b=batch)
                x = rearrange(layer(x), "b c t h w -> (b t) c h w")
            else:
                x = layer(x)
        return x


# Upstream options whose non-default values change the architecture in ways
# VideoCrafter2 does not use; refused rather than silently ignored.
_UNSUPPORTED = {
    "use_relative_position": False,
    "use_causal_attention": False,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "tempspatial_aware": False,
    "use_image_attention": False,
    "dims": 2,
}
_IGNORED = {"use_fp16", "temporal_length", "conv_resample", "image_size", "use_checkpoint"}


class UNet3D(nn.Module):
    """VideoCrafter2's text-to-video U-Net, constructed from the upstream config keys."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: list[int],
        num_res_blocks: int,
        channel_mult: list[int],
        context_dim: int,
        num_head_channels: int = -1,
        num_heads: int = -1,
        transformer_depth: int = 1,
        use_linear: bool = False,
        temporal_conv: bool = False,
        temporal_attention: bool = True,
        temporal_selfatt_only: bool = True,
        addition_attention: bool = False,
        fps_cond: bool = False,
        dropout: float = 0.0,
        temporal_length: int = 16,
        **upstream_options,
    ):
        super().__init__()
        for key, value in upstream_options.items():
            if key in _UNSUPPORTED and value != _UNSUPPORTED[key]:
                raise FifoStreamError(f"U-Net option {key}={value} is not supported (VideoCrafter2 uses {_UNSUPPORTED[key]})")
            if key not in _UNSUPPORTED and key not in _IGNORED:
                raise FifoStreamError(f"unknown U-Net option '{key}'; remove it from the model config")
        if not temporal_selfatt_only:
            raise FifoStreamError("U-Net option temporal_selfatt_only=False is not supported (VideoCrafter2 uses True)")
        if (num_head_channels == -1) == (num_heads == -1):
            raise FifoStreamError("set exactly one of num_head_channels and num_heads in the U-Net config")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.temporal_length = temporal_length
        self.fps_cond = fps_cond
        self.addition_attention = addition_attention
        self.gradient_checkpointing = False
        emb_dim = model_channels * 4

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def attention_layers(ch: int) -> list[nn.Module]:
            heads, dim_head = heads_for(ch)
            layers: list[nn.Module] = [SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, use_linear)]
            if temporal_attention:
                layers.append(TemporalTransformer(ch, heads, dim_head, transformer_depth, use_linear))
            return layers

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, temporal_conv)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        if addition_attention:
            if num_head_channels == -1:
                raise FifoStreamError("addition_attention needs num_head_channels in the U-Net config (it sets init_attn's head width)")
            # 8 heads of num_head_channels with 1x1 Conv1d projections, as upstream.
            self.init_attn = UNetBlock([TemporalTransformer(model_channels, 8, num_head_channels, transformer_depth, False)])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attention_layers(ch)
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = UNetBlock([res(ch, ch), *attention_layers(ch), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attention_layers(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.name = name

    # -- attention processors (the extension point) --------------------------------

    def attention_layers(self) -> Iterator[tuple[str, Attention]]:
        """Every attention layer with its state-dict path, e.g. ``output_blocks.9.2.transformer_blocks.0.attn1``."""
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                yield name, module

    @property
    def attn_processors(self) -> dict[str, AttnProcessor]:
        return {name: layer.processor for name, layer in self.attention_layers()}

    def set_attn_processor(self, processor) -> None:
        """Install one processor everywhere, or a ``{path: processor}`` dict for the named layers."""
        layers = dict(self.attention_layers())
        if isinstance(processor, dict):
            unknown = sorted(set(processor) - set(layers))
            if unknown:
                raise FifoStreamError(f"no attention layer named {unknown[0]!r} in this U-Net")
            for name, proc in processor.items():
                layers[name].processor = proc
        else:
            for layer in layers.values():
                layer.processor = processor

    # -- forward ---------------------------------------------------------------------

    def embed(self, timesteps: torch.Tensor, fps: int | torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        """Per-frame embeddings ((b t), 4*mc): timestep embedding (+ fps embedding)."""
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, t)
        if timesteps.shape != (b, t):
            raise ValueError(f"timesteps must have shape ({b},) or ({b}, {t}), got {tuple(timesteps.shape)}")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1), self.model_channels).to(dtype))
        if self.fps_cond:
            if fps is None:
                fps = 16
            fps = torch.full((b,), fps, device=timesteps.device) if isinstance(fps, (int, float)) else fps.reshape(b)
            fps_emb = self.fps_embedding(timestep_embedding(fps, self.model_channels).to(dtype))
            emb = emb + fps_emb.repeat_interleave(t, dim=0)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: int | torch.Tensor | None = 16,
    ) -> torch.Tensor:
        """Predict noise for ``x`` (b, c, t, h, w)."""
        b, _, t, _, _ = x.shape
        emb = self.embed(timesteps, fps, b, t)
        if context.dim() == 4:
            context = rearrange(context, "b t n d -> (b t) n d")
        else:
            context = context.repeat_interleave(t, dim=0)
        h = rearrange(x, "b c t h w -> (b t) c h w").type(self.out[2].weight.dtype)

        def run(block: UNetBlock, h: torch.Tensor) -> torch.Tensor:
            if self.gradient_checkpointing and self.training:
                return checkpoint(block, h, emb, context, b, use_reentrant=False)
            return block(h, emb, context, b)

        skips = []
        for i, block in enumerate(self.input_blocks):
            h = run(block, h)
            if i == 0 and self.addition_attention:
                h = run(self.init_attn, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, skips.pop()], dim=1))
        y = self.out(h).type(x.dtype)
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)
