"""Synthetic checkpoints in the real VideoCrafter2 key layout, built from small configs."""

import torch

from conftest import load_fixture
from fifo_stream.config import load_config
from fifo_stream.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, extract, load_weights, read_state_dict
from fifo_stream.models.loading import load_model
from fifo_stream.models.unet import UNet3D


FULL_SIZE = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024, use_linear=True,
    use_checkpoint=True, temporal_conv=True, temporal_attention=True, temporal_selfatt_only=True,
    use_relative_position=False, use_causal_attention=False, temporal_length=16, addition_attention=True,
    fps_cond=True,
)


def fixture_unet(tmp_path):
    fx = load_fixture("videocrafter_unet_oracle.pt")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": fx["state_dict"]}, path)
    unet = UNet3D(**fx["config"]).eval()
    load_weights(unet, extract(read_state_dict(path), UNET_PREFIX), "U-Net")
    return unet, fx


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
