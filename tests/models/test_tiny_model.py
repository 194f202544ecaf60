"""The embedded default model: word tokenizer, pixel codec, checkpoint metadata, the shipped weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from fifo_stream import world
from fifo_stream.models.checkpoint import SHIPPED_MODELS, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointError, read_metadata, save_safetensors
from fifo_stream.config import DEFAULT_CONFIG, load_config
from fifo_stream.models.loading import TOKENIZER_KEY, VOCAB_KEY, load_model
from fifo_stream.pipeline import generate
from fifo_stream.sampling.ddim import ddim_step
from fifo_stream.models.text_encoder import OpenCLIPTextTower
from fifo_stream.models.tokenizer import TokenizerError, WordTokenizer
from fifo_stream.models.unet import UNet3D
from fifo_stream.models.vae import PixelShuffleCodec, build_vae, decode_latents, encode_frames, ldm_vae_state_dict, to_uint8

SHIPPED = SHIPPED_MODELS / "tiny-shapes.safetensors"
PROMPT = "a red circle moves right on a black background"


def test_word_tokenizer_ids_and_errors():
    tok = WordTokenizer(["a", "red", "circle"], context_length=6)
    assert tok(["A red, CIRCLE!", ""]).tolist() == [[1, 3, 4, 5, 2, 0], [1, 2, 0, 0, 0, 0]]
    with pytest.raises(TokenizerError, match="does not know the word.*'santa'.*it understands: a red circle"):
        tok("santa in a red circle")
    with pytest.raises(TokenizerError, match="at most 4"):
        tok("a red circle a red")


def test_pixel_shuffle_codec_is_lossless():
    codec = build_vae({"type": "pixel_shuffle", "factor": 4})
    assert isinstance(codec, PixelShuffleCodec)
    frames = torch.rand(3, 3, 32, 48) * 2 - 1
    z = encode_frames(codec, frames, scale_factor=1.0)
    assert z.shape == (3, 48, 8, 12)
    back = decode_latents(codec, z.transpose(0, 1)[None], scale_factor=1.0)  # video latents (1, c, t, h, w)
    assert torch.equal(back[0], frames)
    assert z[0, :3, 0, 0].tolist() == frames[0, 0, 0, :3].tolist()  # channel c*16 + dy*4 + dx holds pixel (dy, dx)


def test_upscale_averages_on_encode_and_repeats_on_decode():
    codec = build_vae({"type": "pixel_shuffle", "factor": 2, "upscale": 2})
    frames = torch.rand(2, 3, 16, 16) * 2 - 1
    z = encode_frames(codec, frames, scale_factor=1.0, upscale=2)
    assert z.shape == (2, 12, 4, 4)
    assert torch.allclose(z[0, 0, 0, 0], frames[0, 0, :2, :2].mean())
    back = decode_latents(codec, z.transpose(0, 1)[None], scale_factor=1.0, upscale=2)[0]
    assert back.shape == frames.shape
    assert torch.equal(back[:, :, ::2, ::2], back[:, :, 1::2, 1::2])  # each model pixel fills a 2x2 block
    assert torch.allclose(encode_frames(codec, back, scale_factor=1.0, upscale=2), z.clamp(-1, 1))  # decode is encode's right inverse


def _tiny_checkpoint(path, metadata):
    cfg = load_config("tiny")
    unet = UNet3D(**OmegaConf.to_container(cfg.model.unet))
    text_cfg = OmegaConf.to_container(cfg.model.text_encoder)
    text_cfg.pop("tokenizer")
    tower = OpenCLIPTextTower(**text_cfg)
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in tower.state_dict().items()})
    state.update({VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(build_vae(OmegaConf.to_container(cfg.model.vae))).items()})
    save_safetensors(state, path, torch.float16, metadata)
    return path


def test_checkpoint_metadata_selects_and_checks_the_tokenizer(tmp_path):
    words = {TOKENIZER_KEY: "words", VOCAB_KEY: json.dumps(list(world.VOCAB))}
    ckpt = _tiny_checkpoint(tmp_path / "m.safetensors", words)
    assert read_metadata(ckpt)[TOKENIZER_KEY] == "words"
    model = load_model(load_config("tiny"), ckpt)
    assert isinstance(model.text_encoder.tokenizer, WordTokenizer)
    assert model.text_encoder.encode([PROMPT]).shape == (1, 16, 64)
    assert model.spatial_factor == 8 and model.upscale == 2
    with pytest.raises(CheckpointError, match="made for the 'words' tokenizer but the config says 'clip_bpe'"):
        load_model(load_config("tiny", ["model.text_encoder.tokenizer=clip_bpe"]), ckpt)
    bare = _tiny_checkpoint(tmp_path / "bare.safetensors", None)
    with pytest.raises(CheckpointError, match="made for the 'clip_bpe' tokenizer but the config says 'words'"):
        load_model(load_config("tiny"), bare)
    no_vocab = _tiny_checkpoint(tmp_path / "novocab.safetensors", {TOKENIZER_KEY: "words"})
    with pytest.raises(CheckpointError, match="no readable word vocabulary"):
        load_model(load_config("tiny"), no_vocab)


def test_the_default_config_is_the_shipped_model():
    assert DEFAULT_CONFIG == "tiny"
    assert SHIPPED.stat().st_size <= 25 * 2**20
    assert (ROOT / "models" / "tiny-shapes.md").exists()


def test_the_anchors_palette_is_the_colors_the_model_was_trained_to_draw():
    assert [tuple(c) for c in load_config("tiny").consistency.anchor.palette] == list(world.COLORS.values())


@pytest.fixture(scope="module")
def shipped():
    cfg = load_config("tiny")
    return load_model(cfg), cfg


def test_shipped_model_generates_frames(shipped):
    """Smoke test: the shipped weights load through the default config and make 8 frames of the prompt."""
    model, cfg = shipped
    frames = list(generate(model, cfg, PROMPT, frames=8, seed=0, progress=False))
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])  # it moves
    shown = [world.classify_frame(f) for f in frames]
    assert shown.count(("red", "circle")) >= 7, shown  # one borderline frame may read otherwise on other CPUs


def test_first_command_uses_the_embedded_model(tmp_path):
    """Without --config, generate runs the embedded model, 30 s long unless told otherwise."""
    from fifo_stream.cli import parse_args

    assert parse_args(["generate", PROMPT, "--out", "x.mp4"]).seconds == 30.0
    env = {k: v for k, v in os.environ.items() if k != "FIFO_STREAM_CONFIG"}
    bad = subprocess.run(
        [sys.executable, "-m", "fifo_stream", "generate", "a dog", "--out", str(tmp_path / "x.mp4"), "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2 and "does not know the word(s) 'dog'" in bad.stderr and "Traceback" not in bad.stderr
    assert "it understands: a and moves" in bad.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
    ok = subprocess.run(  # a caption that leaves the body color open, as a third of the training captions do
        [sys.executable, "-m", "fifo_stream", "generate", "a circle moves right on a black background", "--frames", "2", "--out", str(tmp_path / "y.mp4"), "--run-dir", str(tmp_path / "r2"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert OmegaConf.load(tmp_path / "r2" / "config.yaml").model.name == "tiny-shapes"


def test_clip_x0_clamps_the_predicted_clean_sample():
    x, eps = torch.randn(2, 64) * 3, torch.randn(2, 64)
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.6)
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    direction = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    assert torch.allclose(ddim_step(x, eps, a_t, a_prev, clip_x0=1.0), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * direction, atol=1e-6)
    assert torch.allclose(ddim_step(x, eps, a_t, a_prev, clip_x0=1e6), ddim_step(x, eps, a_t, a_prev), atol=1e-5)
