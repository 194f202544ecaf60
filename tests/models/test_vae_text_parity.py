"""The VAE and the text side (tokenizer, OpenCLIP tower) against the original implementations."""

import hashlib
import json
import socket
from importlib import resources

import pytest
import torch
from conftest import checkpoint_key_shapes, load_fixture

from fifo_stream.config import ConfigError, load_config
from fifo_stream.models.checkpoint import TEXT_PREFIX, VAE_PREFIX, extract, load_weights, read_state_dict
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.text_encoder import OpenCLIPTextTower, TextEncoder
from fifo_stream.models.tokenizer import ClipTokenizer
from fifo_stream.models.vae import (
    VIDEOCRAFTER2_VAE,
    build_vae,
    convert_vae_state_dict,
    decode_latents,
    encode_frames,
    ldm_vae_state_dict,
    load_vae_weights,
    to_uint8,
)

_TOWER_SHAPE_KEYS = ("vocab_size", "width", "heads", "layers", "context_length")


@pytest.fixture(scope="module")
def tokenizer_oracle() -> dict:
    return json.loads(load_fixture("tokenizer_oracle.json").read_text(encoding="utf-8"))


def test_vocab_file_matches_reference(tokenizer_oracle):
    data = (resources.files("fifo_stream") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == tokenizer_oracle["bpe_sha256"]


def test_tokenizer_matches_open_clip(tokenizer_oracle):
    tok = ClipTokenizer(context_length=tokenizer_oracle["context_length"])
    assert tok.sot_token_id == tokenizer_oracle["sot"] and tok.eot_token_id == tokenizer_oracle["eot"]
    cases = tokenizer_oracle["cases"]
    assert len(cases) >= 40
    with pytest.warns(UserWarning):  # the fixture holds over-long prompts
        batch = tok([c["prompt"] for c in cases])
    assert batch.dtype == torch.long and batch.shape == (len(cases), tok.context_length)
    for row, case in zip(batch.tolist(), cases):
        assert row == case["tokens"], case["prompt"]
    assert tok(cases[0]["prompt"]).tolist() == [cases[0]["tokens"]]


def test_tokenizer_truncation_warns():
    tok = ClipTokenizer()
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok("cat " * 200)
    assert ids.shape == (1, 77) and ids[0, -1].item() == tok.eot_token_id and (ids != 0).all()


def test_text_tower_matches_open_clip(tmp_path):
    fx = load_fixture("text_oracle.pt")
    cfg = {k: fx["text_cfg"][k] for k in _TOWER_SHAPE_KEYS}
    tower = OpenCLIPTextTower(**cfg, embed_dim=fx["embed_dim"], layer=fx["layer"]).eval()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": fx["state_dict"]}, path)
    load_weights(tower, extract(read_state_dict(path), TEXT_PREFIX), "text encoder")
    with torch.no_grad():
        out = tower(fx["tokens"])
    assert out.shape == fx["output"].shape
    assert (out - fx["output"]).abs().max().item() <= 1e-4


def test_full_size_tower_has_checkpoint_layout():
    expected = {k.removeprefix(TEXT_PREFIX): s for k, s in checkpoint_key_shapes().items() if k.startswith(TEXT_PREFIX)}
    with torch.device("meta"):
        tower = OpenCLIPTextTower()
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == expected


def test_text_encoder_encodes_prompts():
    enc = TextEncoder(OpenCLIPTextTower(width=32, heads=2, layers=2, embed_dim=16)).eval()
    prompts = ["a photo of a cat", ""]
    out = enc.encode(prompts)
    with torch.no_grad():
        ref = enc.tower(ClipTokenizer()(prompts))
    assert out.shape == (2, 77, 32) and torch.equal(out, ref)
    with pytest.raises(ConfigError, match="unknown config key 'model.text_encoder.depth'"):
        load_config("tiny-random", ["model.text_encoder.depth=3"])


@pytest.fixture(scope="module")
def vae_oracle() -> dict:
    return load_fixture("vae_oracle.pt")


def _fixture_cfg(vae_oracle: dict) -> dict:
    return {**vae_oracle["ddconfig"], "embed_dim": vae_oracle["embed_dim"]}


@pytest.fixture(scope="module")
def fixture_vae(vae_oracle, tmp_path_factory):
    """The fixture VAE, loaded through the user-facing checkpoint path."""
    path = tmp_path_factory.mktemp("vae") / "model.ckpt"
    torch.save({"state_dict": vae_oracle["state_dict"]}, path)
    vae = build_vae(_fixture_cfg(vae_oracle))
    load_vae_weights(vae, extract(read_state_dict(path), VAE_PREFIX))
    return vae


def test_decode_matches_ldm(fixture_vae, vae_oracle):
    z = vae_oracle["z"]  # (n, c, h, w), already divided by the scale factor
    frames = decode_latents(fixture_vae, z[None].transpose(1, 2), scale_factor=1.0, clamp=False)
    assert frames.dtype == torch.float32
    assert (frames[0] - vae_oracle["decoded"]).abs().max() <= 1e-4


def test_encode_matches_ldm(fixture_vae, vae_oracle):
    assert (encode_frames(fixture_vae, vae_oracle["x"], scale_factor=1.0) - vae_oracle["posterior_mean"]).abs().max() <= 1e-4
    with torch.no_grad():
        logvar = fixture_vae.encode(vae_oracle["x"]).latent_dist.logvar
    assert (logvar - vae_oracle["posterior_logvar"]).abs().max() <= 1e-4


def test_trained_vaes_are_saved_in_the_ldm_layout(fixture_vae, vae_oracle):
    """ldm_vae_state_dict inverts the loader's renaming: the fixture's own LDM names and tensors come back."""
    exported = ldm_vae_state_dict(fixture_vae)
    original = extract(vae_oracle["state_dict"], VAE_PREFIX)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_decode_chunking_and_clamp(fixture_vae, vae_oracle):
    _, c, h, w = vae_oracle["z"].shape
    z = torch.randn(1, c, 5, h, w)
    one = decode_latents(fixture_vae, z, batch_size=1)
    three = decode_latents(fixture_vae, z, batch_size=3)
    assert one.shape == (1, 5, *vae_oracle["decoded"].shape[1:])
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
def test_wrong_state_dict_is_one_line_error(vae_oracle, damage):
    state = extract(vae_oracle["state_dict"], VAE_PREFIX)
    if damage == "missing":
        del state["decoder.conv_out.bias"]
    elif damage == "missing_upsample_bias":
        del state["decoder.up.1.upsample.conv.bias"]
    elif damage == "shape":
        state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:, :2]
    else:
        state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(FifoStreamError) as err:
        load_vae_weights(build_vae(_fixture_cfg(vae_oracle)), state)
    message = str(err.value)
    assert "\n" not in message and "VAE" in message


@pytest.mark.parametrize("change", [{"embed_dim": 8}, {"attn_resolutions": [16]}, {"double_z": False}])
def test_unsupported_config_is_rejected(change):
    with pytest.raises(FifoStreamError):
        build_vae({**VIDEOCRAFTER2_VAE, **change})
