"""The VideoCrafter2 first-stage model: a 2D LDM AutoencoderKL run as diffusers' ``AutoencoderKL``.

Video latents (b, c, t, h, w) are decoded frame by frame (frames folded into the batch).
Checkpoint weights keep their LDM names; diffusers' own converter renames them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_weights
from ..errors import FifoStreamError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

SCALE_FACTOR = 0.18215

# The SD VAE, as in VideoCrafter2's first_stage_config.
VIDEOCRAFTER2_VAE = {
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 4,
    "embed_dim": 4,
    "double_z": True,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def diffusers_vae_config(cfg: Mapping) -> dict:
    """The diffusers ``AutoencoderKL`` config for LDM ``ddconfig`` keys plus ``embed_dim``."""
    if not cfg.get("double_z", True):
        raise FifoStreamError("VAE config: double_z false is not a KL autoencoder; fifo-stream needs double_z true")
    if cfg.get("embed_dim", cfg["z_channels"]) != cfg["z_channels"]:
        raise FifoStreamError(
            f"VAE config: embed_dim {cfg['embed_dim']} != z_channels {cfg['z_channels']} is not supported"
        )
    if cfg.get("attn_resolutions"):
        raise FifoStreamError("VAE config: attn_resolutions must be empty (only the mid-block attention is supported)")
    levels = len(cfg["ch_mult"])
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg["ch"] * m for m in cfg["ch_mult"]],
        "layers_per_block": cfg["num_res_blocks"],
        "latent_channels": cfg["z_channels"],
        "norm_num_groups": 32,
        "sample_size": cfg["resolution"],
        "scaling_factor": SCALE_FACTOR,
    }


class PixelShuffleCodec(nn.Module):
    """A weightless "first stage" for pixel-space models: lossless space-to-depth by ``factor``.

    Frames (b, 3, H, W) in [-1, 1] fold into latents (b, 3 factor^2, H/factor, W/factor).
    It has the AutoencoderKL methods the pipeline uses (``encode(x).latent_dist.mean``,
    ``decode(z, return_dict=False)[0]``, ``device``, ``dtype``).
    """

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode(self, x: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=F.pixel_unshuffle(x, self.factor)))

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        return (F.pixel_shuffle(z, self.factor),)


def spatial_factor(cfg: Mapping) -> int:
    """How many output pixels one latent cell spans along each side (``upscale`` included)."""
    if cfg.get("type", "autoencoder_kl") == "pixel_shuffle":
        factor = int(cfg["factor"])
    else:
        factor = 2 ** (len(cfg["ch_mult"]) - 1)
    return factor * int(cfg.get("upscale") or 1)


def build_vae(cfg: Mapping = VIDEOCRAFTER2_VAE) -> AutoencoderKL | PixelShuffleCodec:
    """An (uninitialised-weights) first stage in eval mode; never touches the network.

    ``type: autoencoder_kl`` (default) is a diffusers AutoencoderKL from LDM ``ddconfig``
    keys (dropout ignored: inference only; build under ``torch.device("meta")`` for a
    weightless skeleton); ``type: pixel_shuffle`` is the weightless :class:`PixelShuffleCodec`.
    Either works at the frame size divided by ``upscale`` (see :func:`encode_frames`).
    """
    kind = cfg.get("type", "autoencoder_kl")
    if kind == "pixel_shuffle":
        return PixelShuffleCodec(int(cfg["factor"])).eval()
    from diffusers import AutoencoderKL

    return AutoencoderKL(**diffusers_vae_config(cfg)).eval().requires_grad_(False)


def convert_vae_state_dict(vae: AutoencoderKL, ldm_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM VAE weights (``first_stage_model.`` prefix removed) renamed to diffusers keys.

    Raises a one-line :class:`CheckpointError` for keys the converter cannot use
    (it would silently drop them) or a missing key it needs.
    """
    converted = _convert(ldm_state, vae.config)
    if len(converted) != len(ldm_state):  # the renaming is one-to-one, so some keys were dropped
        # Convert integer tags instead of weights to see which source keys came through.
        tags = {k: torch.full((1,) * v.dim(), i) for i, (k, v) in enumerate(ldm_state.items())}
        used = {int(v.flatten()[0]) for v in _convert(tags, vae.config).values()}
        dropped = [k for i, k in enumerate(ldm_state) if i not in used]
        more = ", ..." if len(dropped) > 3 else ""
        raise CheckpointError(
            f"checkpoint does not fit the VAE: {len(dropped)} unexpected ({', '.join(dropped[:3])}{more}); "
            "check that the checkpoint and --config describe the same model"
        )
    return converted


def _convert(ldm_state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        return convert_ldm_vae_checkpoint(dict(ldm_state), config)
    except KeyError as e:  # it indexes an upsampler's bias once it has seen the weight
        raise CheckpointError(
            f"checkpoint does not fit the VAE: missing {e.args[0]}; "
            "check that the checkpoint and --config describe the same model"
        ) from None


_LDM_NAMES = (  # diffusers name part -> LDM name part, applied in order
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
    ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
    ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
    ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
    ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
    ("down_blocks.", "down."),
    ("resnets.", "block."),
    ("downsamplers.0.", "downsample."),
    ("upsamplers.0.", "upsample."),
    ("conv_shortcut.", "nin_shortcut."),
    ("conv_norm_out.", "norm_out."),
)


def ldm_vae_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The weights of a diffusers AutoencoderKL under their LDM names: the inverse of
    :func:`convert_vae_state_dict`, so trained VAEs are saved in the checkpoint layout."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for name, value in vae.state_dict().items():
        if name.startswith("decoder.up_blocks."):  # LDM numbers the decoder's levels from the top
            index, rest = name[len("decoder.up_blocks."):].split(".", 1)
            name = f"decoder.up.{levels - 1 - int(index)}.{rest}"
        for old, new in _LDM_NAMES:
            name = name.replace(old, new)
        if ".attn_1." in name and name.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[name] = value
    return out


def load_vae_weights(vae: AutoencoderKL | PixelShuffleCodec, ldm_state: Mapping[str, torch.Tensor]) -> None:
    """Load LDM VAE weights (``first_stage_model.`` prefix removed) strictly into ``vae``."""
    if isinstance(vae, PixelShuffleCodec):
        if ldm_state:
            raise CheckpointError(f"checkpoint has {len(ldm_state)} VAE weights but the config's VAE is pixel_shuffle; check --config")
        vae.to_empty(device="cpu")  # built on the meta device: only the anchor's device and dtype matter
        return
    load_weights(vae, convert_vae_state_dict(vae, ldm_state), "VAE")


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKL,
    z: torch.Tensor,
    scale_factor: float = SCALE_FACTOR,
    batch_size: int = 8,
    clamp: bool = True,
    upscale: int = 1,
) -> torch.Tensor:
    """Decode video latents (b, c, t, h, w) to float32 frames (b, t, 3, H, W) on ``z``'s device.

    Latents are divided by ``scale_factor`` and decoded ``batch_size`` frames at a time, and
    each decoded pixel is repeated ``upscale`` times along each side (nearest); with ``clamp``
    the output is clamped to [-1, 1], otherwise it is the raw decoder output.
    """
    b, c, t, h, w = z.shape
    flat = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = None
    for start in range(0, b * t, batch_size):
        chunk = (flat[start : start + batch_size].float() / scale_factor).to(vae.device, vae.dtype)
        frames = vae.decode(chunk, return_dict=False)[0].float()
        if upscale > 1:
            frames = F.interpolate(frames, scale_factor=upscale, mode="nearest")
        if out is None:  # the output size is only known after the first chunk
            out = torch.empty((b * t, *frames.shape[1:]), dtype=torch.float32, device=z.device)
        out[start : start + batch_size] = frames
    if clamp:
        out.clamp_(-1.0, 1.0)
    return out.reshape(b, t, *out.shape[1:])


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, frames: torch.Tensor, scale_factor: float = SCALE_FACTOR, upscale: int = 1) -> torch.Tensor:
    """Latents of images (b, 3, H, W) in [-1, 1]: the posterior mean times ``scale_factor``, float32.

    With ``upscale`` the images are first averaged over ``upscale`` x ``upscale`` blocks,
    the inverse of :func:`decode_latents`' repetition.
    """
    if upscale > 1:
        frames = F.avg_pool2d(frames, upscale)
    posterior = vae.encode(frames.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float() * scale_factor


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames (..., 3, H, W) in [-1, 1] to uint8 (..., H, W, 3), rounded."""
    pixels = ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1)
