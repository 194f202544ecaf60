"""tools/train.py: its training noise and clips, and that an interrupted run resumes to the same weights."""

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import train  # noqa: E402
import train_vae  # noqa: E402

from fifo_stream.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402

SHAPE = (256, 12, 8, 16, 16)


def noise(*flags, shared=4):
    flags = ["--offset-noise", "0", "--coarse-noise", "0", *flags]
    return train.training_noise(SHAPE, train.parse_args(list(flags)), torch.Generator().manual_seed(0), "cpu", shared)


def test_plain_training_noise_is_white():
    assert torch.equal(noise(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))


def test_offset_noise_is_shared_by_a_clips_frames_and_pixels_on_top_of_unit_white_noise():
    offset = noise("--offset-noise", "0.5") - noise()  # the white part is left as the sampler injects it
    per_channel = offset.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-6)
    means = per_channel[..., 0]  # (clip, channel)
    assert means.std().item() == pytest.approx(0.5, rel=0.1)
    # the 4 sub-pixel channels of one RGB channel share its offset; different colors do not
    assert torch.allclose(means[:, 0], means[:, 3], atol=1e-6)
    assert abs(torch.corrcoef(torch.stack([means[:, 0], means[:, 4]]))[0, 1]) < 0.2
    own = (noise("--offset-noise", "0.5", shared=1) - noise(shared=1))[:, :, 0, 0, 0]  # a learned latent: every channel its own
    assert max(abs(torch.corrcoef(own[:, i : i + 2].T)[0, 1]) for i in range(11)) < 0.2


def test_coarse_noise_is_smooth_and_on_top_of_unit_white_noise():
    field = noise("--coarse-noise", "0.5") - noise()
    assert torch.allclose(field, field[:, :, :1].expand_as(field), atol=1e-6)  # shared by a clip's frames
    assert field.pow(2).mean().item() == pytest.approx(0.25, rel=1e-3)  # weight 0.5 on a unit mean-square field
    frame = field[:, :, 0]
    assert ((frame[..., 1:] * frame[..., :-1]).mean() / frame.pow(2).mean()) > 0.8  # neighbouring cells: (nearly) the same field
    white = noise()[:, :, 0]
    assert abs((white[..., 1:] * white[..., :-1]).mean() / white.var()) < 0.05


def test_short_clip_steps_spend_the_same_frames_on_more_scenes():
    cfg = load_config("tiny")
    codec = train.build_vae(dict(cfg.model.vae))
    args = train.parse_args([])
    shapes = [train.clip_shape(cfg, step, args) for step in range(64)]
    assert set(shapes) == {(4, 8), (32, 1)}
    assert 16 <= shapes.count((32, 1)) <= 48
    assert {train.clip_shape(cfg, step, train.parse_args(["--short-fraction", "0"])) for step in range(64)} == {(4, 8)}
    step = shapes.index((32, 1))
    x0, captions, weights = train.batch(cfg, codec, step, args, "cpu")
    assert x0.shape == (32, 4, 1, 8, 8) and len(captions) == 32
    assert len({tuple(x0[i].flatten().tolist()) for i in range(32)}) == 32  # 32 different scenes
    assert weights.shape == (32, 1, 1, 8, 8) and torch.all(weights == 1)  # unweighted by default
    x0_weighted, _, weights = train.batch(cfg, codec, step, train.parse_args(["--object-weight", "5"]), "cpu")
    assert torch.equal(x0_weighted, x0) and weights.min() == 1 and weights.max() == 5  # background 1, cells inside an object 5
    assert 0.05 < ((weights > 1).float().mean()) < 0.5
    v2 = ["--open-identity", "--object-weight", "4"]
    _, _, objects = train.batch(cfg, codec, step, train.parse_args(v2), "cpu")
    _, _, hats = train.batch(cfg, codec, step, train.parse_args([*v2, "--hat-weight", "12"]), "cpu")
    assert torch.all(hats >= objects) and hats.max() > objects.max()  # hat cells weigh more, no cell less
    assert 0 < (hats > objects).float().mean() < (objects > 1).float().mean()  # the hats are part of the objects
    t = train.timesteps(cfg, step, args, 32, 1, "cpu")
    assert t.shape == (32, 1)


def test_the_noise_level_weight_is_v_predictions_capped_and_one_by_default():
    a = train.alphas_cumprod(1000, 0.00085, 0.012).float()[train.fifo_timesteps(16, 1000)]
    assert torch.equal(train.noise_level_weight(a, 1.0), torch.ones_like(a))  # the default: the plain eps loss
    w = train.noise_level_weight(a, 20.0)
    assert torch.allclose(w[:12], 1 / a[:12])  # 1 + 1/SNR below the cap (1.0 at t=0, 15.6 at t=733)
    assert torch.all(w[12:] == 20.0) and (1 / a[-1]) > 200  # capped where 1/alpha_bar climbs to 215
    assert torch.all(w[1:] >= w[:-1])  # noisier frames never weigh less


def test_a_short_clip_length_outside_the_model_window_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--short-frames must be between 1 and the model's 8 frames"):
        train.main(["--short-frames", "9", "--state", str(tmp_path / "state.pt"), "--vae-state", str(tmp_path / "vae.pt")])
    assert not (tmp_path / "vae.pt").exists()  # refused before any training


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    def run(name, steps):
        train.main(["--steps", str(steps), "--batch", "1", "--save-every", "1", "--offset-noise", "0.5",
                    "--state", str(tmp_path / name / "state.pt"), "--log", str(tmp_path / name / "log.jsonl"),
                    "--out", str(tmp_path / name / "model.safetensors"),
                    "--vae-steps", "2", "--vae-batch", "2", "--vae-state", str(tmp_path / name / "vae.pt")])
        return load_file(tmp_path / name / "model.safetensors")

    straight = run("straight", 2)
    run("resumed", 1)
    resumed = run("resumed", 2)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(k.startswith(VAE_PREFIX) for k in straight)  # the trained first stage ships with the model
    model = load_model(load_config("tiny"), tmp_path / "straight" / "model.safetensors")  # the export loads as a model
    assert model.text_encoder.tokenizer(["a red circle"]).shape[0] == 1


def test_an_interrupted_first_stage_resumes_to_the_same_weights(tmp_path):
    def run(name, steps):
        train_vae.main(["--vae-steps", str(steps), "--vae-batch", "2", "--vae-state", str(tmp_path / name)])
        return torch.load(tmp_path / name, weights_only=True)["vae"]

    straight = run("straight.pt", 3)
    run("resumed.pt", 1)
    resumed = run("resumed.pt", 3)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not torch.equal(straight["encoder.conv_in.weight"], run("short.pt", 1)["encoder.conv_in.weight"])  # it trains


def test_train_only_trains_the_matching_parameters_and_freezes_the_rest(tmp_path):
    init = Path(train.__file__).resolve().parents[1] / "fifo_stream" / "assets" / "tiny-shapes.safetensors"

    def run(pattern, name):
        train.main(["--init", str(init), "--train-only", pattern, "--steps", "1", "--batch", "1", "--vae-steps", "0",
                    "--vae-state", str(tmp_path / name / "vae.pt"), "--state", str(tmp_path / name / "state.pt"),
                    "--log", str(tmp_path / name / "log.jsonl"), "--out", str(tmp_path / name / "model.safetensors")])
        return load_file(tmp_path / name / "model.safetensors")

    text_only, unet_only = r"^text\.", r"^unet\."
    before, after = load_file(init), run(text_only, "text")
    unet = [k for k in before if k.startswith(UNET_PREFIX)]
    assert unet and all(torch.equal(before[k], after[k]) for k in unet)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(TEXT_PREFIX))
    refused = f"state.pt was trained with --train-only {text_only!r}, not {unet_only!r}"
    with pytest.raises(SystemExit, match=re.escape(refused)):
        run(unet_only, "text")  # its optimizer state holds other parameters: resuming it is refused
    with pytest.raises(SystemExit, match="--train-only 'no-such-layer' matches no parameter"):
        run("no-such-layer", "none")
    with pytest.raises(SystemExit, match="--train-only '\\(' is not a regular expression"):
        run("(", "bad")
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()  # refused before anything is written
