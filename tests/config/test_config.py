"""The typed schema: every option's constraint is checked once, at load, with one line naming the key."""

from dataclasses import fields

import pytest

from fifo_stream.config import CONFIG_DIR, ConfigError, load_config
from fifo_stream.config.schema import Config, rules

# One bad value per constrained option (and the rules that tie options together), with
# what the one-line message must say.
BAD = {
    "model.weights=cached": "model.weights='cached' is invalid: it must be checkpoint or random",
    "model.vae.type=vqgan": "autoencoder_kl or pixel_shuffle",
    "model.vae.type=pixel_shuffle": "model.vae.factor=None is invalid",
    "model.vae.factor=0": "model.vae.factor=0 is invalid: it must be a positive number or null",
    "model.vae.upscale=0": "output pixels per decoded pixel",
    "model.text_encoder.tokenizer=sentencepiece": "clip_bpe or words",
    "model.text_encoder.layer=first": "last or penultimate",
    "model.unet.temporal_length=7": "an even integer >= 2",
    "sampling.partitions=0": "sampling.partitions=0 is invalid: it must be an integer >= 1",
    "sampling.partitions=abc": "sampling.partitions='abc' is invalid: it must be an integer >= 1",
    "sampling.eta=-1": "sampling.eta=-1.0 is invalid: it must be a number >= 0",
    "sampling.clip_x0=0": "a positive number or null",
    "sampling.mode=parallel": "batched or sequential",
    "sampling.max_batch=0": "a positive integer or null",
    "sampling.vae_batch=0": "sampling.vae_batch=0",
    "sampling.tail_noise=pink": "iid, mixed, progressive, coherent or dependency",
    "sampling.noise_alpha=1.5": "sampling.noise_alpha=1.5 is invalid: it must be a number in [0, 1]",
    "sampling.noise_cutoff=-0.1": "sampling.noise_cutoff=-0.1",
    "sampling.noise_candidates=0": "sampling.noise_candidates=0 is invalid: it must be an integer >= 1",
    "sampling.lookahead=1": "sampling.lookahead=1 is invalid: it must be true or false",
    "storyboard.transition=-1": "storyboard.transition=-1 is invalid: it must be an integer (frames) >= 0",
    "storyboard.prompts=abc": "a list of 'N: text' entries",
    "consistency.qcache.strength=1.5": "consistency.qcache.strength=1.5",
    "consistency.qcache.strength_min=-0.5": "a number in [0, 1] or null",
    "consistency.refbank.mode=add": "concat or replace",
    "consistency.refbank.weight=0": "a number > 0",
    "consistency.refbank.momentum=2": "consistency.refbank.momentum=2.0",
    "consistency.refbank.reference=-1": "an emitted frame number >= 0",
    "consistency.refbank.dtype=fp64": "fp16, bf16 or fp32",
    "consistency.refbank.layers=[1, 2]": "a list of layer paths",
    "consistency.shared_noise=1.5": "consistency.shared_noise=1.5",
    "consistency.anchor.strength=2": "consistency.anchor.strength=2.0",
    "consistency.anchor.min_level=-1": "consistency.anchor.min_level=-1",
    "consistency.anchor.bands=0": "a positive integer",
    "consistency.anchor.mode=cells": "consistency.anchor.mode='cells'",
    "consistency.anchor.reference=-1": "consistency.anchor.reference=-1",
    "consistency.anchor.palette=[[255,0,256]]": "a list of [r, g, b] colors, each 0-255",
    "consistency.anchor.full_cover=0": "a number in (0, 1]",
    "video.fps=0": "video.fps=0 is invalid: it must be a positive integer",
    "video.width=100": "video.width=100 is invalid: it must be a positive multiple of 16",
    "output.crf=64": "an integer from 0 to 63",
    "output.hls_list_size=-1": "output.hls_list_size=-1 is invalid: it must be an integer >= 0",
    "output.hls_segment_seconds=0": "output.hls_segment_seconds=0.0 is invalid: it must be a number > 0",
    "runtime.dtype=fp8": "auto, fp32, fp16 or bf16",
    "runtime.compile=2": "true or false",
    "runtime.overlap_decode=sometimes": "runtime.overlap_decode='sometimes' is invalid: it must be true, false or auto",
}


@pytest.mark.parametrize("override", list(BAD))
def test_each_bad_value_is_refused_with_one_line(override):
    with pytest.raises(ConfigError) as info:
        load_config("tiny-random", [override])
    message = str(info.value)
    assert BAD[override] in message and "\n" not in message


def test_every_rule_is_exercised():
    """Adding a constrained option means adding its bad value above."""
    constrained = {key for key, _ in rules()}
    tested = {override.split("=")[0] for override in BAD}
    assert constrained <= tested


def test_rules_that_tie_options_together():
    with pytest.raises(ConfigError, match="only acts in concat"):
        load_config("tiny-random", ["consistency.refbank.mode=replace", "consistency.refbank.weight=2"])
    load_config("tiny-random", ["consistency.refbank.mode=replace"])
    with pytest.raises(ConfigError, match="needs runtime.compile=true"):
        load_config("tiny-random", ["runtime.cuda_graphs=true"])
    cfg = load_config("tiny-random", ["model.vae.type=pixel_shuffle", "model.vae.factor=8", "video.height=128", "video.width=64"])
    assert cfg.model.vae.factor == 8


def test_the_master_switch_turns_every_consistency_control_off():
    on = ["consistency.qcache.enabled=true", "consistency.refbank.enabled=true", "consistency.anchor.enabled=true", "consistency.shared_noise=0.5",
          "sampling.tail_noise=coherent"]
    cfg = load_config("tiny-random", on)
    assert cfg.consistency.enabled and cfg.consistency.qcache.enabled and cfg.consistency.refbank.enabled and cfg.sampling.tail_noise == "coherent"
    assert cfg.consistency.shared_noise == 0.5
    for overrides in (["consistency.enabled=false", *on], [*on, "consistency.enabled=false"]):  # whatever the order
        cfg = load_config("tiny-random", overrides)
        assert not (cfg.consistency.qcache.enabled or cfg.consistency.refbank.enabled) and cfg.sampling.tail_noise == "iid"
        assert cfg.consistency.shared_noise == 0.0 and not cfg.consistency.anchor.enabled


def test_unknown_keys_name_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling.partition' \(valid keys in sampling: partitions, lookahead"):
        load_config("tiny-random", ["sampling.partition=2"])
    with pytest.raises(ConfigError, match="unknown config key 'foo'.*model, video, output"):
        load_config("tiny-random", ["foo.bar=1"])


def test_types_come_from_the_schema(tmp_path):
    cfg = load_config("tiny-random", ["sampling.guidance_scale=7", "consistency.qcache.pairs={3: 1}"])
    assert cfg.sampling.guidance_scale == 7.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert dict(cfg.consistency.qcache.pairs) == {3: 1, 4: 1, 5: 1}  # merged into tiny-random's pairs, int keys
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: tiny-random.yaml\nsampling:\n  partitions: two\n")
    with pytest.raises(ConfigError, match="sampling.partitions='two'"):
        load_config(bad)


def test_the_schema_defaults_are_videocrafter2():
    cfg = load_config("videocrafter2")
    assert (cfg.model.unet.model_channels, cfg.model.unet.temporal_length, cfg.video.height, cfg.video.width) == (320, 16, 320, 512)
    assert (cfg.sampling.partitions, cfg.sampling.guidance_scale, cfg.sampling.eta) == (4, 12.0, 1.0)
    assert cfg.model.checkpoint == "model.ckpt"
    assert {f.name for f in fields(Config)} == {"model", "video", "output", "sampling", "storyboard", "consistency", "runtime"}


def test_shipped_configs_all_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert names == ["bench-anchor", "tiny", "tiny-random", "videocrafter2"]
    for name in names:
        load_config(name)
