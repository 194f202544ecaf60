"""Run configuration: a typed schema (the dataclasses below), YAML files and ``key=value`` overrides.

The schema is the one home of every option: its type, its default (VideoCrafter2 with the
FIFO-Diffusion defaults), what it means (the comment beside it) and its constraint (the
``rule`` of :func:`option`). :func:`load_config` checks everything once and fails with one
line; the code that uses an option does not check it again. A YAML config sets a subset of
the keys and may name a parent config with ``defaults:``; the shipped ones live in
``fifo_stream/configs/`` (``configs/`` in the repository).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import FifoStreamError
from .models.vae import spatial_factor

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny"  # the embedded model, fifo_stream/assets/tiny-shapes.safetensors
CONFIG_ENV = "FIFO_STREAM_CONFIG"  # overrides DEFAULT_CONFIG for commands run without --config


class ConfigError(FifoStreamError):
    pass


@dataclass(frozen=True)
class Rule:
    """A constraint on one option: ``test(value)`` must hold; the error says it must be ``need``."""

    test: Callable[[Any], bool]
    need: str


def option(default: Any = MISSING, rule: Rule | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field with an optional :class:`Rule` (``factory`` for list and dict defaults)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def one_of(*values: str) -> Rule:
    return Rule(lambda v: v in values, ", ".join(values[:-1]) + f" or {values[-1]}")


def at_least(low: float, what: str = "an integer") -> Rule:
    return Rule(lambda v: v >= low, f"{what} >= {low}")


def between(low: float, high: float) -> Rule:
    return Rule(lambda v: low <= v <= high, f"a number in [{low}, {high}]")


POSITIVE = Rule(lambda v: v > 0, "a positive integer")
POSITIVE_OR_NULL = Rule(lambda v: v is None or v > 0, "a positive number or null")
FRACTION = between(0, 1)


# -- model ---------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """VideoCrafter2's ``unet_config.params``: the upstream keys, with the same meaning."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list[int] = option(factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list[int] = option(factory=lambda: [1, 2, 4, 4])
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    use_checkpoint: bool = True  # upstream's gradient checkpointing flag (inference ignores it)
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_relative_position: bool = False
    use_causal_attention: bool = False
    temporal_length: int = option(16, Rule(lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (frames per window)"))
    addition_attention: bool = True
    fps_cond: bool = True


@dataclass
class VAEConfig:
    """The first stage: upstream ``first_stage_config`` ddconfig plus ``embed_dim``."""

    type: str = option("autoencoder_kl", one_of("autoencoder_kl", "pixel_shuffle"))  # pixel_shuffle: weightless space-to-depth (pixel-space models)
    factor: Optional[int] = option(None, POSITIVE_OR_NULL)  # pixel_shuffle: pixels per latent cell along each side
    upscale: int = option(1, Rule(lambda v: v > 0, "a positive integer (output pixels per decoded pixel)"))  # nearest upscaling of decoded frames
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = option(factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = option(factory=list)
    dropout: float = 0.0
    embed_dim: int = 4


@dataclass
class TextEncoderConfig:
    """OpenCLIP ViT-H-14 text tower, "penultimate" layer."""

    tokenizer: str = option("clip_bpe", one_of("clip_bpe", "words"))  # words: a word vocabulary stored in the checkpoint
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    embed_dim: int = 1024
    layer: str = option("penultimate", one_of("last", "penultimate"))


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    scale_factor: float = 0.18215  # latent scale of the first stage
    use_scale: bool = False  # upstream's scale_arr rescaling; the FIFO reference ignores it


@dataclass
class ModelConfig:
    name: str = "videocrafter2"
    weights: str = option("checkpoint", one_of("checkpoint", "random"))  # random: seeded random weights, for tests and benchmarks
    seed: int = 0  # seed of the random weights (weights: random)
    checkpoint: str = "model.ckpt"  # a path, or a file name looked up in the models directories (see models/README.md)
    unet: UNetConfig = option(factory=UNetConfig)
    vae: VAEConfig = option(factory=VAEConfig)
    text_encoder: TextEncoderConfig = option(factory=TextEncoderConfig)
    schedule: ScheduleConfig = option(factory=ScheduleConfig)


# -- what to make and how --------------------------------------------------------------


@dataclass
class VideoConfig:
    height: int = 320  # pixels; a multiple of the model's total downsampling
    width: int = 512
    fps: int = option(8, POSITIVE)  # also the fps conditioning of the U-Net


@dataclass
class OutputConfig:
    """File outputs (segments and joined files) and HLS playlists."""

    codec: Optional[str] = None  # null: libx264 for .mp4/.mkv/.m3u8, libvpx-vp9 for .webm
    crf: int = option(18, Rule(lambda v: 0 <= v <= 63, "an integer from 0 to 63"))
    preset: str = "veryfast"  # x264 preset
    hls_list_size: int = option(0, at_least(0))  # segments an HLS playlist lists (older ones are deleted); 0: all
    hls_segment_seconds: float = option(2.0, Rule(lambda v: v > 0, "a number > 0"))  # HLS segment length (one also ends at every checkpoint)


@dataclass
class SamplingConfig:
    partitions: int = option(4, at_least(1))  # n; steps S = n x frames per window
    lookahead: bool = True
    guidance_scale: float = 12.0
    eta: float = option(1.0, at_least(0, "a number"))
    clip_x0: Optional[float] = option(None, POSITIVE_OR_NULL)  # clamp each step's predicted clean latent to [-v, v] (pixel-space models: 1.0)
    negative_prompt: str = ""
    discard_warmup: bool = True  # drop the first S - f frames (copies of the base clip's first frame)
    mode: str = option("batched", one_of("batched", "sequential"))  # sequential: the reference's call pattern
    max_batch: Optional[int] = option(None, Rule(lambda v: v is None or v > 0, "a positive integer or null"))  # cap on samples per U-Net call (null: the whole tick in one call; on a CPU a smaller one can be faster: measure with tools/bench.py)
    vae_batch: int = option(1, POSITIVE)
    tail_noise: str = option("iid", one_of("iid", "mixed", "progressive", "coherent", "dependency"))  # iid (reference) | mixed, progressive (PYoCo) | coherent | dependency (ZS^2)
    noise_alpha: float = option(0.5, FRACTION)  # mixed/progressive/dependency: correlation between successive tail latents
    noise_cutoff: float = option(0.25, FRACTION)  # coherent: low-pass cutoff as a fraction of Nyquist
    noise_candidates: int = option(8, at_least(1))  # dependency: fresh-noise candidates in the random search stage


@dataclass
class StoryboardConfig:
    """The prompt schedule; on the command line: repeatable ``--prompt "N: text"``."""

    # used when no prompt is given on the command line, e.g.
    # ["a cat sleeps", "120: the cat wakes up", {frame: 240, prompt: the cat runs}]
    prompts: list[Any] = option(factory=list, rule=Rule(lambda v: isinstance(v, ListConfig), "a list of 'N: text' entries"))
    transition: int = option(0, at_least(0, "an integer (frames)"))  # frames over which the context blends into each next prompt


@dataclass
class QCacheConfig:
    """Encoder-to-decoder query cache in the temporal transformers."""

    enabled: bool = False
    strength: float = option(0.9, FRACTION)  # v at the highest noise level
    strength_min: Optional[float] = option(None, Rule(lambda v: v is None or 0 <= v <= 1, "a number in [0, 1] or null"))  # v at the lowest level (null: strength)
    pairs: Optional[dict[int, int]] = None  # {decoder output block: encoder input block}; null: the published pairing


def _layer_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, ListConfig) and all(isinstance(v, str) for v in value))


def _frame_or_path(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (isinstance(value, str) and value != "")


@dataclass
class RefBankConfig:
    """Reference key/value bank in the spatial self-attention (attn1)."""

    enabled: bool = False
    # decoder (appearance lives in the decoder's self-attention; half the memory of all) | encoder | middle | all,
    # or a list of layer paths (prefixes), e.g. [output_blocks.9, output_blocks.10]
    layers: Any = option("decoder", Rule(_layer_list, "decoder, encoder, middle, all or a list of layer paths"))
    mode: str = option("concat", one_of("concat", "replace"))  # concat: keys [K_self; K_ref] | replace: keys K_ref only
    weight: float = option(1.0, Rule(lambda v: v > 0, "a number > 0"))  # concat: log(weight) is added to the reference logits
    momentum: float = option(1.0, FRACTION)  # mu in bank_k <- mu bank_k + (1 - mu) K_new; 1: fixed reference, 0: the previous frame
    # the emitted frame whose keys/values are the reference, or an image's path (its K/V at every level are recorded first)
    reference: Any = option(0, Rule(_frame_or_path, "an emitted frame number >= 0 or an image path"))
    dtype: str = option("fp16", one_of("fp16", "bf16", "fp32"))  # storage


@dataclass
class AnchorConfig:
    """Subject appearance anchor: each step's predicted clean latents keep the reference frame's subject colors."""

    enabled: bool = False
    strength: float = option(1.0, FRACTION)  # how far the subject's band means move to the reference's (1: all the way)
    min_level: int = option(0, at_least(0, "an integer"))  # corrected noise levels: index >= this (0: all of them)
    bands: int = option(2, POSITIVE)  # horizontal bands of the subject whose colors are kept apart (e.g. a hat and a body)
    # the emitted frame number of the reference frame; start: the medoid frame of the clip the queue starts from; or an image's path
    reference: Any = option(0, Rule(_frame_or_path, "an emitted frame number >= 0, start or an image path"))


@dataclass
class ConsistencyConfig:
    enabled: bool = True  # master switch: false turns every consistency control off (Q-cache, reference bank, anchor, shared noise, tail noise: iid), for comparisons
    qcache: QCacheConfig = option(factory=QCacheConfig)
    refbank: RefBankConfig = option(factory=RefBankConfig)
    anchor: AnchorConfig = option(factory=AnchorConfig)
    # a: the fraction of every injected noise latent's variance shared by all frames at the same noise level
    # (sqrt(a) S_level + sqrt(1 - a) fresh): frames repeat frame 0's open choices; 0: off (fifo_stream/sampling/shared_noise.py)
    shared_noise: float = option(0.0, FRACTION)


@dataclass
class RuntimeConfig:
    """How to run; it never changes what is computed (beyond float rounding)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda = the GPU of LOCAL_RANK)
    dtype: str = option("auto", one_of("auto", "fp32", "fp16", "bf16"))  # auto: fp16 on CUDA; on a CPU bf16 where it has bf16 instructions (AVX512-BF16, AMX), else fp32 (the parity-exact choice)
    compile: bool = False  # torch.compile the U-Net for the tick's fixed shapes (the first ticks compile: minutes)
    cuda_graphs: bool = False  # with compile on CUDA: replay the tick's U-Net as CUDA graphs
    channels_last: bool = False  # NHWC weights for the U-Net's 2-D convolutions
    overlap_decode: Any = option("auto", Rule(lambda v: type(v) is bool or v == "auto", "true, false or auto"))  # decode frame k on a background thread while tick k+1 runs (auto: on CUDA only; on a CPU the thread would stall the tick's threads)


@dataclass
class Config:
    model: ModelConfig = option(factory=ModelConfig)
    video: VideoConfig = option(factory=VideoConfig)
    output: OutputConfig = option(factory=OutputConfig)
    sampling: SamplingConfig = option(factory=SamplingConfig)
    storyboard: StoryboardConfig = option(factory=StoryboardConfig)
    consistency: ConsistencyConfig = option(factory=ConsistencyConfig)
    runtime: RuntimeConfig = option(factory=RuntimeConfig)


# -- loading ---------------------------------------------------------------------------


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
        valid = ", ".join(f.name for f in fields(_schema_at(parent)))
        raise ConfigError(f"unknown config key '{e.full_key}' (valid keys{' in ' + parent if parent else ''}: {valid})") from None
    except ValidationError as e:
        raise ConfigError(_type_error(e)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config value: {str(e).splitlines()[0]}") from None


def _schema_at(key: str) -> type:
    """The dataclass of the schema's section at dotted ``key`` ('' is the whole config)."""
    section = Config
    for part in filter(None, key.split(".")):
        section = next(f for f in fields(section) if f.name == part).type
        section = globals()[section] if isinstance(section, str) else section
    return section


def _type_error(e: ValidationError) -> str:
    """The one-line message for a value of the wrong type, with the option's rule."""
    key = e.full_key or "?"
    parent, _, name = key.rpartition(".")
    spec = next((f for f in fields(_schema_at(parent)) if f.name == name), None)
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
        kind = globals().get(f.type, f.type) if isinstance(f.type, str) else f.type
        value = part[f.name]
        if is_dataclass(kind) and isinstance(value, DictConfig):
            _check_bools(value, kind, f"{prefix}{f.name}.")
        elif f.type == "bool" and not isinstance(value, bool):
            _fail(f"{prefix}{f.name}", value, "true or false")


def _rules(section: type, prefix: str = ""):
    """(dotted key, rule) of every option in the schema that has one."""
    for f in fields(section):
        kind = globals()[f.type] if isinstance(f.type, str) and f.type in globals() else f.type
        if is_dataclass(kind):
            yield from _rules(kind, f"{prefix}{f.name}.")
        elif f.metadata.get("rule") is not None:
            yield f"{prefix}{f.name}", f.metadata["rule"]


def _fail(key: str, value: Any, need: str) -> None:
    raise ConfigError(f"config {key}={value!r} is invalid: it must be {need}")


def validate(cfg: DictConfig) -> None:
    """Check every option's rule, then the rules that tie several options together."""
    for key, rule in _rules(Config):
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
