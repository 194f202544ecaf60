"""The VideoCrafter2 3D U-Net.

Built from the upstream ``unet_config.params`` dict (same keys, same meaning, plus
``temporal_attention_resolutions`` to leave temporal attention out of some attention
blocks), so the full-size model and small test models are one class, and its state-dict keys
are the checkpoint's keys under ``model.diffusion_model.`` (including the
upstream spelling ``temopral_conv``). Its layers are in :mod:`fifo_stream.models.unet_blocks`.

Timesteps may be given per sample ``(b,)`` or per frame ``(b, t)``; context per sample
``(b, n, d)`` or per frame ``(b, t, n, d)``. Attention processors are the extension point:
consistency controls install theirs with :meth:`UNet3D.add_control`, and per-call state
reaches them through ``forward(..., attention_kwargs=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import FifoStreamError
from .attention import Attention, AttnProcessor
from .unet_blocks import (
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    TemporalTransformer,
    UNetBlock,
    Upsample,
    per_frame,
    timestep_embedding,
)


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


def _check_options(upstream: dict, temporal_selfatt_only: bool, num_head_channels: int, num_heads: int, addition_attention: bool) -> None:
    """Refuse upstream options this U-Net does not implement, naming the option."""
    for key, value in upstream.items():
        if key in _UNSUPPORTED and value != _UNSUPPORTED[key]:
            raise FifoStreamError(f"U-Net option {key}={value} is not supported (VideoCrafter2 uses {_UNSUPPORTED[key]})")
        if key not in _UNSUPPORTED and key not in _IGNORED:
            raise FifoStreamError(f"unknown U-Net option '{key}'; remove it from the model config")
    if not temporal_selfatt_only:
        raise FifoStreamError("U-Net option temporal_selfatt_only=False is not supported (VideoCrafter2 uses True)")
    if (num_head_channels == -1) == (num_heads == -1):
        raise FifoStreamError("set exactly one of num_head_channels and num_heads in the U-Net config")
    if addition_attention and num_head_channels == -1:
        raise FifoStreamError("addition_attention needs num_head_channels in the U-Net config (it sets init_attn's head width)")


@dataclass
class _Layers:
    """Makes the U-Net's residual and attention layers from the settings they share."""

    emb_dim: int
    dropout: float
    temporal_conv: bool
    temporal_attention: bool
    temporal_resolutions: list[int]
    num_head_channels: int
    num_heads: int
    transformer_depth: int
    context_dim: int
    use_linear: bool

    def res(self, ch_in: int, ch_out: int) -> ResBlock:
        return ResBlock(ch_in, self.emb_dim, ch_out, self.dropout, self.temporal_conv)

    def attention(self, ch: int, ds: int | None = None) -> list[nn.Module]:
        """A spatial transformer of width ``ch`` and a temporal one, unless latent downsampling ``ds`` has no temporal attention.

        The middle block (``ds`` None) always has both, as upstream.
        """
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        layers: list[nn.Module] = [SpatialTransformer(ch, heads, dim_head, self.transformer_depth, self.context_dim, self.use_linear)]
        if self.temporal_attention and (ds is None or ds in self.temporal_resolutions):
            layers.append(TemporalTransformer(ch, heads, dim_head, self.transformer_depth, self.use_linear))
        return layers


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
        temporal_attention_resolutions: list[int] | None = None,
        **upstream_options,
    ):
        super().__init__()
        _check_options(upstream_options, temporal_selfatt_only, num_head_channels, num_heads, addition_attention)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.temporal_length = temporal_length
        self.fps_cond = fps_cond
        self.addition_attention = addition_attention
        self.gradient_checkpointing = False
        emb_dim = model_channels * 4
        temporal_resolutions = attention_resolutions if temporal_attention_resolutions is None else temporal_attention_resolutions
        make = _Layers(emb_dim, dropout, temporal_conv, temporal_attention, temporal_resolutions, num_head_channels, num_heads, transformer_depth, context_dim, use_linear)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        if addition_attention:
            # 8 heads of num_head_channels with 1x1 Conv1d projections, as upstream.
            self.init_attn = UNetBlock([TemporalTransformer(model_channels, 8, num_head_channels, transformer_depth, False)])
        skip_channels = self._add_encoder(make, channel_mult, num_res_blocks, attention_resolutions)
        ch = skip_channels[-1]
        self.middle_block = UNetBlock([make.res(ch, ch), *make.attention(ch), make.res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        ch = self._add_decoder(make, channel_mult, num_res_blocks, attention_resolutions, skip_channels)
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.name = name
        self._controls: dict[str, list[str]] = {}

    def _add_encoder(self, make: _Layers, channel_mult: list[int], num_res_blocks: int, attention_resolutions: list[int]) -> list[int]:
        """Append the encoder's levels to ``input_blocks``; returns the widths of the skips, in order."""
        skip_channels = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [make.res(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in attention_resolutions:
                    layers += make.attention(ch, ds)
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        return skip_channels

    def _add_decoder(self, make: _Layers, channel_mult: list[int], num_res_blocks: int, attention_resolutions: list[int], skip_channels: list[int]) -> int:
        """Append the decoder's levels to ``output_blocks``, each block taking one skip (deepest first); returns the last width."""
        skips = list(skip_channels)
        ch, ds = skips[-1], 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [make.res(ch + skips.pop(), mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in attention_resolutions:
                    layers += make.attention(ch, ds)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(layers))
        return ch

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

    @property
    def controls(self) -> dict[str, list[str]]:
        """The installed controls (e.g. ``qcache``, ``refbank``), each with the layer paths it holds."""
        return {name: list(paths) for name, paths in self._controls.items()}

    def add_control(self, name: str, processors: dict[str, AttnProcessor]) -> None:
        """Install a control's processors (``{layer path: processor}``); a layer belongs to one control at most."""
        if name in self._controls:
            raise FifoStreamError(f"{name} is already installed on this U-Net; remove it first")
        taken = {path: other for other, paths in self._controls.items() for path in paths}
        clash = sorted(set(processors) & set(taken))
        if clash:
            raise FifoStreamError(f"{name} and {taken[clash[0]]} both want attention layer {clash[0]}; choose other layers")
        self.set_attn_processor(processors)
        self._controls[name] = sorted(processors)

    def remove_control(self, name: str) -> None:
        """Give a control's layers back to plain attention."""
        self.set_attn_processor({path: AttnProcessor() for path in self._controls.pop(name)})

    # -- forward ---------------------------------------------------------------------

    def embed(self, timesteps: torch.Tensor, fps: int | torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        """Per-frame embeddings ((b t), 4*mc): timestep embedding (+ fps embedding)."""
        timesteps = per_frame(timesteps, b, t)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1), self.model_channels).to(dtype))
        if self.fps_cond:
            if fps is None:
                fps = 16
            fps = torch.full((b,), fps, device=timesteps.device) if isinstance(fps, (int, float)) else fps.reshape(b)
            fps_emb = self.fps_embedding(timestep_embedding(fps, self.model_channels).to(dtype))
            emb = emb + fps_emb.repeat_interleave(t, dim=0)
        return emb

    def _context_free_prefix(self) -> tuple[int, int]:
        """(input block, layer) of the first layer that reads the context; (0, 0) when a layer before
        it has a processor other than plain attention (it may hold per-row state)."""
        for i, block in enumerate(self.input_blocks):
            for j, layer in enumerate(block):
                if isinstance(layer, SpatialTransformer):
                    before = [*self.input_blocks[:i], *block[:j], *([self.init_attn] if self.addition_attention else [])]
                    plain = all(type(m.processor) is AttnProcessor for part in before for m in part.modules() if isinstance(m, Attention))
                    return (i, j) if plain else (0, 0)
        return 0, 0

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: int | torch.Tensor | None = 16,
        attention_kwargs: dict[str, Any] | None = None,
        branches: int = 1,
    ) -> torch.Tensor:
        """Predict noise for ``x`` (b, c, t, h, w).

        ``attention_kwargs`` reach every attention processor, with ``timesteps`` (b, t) and
        ``shared`` (a dict of this pass) added (see :mod:`fifo_stream.models.attention`).
        ``branches`` > 1: ``context`` holds that many contexts per sample, branch-major (rows
        k*b..(k+1)*b are branch k, as guidance's conditional and unconditional), the result has
        branches*b samples, and the layers before the first cross-attention run once per sample.
        """
        b, _, t, _, _ = x.shape
        timesteps = per_frame(timesteps, b, t)
        emb = self.embed(timesteps, fps, b, t)
        if context.dim() == 4:
            context = rearrange(context, "b t n d -> (b t) n d")
        else:
            context = context.repeat_interleave(t, dim=0)
        h = rearrange(x, "b c t h w -> (b t) c h w").type(self.out[2].weight.dtype)
        context = context.type(h.dtype)
        kwargs = {**(attention_kwargs or {}), "timesteps": timesteps.repeat(branches, 1), "shared": {}}

        def run(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
            if self.gradient_checkpointing and self.training:
                return checkpoint(block, h, emb, context, batch, kwargs, use_reentrant=False)
            return block(h, emb, context, batch, kwargs)

        def widen(v: torch.Tensor) -> torch.Tensor:
            return v.repeat(branches, *[1] * (v.dim() - 1))

        split_block, split_layer = self._context_free_prefix() if branches > 1 else (-1, 0)
        batch, skips = b, []
        for i, block in enumerate(self.input_blocks):
            if i == split_block:
                if split_layer:
                    h = run(block[:split_layer], h, emb, batch)
                h, emb, skips, batch = widen(h), widen(emb), [widen(s) for s in skips], b * branches
                block = block[split_layer:]
            h = run(block, h, emb, batch)
            if i == 0 and self.addition_attention:
                h = run(self.init_attn, h, emb, batch)
            skips.append(h)
        h = run(self.middle_block, h, emb, batch)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, skips.pop()], dim=1), emb, batch)
        y = self.out(h).type(x.dtype)
        return rearrange(y, "(b t) c h w -> b c t h w", b=batch)
