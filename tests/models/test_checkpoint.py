"""Checkpoint layouts, safetensors, conversion, and refusal of unsafe pickles."""

import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from fifo_stream.models.checkpoint import VAE_PREFIX, CheckpointError, read_state_dict
from fifo_stream.cli import main
from fifo_stream.models.loading import load_model
from synthetic import checkpoint_config, synthetic_state_dict


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_state_dict()


def write_layout(state, path, layout):
    if layout == "state_dict":
        torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, path)
    elif layout == "module":
        torch.save({"module": {"_forward_module." + k: v for k, v in state.items()}}, path)
    elif layout == "flat":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)


@pytest.mark.parametrize("layout", ["state_dict", "module", "flat", "safetensors"])
def test_layouts_load_and_run_end_to_end(synthetic, tmp_path, layout):
    path = tmp_path / ("model.safetensors" if layout == "safetensors" else "model.ckpt")
    write_layout(synthetic, path, layout)
    assert set(read_state_dict(path)) == set(synthetic)
    model = load_model(checkpoint_config(path))
    for name, value in model.unet.state_dict().items():
        assert torch.equal(value, synthetic["model.diffusion_model." + name])
    assert torch.equal(model.text_encoder.tower.token_embedding.weight, synthetic["cond_stage_model.model.token_embedding.weight"])
    assert torch.equal(model.vae.encoder.conv_in.weight, synthetic[VAE_PREFIX + "encoder.conv_in.weight"])

    cond = model.encode_text(["a red circle moves left"])
    assert cond.shape == (1, 77, checkpoint_config().model.unet.context_dim)
    f = model.frames_per_window
    x = torch.randn(1, 4, f, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = model.unet(x, torch.full((1, f), 500), cond, 8)
    frames = model.decode(eps[:, :, :2])
    assert frames.shape == (1, 2, 64, 96, 3) and frames.dtype == torch.uint8
    assert frames.float().std() > 0


def test_stored_dtypes_are_read_per_tensor(synthetic, tmp_path):
    mixed = {k: (v.half() if i % 2 and v.is_floating_point() else v) for i, (k, v) in enumerate(synthetic.items())}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": mixed}, path)
    loaded = read_state_dict(path)
    assert {k: v.dtype for k, v in loaded.items()} == {k: v.dtype for k, v in mixed.items()}
    model = load_model(checkpoint_config(path))
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())


def test_convert_to_safetensors(synthetic, tmp_path):
    src, dst = tmp_path / "model.ckpt", tmp_path / "model.safetensors"
    torch.save({"state_dict": synthetic}, src)
    assert main(["convert", str(src), str(dst), "--dtype", "fp16"]) == 0
    out = load_file(str(dst))
    assert set(out) == set(synthetic)
    assert all(v.dtype == torch.float16 for v in out.values() if v.is_floating_point())
    model = load_model(checkpoint_config(dst))
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.unet.out[2].weight, synthetic[key].half().float())


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


@pytest.mark.parametrize("how", ["torch_zip", "plain_pickle"])
def test_code_executing_pickle_is_refused(tmp_path, monkeypatch, how):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "x": Exploit()}
    if how == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_lightning_objects_need_explicit_trust(synthetic, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": synthetic, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_state_dict(path)
    assert set(read_state_dict(path, trust=True)) == set(synthetic)


@pytest.mark.parametrize(
    "content, match",
    [(None, "not found"), (b"this is not a checkpoint at all", "not a PyTorch checkpoint"), (b"", "not a PyTorch checkpoint")],
)
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_other_architecture_is_refused_with_counts(synthetic, tmp_path):
    # An SD 1.5-style U-Net: no temporal layers, conv projections, 768-wide context.
    sd15 = {k: v for k, v in synthetic.items() if "temopral_conv" not in k and "init_attn" not in k and ".2." not in k}
    sd15["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": sd15}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint_config(path))
    msg = str(err.value)
    assert "\n" not in msg and "missing" in msg and "shape mismatches" in msg and "U-Net" in msg
