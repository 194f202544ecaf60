import socket

import pytest
import torch
from conftest import checkpoint_key_shapes, load_fixture

from fifo_stream.checkpoint import VAE_PREFIX, extract, read_state_dict
from fifo_stream.errors import FifoStreamError
from fifo_stream.vae import (
    VIDEOCRAFTER2_VAE,
    build_vae,
    convert_vae_state_dict,
    decode_latents,
    encode_frames,
    load_vae_weights,
    to_uint8,
)


@pytest.fixture(scope="module")
def oracle() -> dict:
    return load_fixture("vae_oracle.pt")


def _fixture_cfg(oracle: dict) -> dict:
    return {**oracle["ddconfig"], "embed_dim": oracle["embed_dim"]}


@pytest.fixture(scope="module")
def fixture_vae(oracle, tmp_path_factory):
    """The fixture VAE, loaded through the user-facing checkpoint path."""
    path = tmp_path_factory.mktemp("vae") / "model.ckpt"
    torch.save({"state_dict": oracle["state_dict"]}, path)
    vae = build_vae(_fixture_cfg(oracle))
    load_vae_weights(vae, extract(read_state_dict(path), VAE_PREFIX))
    return vae


def test_decode_matches_ldm(fixture_vae, oracle):
    z = oracle["z"]  # (n, c, h, w), already divided by the scale factor
    frames = decode_latents(fixture_vae, z[None].transpose(1, 2), scale_factor=1.0, clamp=False)
    assert frames.dtype == torch.float32
    assert (frames[0] - oracle["decoded"]).abs().max() <= 1e-4


def test_encode_matches_ldm(fixture_vae, oracle):
    assert (encode_frames(fixture_vae, oracle["x"], scale_factor=1.0) - oracle["posterior_mean"]).abs().max() <= 1e-4
    with torch.no_grad():
        logvar = fixture_vae.encode(oracle["x"]).latent_dist.logvar
    assert (logvar - oracle["posterior_logvar"]).abs().max() <= 1e-4


def test_decode_chunking_and_clamp(fixture_vae, oracle):
    _, c, h, w = oracle["z"].shape
    z = torch.randn(1, c, 5, h, w)
    one = decode_latents(fixture_vae, z, batch_size=1)
    three = decode_latents(fixture_vae, z, batch_size=3)
    assert one.shape == (1, 5, *oracle["decoded"].shape[1:])
    assert (one - three).abs().max() <= 1e-5
    assert one.abs().max() <= 1.0


def test_to_uint8():
    frames = torch.tensor([-1.0, 1.0, -3.0, 3.0]).view(1, 1, 4).expand(2, 3, 1, 4)
    out = to_uint8(frames)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 4, 3)
    assert out[..., 0].flatten().tolist() == [0, 255, 0, 255] * 2


def test_full_size_checkpoint_layout_loads(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("building the VAE tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    shapes = {k[len(VAE_PREFIX):]: s for k, s in checkpoint_key_shapes().items() if k.startswith(VAE_PREFIX)}
    gen = torch.Generator().manual_seed(0)
    ldm_state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    vae = build_vae(VIDEOCRAFTER2_VAE)
    assert sum(p.numel() for p in vae.parameters()) == sum(v.numel() for v in ldm_state.values())

    converted = convert_vae_state_dict(vae, ldm_state)
    assert set(converted) == set(vae.state_dict())
    load_vae_weights(vae, ldm_state)
    own = vae.state_dict()
    assert all(torch.equal(own[k], v) for k, v in converted.items())
    # mid-block attention 1x1 convs become linears
    q = ldm_state["decoder.mid.attn_1.q.weight"]
    assert torch.equal(own["decoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])


@pytest.mark.parametrize("damage", ["missing", "missing_upsample_bias", "shape", "unknown"])
def test_wrong_state_dict_is_one_line_error(oracle, damage):
    state = extract(oracle["state_dict"], VAE_PREFIX)
    if damage == "missing":
        del state["decoder.conv_out.bias"]
    elif damage == "missing_upsample_bias":
        del state["decoder.up.1.upsample.conv.bias"]
    elif damage == "shape":
        state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:, :2]
    else:
        state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(FifoStreamError) as err:
        load_vae_weights(build_vae(_fixture_cfg(oracle)), state)
    message = str(err.value)
    assert "\n" not in message and "VAE" in message


@pytest.mark.parametrize("change", [{"embed_dim": 8}, {"attn_resolutions": [16]}, {"double_z": False}])
def test_unsupported_config_is_rejected(change):
    with pytest.raises(FifoStreamError):
        build_vae({**VIDEOCRAFTER2_VAE, **change})
