"""The components of a text-to-video model (U-Net, VAE, text encoder, schedule) built from a config."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..runs import distributed
from .checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointError, extract, find_checkpoint, load_weights, read_metadata, read_state_dict
from ..errors import FifoStreamError
from ..sampling.schedule import alphas_cumprod, scale_arr
from .text_encoder import OpenCLIPTextTower, TextEncoder
from .tokenizer import ClipTokenizer, WordTokenizer
from .unet import UNet3D
from .vae import build_vae, decode_latents, encode_frames, load_vae_weights, spatial_factor, to_uint8

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# safetensors metadata of models with a word-level text encoder (see tokenizer.WordTokenizer)
TOKENIZER_KEY, VOCAB_KEY = "fifo_stream.tokenizer", "fifo_stream.vocab"


@dataclass
class VideoModel:
    unet: UNet3D
    vae: torch.nn.Module
    text_encoder: TextEncoder
    alphas: torch.Tensor  # alphas_cumprod, float64
    scales: torch.Tensor | None  # use_scale factors, or None
    scale_factor: float
    device: torch.device
    dtype: torch.dtype
    spatial_factor: int  # output pixels per latent cell along each side
    upscale: int  # output pixels per decoded pixel along each side

    @property
    def frames_per_window(self) -> int:
        return self.unet.temporal_length

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text contexts (B, 77, d) in float32."""
        return self.text_encoder.encode(prompts).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """Latent frames (b, c, t, h, w) -> uint8 frames (b, t, H, W, 3) on the CPU."""
        return to_uint8(decode_latents(self.vae, latents, self.scale_factor, batch_size, upscale=self.upscale)).cpu()

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (t, H, W, 3) at the video size -> latent frames (1, c, t, h, w), float32 on the device."""
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = torch.cat([encode_frames(self.vae, pixels[i : i + 1], self.scale_factor, self.upscale) for i in range(len(pixels))])
        return latents.permute(1, 0, 2, 3)[None]


def resolve_device(name: str) -> torch.device:
    """The device for ``runtime.device``; under a multi-process torchrun job, CUDA means this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FifoStreamError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FifoStreamError(f"device {name} requested but no CUDA GPU is available; use runtime.device=cpu")
    local = distributed.local_rank()
    if device.type == "cuda" and local is not None:
        if device.index is not None:
            raise FifoStreamError(f"runtime.device={name}: under torchrun each process uses the GPU of its LOCAL_RANK; use runtime.device=cuda")
        device = torch.device("cuda", local % torch.cuda.device_count())
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512-BF16 or AMX): there bf16 is about twice as fast as fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``runtime.dtype``; auto: fp16 on CUDA, bf16 on a CPU with bf16 instructions, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise FifoStreamError("fp16 is not supported on the CPU; use runtime.dtype=fp32 (or bf16)")
    return DTYPES[name]


def resolve_overlap_decode(value: bool | str, device: torch.device) -> bool:
    """Whether to decode on a background thread for ``runtime.overlap_decode``: auto means on CUDA only.

    On a CPU the tick's intra-op threads already use every core; a decode thread beside them
    makes them wait for each other (measured: 1.3-1.6x slower frames), so the decode runs inline there.
    """
    return device.type == "cuda" if value == "auto" else bool(value)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, process-wide; False where there is no glibc.

    By default glibc serves blocks above 128 KiB-32 MiB with fresh mmaps and unmaps them when freed,
    so every tick's large activations are page-faulted in again (on the benchmark model about
    40,000 faults and 0.06-0.09 CPU-seconds per frame); served from the heap and never trimmed,
    they reuse the same pages. Memory stays at the run's peak, which does not grow with its length.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mmap_ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)  # older glibc caps it at 32 MiB
    return bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def to_channels_last(module: torch.nn.Module) -> None:
    """Store the 2-D convolution weights NHWC, so convolutions run (and return) channels-last."""
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv2d):
            conv.to(memory_format=torch.channels_last)


def compile_unet(unet: UNet3D, cuda_graphs: bool = False):
    """``unet`` compiled with torch.compile for fixed shapes; with ``cuda_graphs`` replayed as CUDA graphs.

    A CUDA graph's output lives in a buffer that its next replay overwrites, so it is copied out.
    """
    if cuda_graphs and next(unet.parameters()).device.type != "cuda":
        raise FifoStreamError("runtime.cuda_graphs needs a CUDA device; set runtime.cuda_graphs=false")
    compiled = torch.compile(unet, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def replay(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs).clone()

    return replay


def load_model(cfg: DictConfig, checkpoint: str | Path | None = None, trust: bool = False) -> VideoModel:
    """Build every component from ``cfg.model`` and load its weights (checkpoint or seeded random)."""
    m = cfg.model
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.runtime.dtype, device)
    if device.type == "cpu" and cfg.runtime.keep_freed_memory:
        keep_freed_memory()
    unet_cfg = OmegaConf.to_container(m.unet)
    vae_cfg = OmegaConf.to_container(m.vae)
    text_cfg = OmegaConf.to_container(m.text_encoder)
    tokenizer_kind = text_cfg.pop("tokenizer")

    def build():
        return UNet3D(**unet_cfg), build_vae(vae_cfg), OpenCLIPTextTower(**text_cfg)

    if m.weights == "random" and checkpoint is None:
        if tokenizer_kind == "words":
            raise FifoStreamError("a words tokenizer needs its vocabulary from a checkpoint; set model.weights=checkpoint")
        vocab = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(m.seed))
            unet, vae, tower = build()
    else:
        path = find_checkpoint(checkpoint or m.checkpoint)
        state = read_state_dict(path, trust=trust)
        vocab = checkpoint_vocab(path, tokenizer_kind)
        if not any(k.startswith(UNET_PREFIX) for k in state):
            raise CheckpointError(f"{path} has no '{UNET_PREFIX}*' weights; is it a VideoCrafter checkpoint?")
        with torch.device("meta"):
            unet, vae, tower = build()
        load_weights(unet, extract(state, UNET_PREFIX), "U-Net")
        load_vae_weights(vae, extract(state, VAE_PREFIX))
        load_weights(tower, extract(state, TEXT_PREFIX), "text encoder")
        del state
    # Cast as a plain module: diffusers' own .to() warns on every dtype cast, even with no fp32 modules.
    torch.nn.Module.to(vae, device, dtype)
    if cfg.runtime.channels_last:
        to_channels_last(unet)
    sched = m.schedule
    tokenizer = ClipTokenizer(tower.context_length) if vocab is None else WordTokenizer(vocab, tower.context_length)
    return VideoModel(
        unet=unet.to(device, dtype).eval().requires_grad_(False),
        vae=vae.eval().requires_grad_(False),
        text_encoder=TextEncoder(tower.to(device, dtype).eval().requires_grad_(False), tokenizer),
        alphas=alphas_cumprod(sched.num_train_timesteps, sched.linear_start, sched.linear_end),
        scales=scale_arr(sched.num_train_timesteps) if sched.use_scale else None,
        scale_factor=float(sched.scale_factor),
        device=device,
        dtype=dtype,
        spatial_factor=spatial_factor(vae_cfg),
        upscale=int(vae_cfg.get("upscale") or 1),
    )


def checkpoint_vocab(path: Path, tokenizer_kind: str) -> list[str] | None:
    """The word vocabulary a checkpoint stores, checked against the config's tokenizer (None for clip_bpe)."""
    meta = read_metadata(path)
    stored = meta.get(TOKENIZER_KEY, "clip_bpe")
    if stored != tokenizer_kind:
        raise CheckpointError(
            f"{path} was made for the {stored!r} tokenizer but the config says {tokenizer_kind!r}; "
            "pass the config that came with the checkpoint (--config)"
        )
    if stored != "words":
        return None
    try:
        vocab = json.loads(meta[VOCAB_KEY])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path} has no readable word vocabulary ({VOCAB_KEY} metadata); re-export it with tools/train.py") from None
    return vocab
