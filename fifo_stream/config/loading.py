"""Loading a run configuration: YAML files chained by ``defaults:``, ``key=value`` overrides,
and the one check of every option (:func:`validate`), failing with one line."""

from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import FifoStreamError
from ..models.vae import spatial_factor
from .schema import Config, field_type, rules, section_at

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"  # the embedded model, fifo_stream/assets/tiny-shapes.safetensors
CONFIG_ENV = "FIFO_STREAM_CONFIG"  # overrides DEFAULT_CONFIG for commands run without --config


class ConfigError(FifoStreamError):
    pass


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A config file from a path, or a shipped config's name (``tiny-random`` -> configs/tiny-random.yaml)."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config not found: {name} (give a YAML path or one of: {', '.join(config_names())})")


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """(file, content) of a config and its ``defaults:`` parents, the furthest parent first."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'defaults'")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)  # YAML syntax errors know the line
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"cannot read config {path}{at}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}; fix the YAML") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a YAML mapping")
    parent = cfg.pop("defaults", None)
    if parent is None:
        return [(path, cfg)]
    beside = path.parent / parent  # a parent next to the file, else a path or a shipped config's name
    return _read_chain(beside if beside.is_file() else resolve_config_path(parent), seen + (path.resolve(),)) + [(path, cfg)]


def default_config() -> str:
    """The config used without ``--config``: $FIFO_STREAM_CONFIG, else the embedded model's."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_config(name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a config (default: :func:`default_config`), apply ``key=value`` dotlist overrides, and validate it."""
    chain = _read_chain(resolve_config_path(name or default_config()))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: write overrides as key=value, e.g. sampling.partitions=2")
    cfg = OmegaConf.structured(Config)
    for source, part in (*chain, (None, OmegaConf.from_dotlist(list(overrides)))):
        try:
            _check_bools(part, Config)
            cfg = _merge(cfg, part)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {source}: fix it there)" if source is not None else str(e)) from None
    if not cfg.consistency.enabled:
        cfg.consistency.qcache.enabled = cfg.consistency.refbank.enabled = cfg.consistency.anchor.enabled = False
        cfg.consistency.shared_noise = 0.0
        cfg.sampling.tail_noise = "iid"
    validate(cfg)
    return cfg


def _merge(cfg: DictConfig, part: DictConfig) -> DictConfig:
    """``part`` merged over ``cfg``, schema errors as one-line :class:`ConfigError`."""
    try:
        return OmegaConf.merge(cfg, part)
    except ConfigKeyError as e:
        parent, _, _ = (e.full_key or "").rpartition(".")
        valid = ", ".join(f.name for f in fields(section_at(parent)))
        raise ConfigError(f"unknown config key '{e.full_key}' (valid keys{' in ' + parent if parent else ''}: {valid})") from None
    except ValidationError as e:
        raise ConfigError(_type_error(e)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config value: {str(e).splitlines()[0]}") from None


def _type_error(e: ValidationError) -> str:
    """The one-line message for a value of the wrong type, with the option's rule."""
    key = e.full_key or "?"
    parent, _, name = key.rpartition(".")
    spec = next((f for f in fields(section_at(parent)) if f.name == name), None)
    if spec is None:
        return f"bad config value for {key}: {str(e).splitlines()[0]}"
    kind = str(spec.type).removeprefix("Optional[").removesuffix("]")
    kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, kind)
    rule = spec.metadata.get("rule")
    return f"config {key}={getattr(e, 'value', None)!r} is invalid: it must be {rule.need if rule else kind}"


def _check_bools(part: DictConfig, section: type, prefix: str = "") -> None:
    """Refuse 1, 'yes' and the like for true/false options (OmegaConf would convert them)."""
    for f in fields(section):
        if f.name not in part:
            continue
        kind = field_type(f)
        value = part[f.name]
        if is_dataclass(kind) and isinstance(value, DictConfig):
            _check_bools(value, kind, f"{prefix}{f.name}.")
        elif f.type == "bool" and not isinstance(value, bool):
            _fail(f"{prefix}{f.name}", value, "true or false")


def _fail(key: str, value: Any, need: str) -> None:
    raise ConfigError(f"config {key}={value!r} is invalid: it must be {need}")


def validate(cfg: DictConfig) -> None:
    """Check every option's rule, then the rules that tie several options together."""
    for key, rule in rules():
        value = OmegaConf.select(cfg, key)
        if not rule.test(value):
            _fail(key, value, rule.need)
    if cfg.model.vae.type == "pixel_shuffle" and cfg.model.vae.factor is None:
        _fail("model.vae.factor", None, "a positive integer for a pixel_shuffle VAE (pixels per latent cell along each side)")
    if cfg.consistency.refbank.mode == "replace" and cfg.consistency.refbank.weight != 1:
        raise ConfigError("config consistency.refbank.weight only acts in concat mode (in replace mode the reference is the only key set); set it to 1")
    if cfg.runtime.cuda_graphs and not cfg.runtime.compile:
        raise ConfigError("config runtime.cuda_graphs=true needs runtime.compile=true (CUDA graphs replay the compiled U-Net)")
    factor = spatial_factor(cfg.model.vae) * 2 ** (len(cfg.model.unet.channel_mult) - 1)
    for key in ("video.height", "video.width"):
        value = OmegaConf.select(cfg, key)
        if not (value > 0 and value % factor == 0):
            _fail(key, value, f"a positive multiple of {factor} (the model's total downsampling)")
