"""Run configuration: omegaconf YAML files with ``key=value`` overrides, validated up front.

``configs/videocrafter2.yaml`` is the schema: every other config names a parent
with ``defaults:`` and may only set keys that exist there.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import FifoStreamError
from .vae import spatial_factor

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
SCHEMA = CONFIG_DIR / "videocrafter2.yaml"
DEFAULT_CONFIG = "tiny"  # the embedded model, models/tiny-shapes.safetensors
CONFIG_ENV = "FIFO_STREAM_CONFIG"  # overrides DEFAULT_CONFIG for commands run without --config


class ConfigError(FifoStreamError):
    pass


def resolve_config_path(name: str | Path) -> Path:
    """A config file from a path, or a name in ``configs/`` (``tiny-random`` -> configs/tiny-random.yaml)."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config not found: {name} (give a YAML path or one of: {names})")


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'defaults'")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a YAML mapping")
    parent = cfg.pop("defaults", None)
    if parent is None:
        return [cfg]
    return _read_chain((path.parent / parent) if not Path(parent).is_absolute() else Path(parent), seen + (path.resolve(),)) + [cfg]


def default_config() -> str:
    """The config used without ``--config``: $FIFO_STREAM_CONFIG, else the embedded model's."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_config(name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a config (default: :func:`default_config`), apply ``key=value`` dotlist overrides, and validate it."""
    chain = _read_chain(resolve_config_path(name or default_config()))
    schema = OmegaConf.load(SCHEMA)
    OmegaConf.set_struct(schema, True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: write overrides as key=value, e.g. sampling.partitions=2")
    try:
        cfg = OmegaConf.merge(schema, *chain, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        if key:
            raise ConfigError(f"unknown config key '{key}' (valid keys are those in {SCHEMA.relative_to(PROJECT_ROOT)})") from None
        raise ConfigError(f"bad config value: {str(e).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, False)
    validate(cfg)
    return cfg


def _check(cfg: DictConfig, key: str, kind, test=lambda v: True, need: str = "") -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok or not test(value):
        what = need or {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))
        raise ConfigError(f"config {key}={value!r} is invalid: it must be {what}")


def validate(cfg: DictConfig) -> None:
    """Refuse settings that cannot run, naming the key and what it must be."""
    positive = lambda v: v > 0  # noqa: E731
    _check(cfg, "model.weights", str, lambda v: v in ("checkpoint", "random"), "'checkpoint' or 'random'")
    _check(cfg, "model.vae.type", str, lambda v: v in ("autoencoder_kl", "pixel_shuffle"), "autoencoder_kl or pixel_shuffle")
    if cfg.model.vae.type == "pixel_shuffle":
        _check(cfg, "model.vae.factor", int, positive, "a positive integer (pixels per latent cell along each side)")
    _check(cfg, "model.vae.upscale", int, positive, "a positive integer (output pixels per decoded pixel)")
    _check(cfg, "model.text_encoder.tokenizer", str, lambda v: v in ("clip_bpe", "words"), "clip_bpe or words")
    _check(cfg, "model.unet.temporal_length", int, lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (frames per window)")
    _check(cfg, "sampling.partitions", int, lambda v: v >= 1, "an integer >= 1")
    _check(cfg, "sampling.lookahead", bool)
    _check(cfg, "sampling.guidance_scale", (int, float), need="a number")
    _check(cfg, "sampling.eta", (int, float), lambda v: v >= 0, "a number >= 0")
    if cfg.sampling.clip_x0 is not None:
        _check(cfg, "sampling.clip_x0", (int, float), positive, "a positive number or null")
    _check(cfg, "sampling.discard_warmup", bool)
    _check(cfg, "sampling.mode", str, lambda v: v in ("batched", "sequential"), "'batched' or 'sequential'")
    _check(cfg, "sampling.vae_batch", int, positive, "a positive integer")
    if cfg.sampling.max_batch is not None:
        _check(cfg, "sampling.max_batch", int, positive, "a positive integer or null")
    noises = ("iid", "mixed", "progressive", "coherent", "dependency")
    _check(cfg, "sampling.tail_noise", str, lambda v: v in noises, "iid, mixed, progressive, coherent or dependency")
    _check(cfg, "sampling.noise_alpha", (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "sampling.noise_cutoff", (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "sampling.noise_candidates", int, lambda v: v >= 1, "an integer >= 1")
    _check(cfg, "storyboard.transition", int, lambda v: v >= 0, "an integer >= 0 (frames)")
    if not isinstance(cfg.storyboard.prompts, ListConfig):
        raise ConfigError("config storyboard.prompts is invalid: it must be a list of 'N: text' entries")
    _check(cfg, "consistency.qcache.enabled", bool)
    _check(cfg, "consistency.qcache.strength", (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]")
    if cfg.consistency.qcache.strength_min is not None:
        _check(cfg, "consistency.qcache.strength_min", (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1] or null")
    _check(cfg, "consistency.refbank.enabled", bool)
    _check(cfg, "consistency.refbank.mode", str, lambda v: v in ("concat", "replace"), "concat or replace")
    _check(cfg, "consistency.refbank.weight", (int, float), positive, "a number > 0")
    if cfg.consistency.refbank.mode == "replace" and cfg.consistency.refbank.weight != 1:
        raise ConfigError("config consistency.refbank.weight only acts in concat mode (in replace mode the reference is the only key set); set it to 1")
    _check(cfg, "consistency.refbank.momentum", (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "consistency.refbank.reference", int, lambda v: v >= 0, "an emitted frame number >= 0")
    _check(cfg, "consistency.refbank.dtype", str, lambda v: v in ("fp16", "bf16", "fp32"), "fp16, bf16 or fp32")
    layers = cfg.consistency.refbank.layers
    if not (isinstance(layers, str) or (isinstance(layers, ListConfig) and all(isinstance(v, str) for v in layers))):
        raise ConfigError(f"config consistency.refbank.layers={layers!r} is invalid: it must be decoder, encoder, middle, all or a list of layer paths")
    _check(cfg, "video.fps", int, positive, "a positive integer")
    _check(cfg, "output.crf", int, lambda v: 0 <= v <= 63, "an integer from 0 to 63")
    _check(cfg, "output.preset", str)
    if cfg.output.codec is not None:
        _check(cfg, "output.codec", str)
    factor = spatial_factor(cfg.model.vae) * 2 ** (len(cfg.model.unet.channel_mult) - 1)
    for key in ("video.height", "video.width"):
        _check(cfg, key, int, lambda v: v > 0 and v % factor == 0, f"a positive multiple of {factor} (the model's total downsampling)")
    _check(cfg, "runtime.dtype", str, lambda v: v in ("auto", "fp32", "fp16", "bf16"), "auto, fp32, fp16 or bf16")
    _check(cfg, "runtime.device", str)
    for key in ("compile", "cuda_graphs", "channels_last", "overlap_decode"):
        _check(cfg, f"runtime.{key}", bool)
    if cfg.runtime.cuda_graphs and not cfg.runtime.compile:
        raise ConfigError("config runtime.cuda_graphs=true needs runtime.compile=true (CUDA graphs replay the compiled U-Net)")
