"""Synthetic checkpoints in the real VideoCrafter2 key layout, built from small configs."""

import torch

from conftest import load_fixture
from fifo_stream.checkpoint import TEXT_PREFIX, UNET_PREFIX
from fifo_stream.config import load_config
from fifo_stream.model import load_model


def synthetic_state_dict() -> dict[str, torch.Tensor]:
    """A flat ``model.ckpt`` state dict for the tiny-random model: U-Net and text tower from its
    seeded random modules, the VAE in its LDM layout (from the VAE fixture, whose config
    tiny-random uses), and the schedule buffers a real checkpoint carries."""
    model = load_model(load_config("tiny-random"))
    state = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in model.text_encoder.tower.state_dict().items()})
    state.update({k: v for k, v in load_fixture("vae_oracle.pt")["state_dict"].items()})
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).float() ** 2
    state["alphas_cumprod"] = torch.cumprod(1 - state["betas"], 0)
    state["scale_arr"] = torch.ones(1400)
    return state


def checkpoint_config(path=None, overrides=()):
    overrides = ["model.weights=checkpoint", *overrides]
    if path is not None:
        overrides.append(f"model.checkpoint={path}")
    return load_config("tiny-random", overrides)
