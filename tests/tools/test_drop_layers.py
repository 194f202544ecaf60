"""tools/drop_layers.py: exported weights fitted to a U-Net with fewer layers."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import drop_layers  # noqa: E402

from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.checkpoint import UNET_PREFIX, VAE_PREFIX, extract, load_weights, read_metadata, read_state_dict, save_safetensors  # noqa: E402
from fifo_stream.models.unet import UNet3D  # noqa: E402

FEWER = ["model.unet.addition_attention=false", "model.unet.attention_resolutions=[]"]


def unet_of(overrides):
    return UNet3D(**OmegaConf.to_container(load_config("tiny-random", overrides).model.unet))


def test_the_pruned_file_loads_strictly_into_the_smaller_unet_with_the_old_weights(tmp_path):
    torch.manual_seed(0)
    old = unet_of([])
    state = {UNET_PREFIX + k: v for k, v in old.state_dict().items()}
    state[VAE_PREFIX + "decoder.conv_out.weight"] = torch.ones(3)
    save_safetensors(state, tmp_path / "old.safetensors", metadata={"fifo_stream.vocab": '["a"]'})

    drop_layers.main(["--config", "tiny-random", str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors"), *FEWER])

    new_state = read_state_dict(tmp_path / "new.safetensors")
    smaller = unet_of(FEWER)
    load_weights(smaller, extract(new_state, UNET_PREFIX), "U-Net")  # strict
    kept = smaller.state_dict()
    assert len(kept) < len(old.state_dict())  # init_attn and the attention layers went
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in kept.items())
    assert torch.equal(new_state[VAE_PREFIX + "decoder.conv_out.weight"], torch.ones(3))
    assert read_metadata(tmp_path / "new.safetensors") == {"fifo_stream.vocab": '["a"]'}


def test_an_architecture_that_needs_new_weights_is_refused_in_one_line(tmp_path):
    smaller = unet_of(FEWER)
    save_safetensors({UNET_PREFIX + k: v for k, v in smaller.state_dict().items()}, tmp_path / "small.safetensors")
    with pytest.raises(SystemExit, match="not a subset of the old one: .* only dropping layers is supported$"):
        drop_layers.main(["--config", "tiny-random", str(tmp_path / "small.safetensors"), str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()
