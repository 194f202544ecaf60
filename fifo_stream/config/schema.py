"""The options schema: every option's type, default (VideoCrafter2 with the FIFO-Diffusion
defaults), meaning (the comment beside it) and constraint (the ``rule`` of :func:`option`)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator, Optional

from omegaconf import ListConfig


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
    # fifo-stream's own, not upstream: the latent downsampling factors whose attention blocks also have
    # temporal attention (null: all of attention_resolutions, as upstream; the middle block always has it)
    temporal_attention_resolutions: Optional[list[int]] = None
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
    max_batch: Optional[int] = option(None, Rule(lambda v: v is None or v > 0, "a positive integer or null"))  # cap on rows (a window under one guidance branch) per U-Net call; a call runs both branches of its windows unless it is 1 (null: the whole tick in one call; on a CPU a smaller one can be faster: measure with tools/bench.py)
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


def _palette(value: Any) -> bool:
    return value is None or (len(value) > 0 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in value))


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
    strength: float = option(1.0, FRACTION)  # how far the subject's band means (or template cells) move to the reference's (1: all the way)
    min_level: int = option(0, at_least(0, "an integer"))  # corrected noise levels: index >= this (0: all of them)
    mode: str = option("bands", one_of("bands", "template"))  # bands: the subject's band means | template: its cells, placed where it is
    bands: int = option(2, POSITIVE)  # mode bands: horizontal bands of the subject whose colors are kept apart (e.g. a hat and a body)
    # the emitted frame number of the reference frame; start: the medoid frame of the clip the queue starts from; or an image's path
    reference: Any = option(0, Rule(_frame_or_path, "an emitted frame number >= 0, start or an image path"))
    # mode template: the colors the model draws ([[r, g, b], ...]); each part of an object the model drew is held in
    # the nearest of them, not in its own color, which may lie between two (a user's image keeps its own); null: off
    palette: Optional[list[list[int]]] = option(None, Rule(_palette, "null or a list of [r, g, b] colors, each 0-255"))
    # mode template: template cells the subject covers at least this share of move all the way, the others by
    # share / full_cover (1: each by its share, the model draws the rim; lower holds more of the rim)
    full_cover: float = option(1.0, Rule(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    # mode template: also hold whole every cell where the object's smaller part (a hat) has at least half of its
    # share, however little of the cell it covers (a triangle's apex, a hat's thin edge)
    hold_smaller_part: bool = False


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
    keep_freed_memory: bool = True  # on a CPU (glibc): malloc keeps freed memory for the next tick instead of unmapping it, so each tick's large tensors are not page-faulted in anew (process-wide)


@dataclass
class Config:
    model: ModelConfig = option(factory=ModelConfig)
    video: VideoConfig = option(factory=VideoConfig)
    output: OutputConfig = option(factory=OutputConfig)
    sampling: SamplingConfig = option(factory=SamplingConfig)
    storyboard: StoryboardConfig = option(factory=StoryboardConfig)
    consistency: ConsistencyConfig = option(factory=ConsistencyConfig)
    runtime: RuntimeConfig = option(factory=RuntimeConfig)


# -- walking the schema ------------------------------------------------------------------


def field_type(spec) -> Any:
    """A field's type, its name resolved (the annotations are strings)."""
    return globals().get(spec.type, spec.type) if isinstance(spec.type, str) else spec.type


def section_at(key: str) -> type:
    """The dataclass of the schema's section at dotted ``key`` ('' is the whole config)."""
    section = Config
    for part in filter(None, key.split(".")):
        section = field_type(next(f for f in fields(section) if f.name == part))
    return section


def rules(section: type = Config, prefix: str = "") -> Iterator[tuple[str, Rule]]:
    """(dotted key, rule) of every option in the schema that has one."""
    for f in fields(section):
        kind = field_type(f)
        if is_dataclass(kind):
            yield from rules(kind, f"{prefix}{f.name}.")
        elif f.metadata.get("rule") is not None:
            yield f"{prefix}{f.name}", f.metadata["rule"]
