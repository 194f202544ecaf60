"""Text to an endless stream of frames: prompt(s) -> base clip -> FIFO queue -> VAE -> uint8 frames."""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from .consistency.anchor import SubjectAnchor
from .consistency.template import TemplateAnchor
from .consistency.qcache import QCache
from .consistency.refbank import RefBank
from .consistency.storyboard import Scene, SlotScenes, Storyboard, StoryboardError
from .errors import FifoStreamError
from .models.loading import DTYPES, VideoModel, compile_unet, resolve_overlap_decode
from .runs import distributed
from .sampling.ddim import guided_eps, sample_ddim
from .sampling.fifo import FifoEngine, FifoSettings, FrameLayout
from .sampling.schedule import fifo_timesteps
from .sampling.shared_noise import SharedNoise
from .sampling.tail_noise import make_noise


def fifo_settings(cfg: DictConfig, model: VideoModel) -> FifoSettings:
    s = cfg.sampling
    return FifoSettings(
        frames=model.frames_per_window,
        partitions=s.partitions,
        lookahead=s.lookahead,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        fps=cfg.video.fps,
        use_scale=cfg.model.schedule.use_scale,
        clip_x0=s.clip_x0,
    )


REFERENCE_CONTROLS = ("refbank", "anchor")  # the consistency controls that hold a reference (a frame or an image)


def reference_image_path(cfg: DictConfig, name: str) -> str | None:
    """The image path ``consistency.<name>.reference`` names, if that control is enabled and names one
    (a string; the anchor's ``start`` is not a path)."""
    control = cfg.consistency[name]
    if control.enabled and isinstance(control.reference, str) and not (name == "anchor" and control.reference == "start"):
        return control.reference
    return None


def check_world_size(cfg: DictConfig) -> None:
    """Refuse what cannot be shared out over the processes of a torchrun job."""
    if distributed.world_size() == 1:
        return
    if cfg.sampling.mode == "sequential":
        raise FifoStreamError("sampling.mode=sequential runs on one process; use sampling.mode=batched under torchrun")


@dataclass
class StartClip:
    """What the video starts from instead of noise: the user's image or the end of their video.

    ``frames`` (n, H, W, 3) uint8 at the video size: one image (repeated over the window), or
    the last f frames of a video (continued: they are not emitted again). The base clip is
    ``frames`` after SDEdit at ``strength`` (0 keeps them, 1 leaves almost only noise).
    """

    frames: np.ndarray
    strength: float

    @property
    def continues(self) -> bool:
        return len(self.frames) > 1


class FrameStream:
    """An endless iterator of decoded frames (H, W, 3) uint8; ``state_dict`` resumes it exactly.

    Seeds: the base clip's noise, the engine's DDIM/noising generator, the tail noise and
    the shared noise components (``consistency.shared_noise``) are streams derived from
    ``seed``. With ``sampling.discard_warmup`` the first S - f ticks (copies of the base
    clip's first frame) are not emitted. Nothing accumulates: memory does not grow with the
    number of frames.

    ``prompt`` is one prompt or a :class:`Storyboard`; with several scenes every queue
    slot is conditioned on the context of the emitted frame it becomes, and the base clip
    on the first scene's. Each distinct prompt is encoded once.

    With ``runtime.compile`` the ticks run a compiled U-Net (the base clip runs eagerly).

    ``start`` begins the video from the user's footage (:class:`StartClip`). ``reference_image``
    (H, W, 3) uint8 is the reference of every enabled control that holds one, instead of an emitted
    frame: the bank records it (one one-frame U-Net row per noise level and branch) and the
    subject anchor takes its colors.
    """

    def __init__(
        self,
        model: VideoModel,
        cfg: DictConfig,
        prompt: str | Storyboard,
        seed: int = 0,
        start: StartClip | None = None,
        reference_image: np.ndarray | None = None,
    ):
        self.model, self.cfg = model, cfg
        self.start_clip, self.reference_image = start, reference_image
        self.settings = settings = fifo_settings(cfg, model)
        vae_factor = model.spatial_factor
        self.latent_shape = (1, model.unet.in_channels, cfg.video.height // vae_factor, cfg.video.width // vae_factor)
        self.seed = seed
        self.storyboard = prompt if isinstance(prompt, Storyboard) else Storyboard((Scene(0, prompt),))
        encoded = {p: model.encode_text([p]) for p in self.storyboard.prompts}
        self.scene_contexts = torch.cat([encoded[s.prompt] for s in self.storyboard.scenes])
        self.cond = self.scene_contexts[:1]
        self.uncond = model.encode_text([cfg.sampling.negative_prompt])
        self.skip = settings.warmup_frames if cfg.sampling.discard_warmup else 0
        for name in REFERENCE_CONTROLS:
            path = reference_image_path(cfg, name)
            if path is not None and reference_image is None:
                raise FifoStreamError(f"consistency.{name}.reference names an image ({path}); pass it as reference_image= (fifo_stream.inputs.read_image and fit_frame)")
        if start is not None and start.continues:
            self.skip = settings.frames - settings.emit_slot  # the input's own frames that are still to be emitted
        check_world_size(cfg)
        anchor = self._anchor()
        self.refbank = self.qcache = None
        try:
            self._install_controls()
        except BaseException:
            self.close()
            raise
        strength = cfg.consistency.shared_noise
        levels = fifo_timesteps(settings.steps, len(model.alphas))
        self.shared_noise = SharedNoise(self.latent_shape, levels, seed + 4, strength, model.device) if strength > 0 else None
        self.engine = FifoEngine(
            model.unet, model.alphas, settings,
            make_noise(
                cfg.sampling.tail_noise, self.latent_shape, seed + 2, model.device,
                cfg.sampling.noise_alpha, cfg.sampling.noise_cutoff, cfg.sampling.noise_candidates,
            ),
            seed=seed + 1, mode=cfg.sampling.mode, max_batch=cfg.sampling.max_batch, scales=model.scales, refbank=self.refbank,
            forward=compile_unet(model.unet, cfg.runtime.cuda_graphs) if cfg.runtime.compile else None,
            shared_noise=self.shared_noise,
            anchor=anchor,
        )
        self.emitted = 0

    def _install_controls(self) -> None:
        """Put the enabled consistency controls on the model's U-Net."""
        r, q, unet = self.cfg.consistency.refbank, self.cfg.consistency.qcache, self.model.unet
        if r.enabled:
            reference_tick = self.skip + (r.reference if self.reference_image is None else 0)
            self.refbank = RefBank(unet, self.settings.steps, r.layers, r.mode, r.weight, r.momentum, reference_tick, DTYPES[r.dtype])
        if q.enabled:
            self.qcache = QCache(unet, None if q.pairs is None else dict(q.pairs), q.strength, q.strength_min, len(self.model.alphas))

    def _anchor(self) -> SubjectAnchor | TemplateAnchor | None:
        a = self.cfg.consistency.anchor
        if not a.enabled:
            return None
        if a.min_level >= self.settings.steps:
            raise FifoStreamError(f"consistency.anchor.min_level={a.min_level} corrects no level: these settings have {self.settings.steps} (use 0 to {self.settings.steps - 1})")
        given = a.reference == "start" or self.reference_image is not None  # take_reference() in start()
        tick = None if given else self.skip + a.reference
        m = self.model
        if a.mode == "template":
            palette = None if a.palette is None else np.array(a.palette, np.float32)
            return TemplateAnchor(a.strength, a.min_level, tick, m.encode, m.decode, m.spatial_factor, m.upscale, settle=self.settings.frames, palette=palette,
                                  full_cover=a.full_cover, hold_smaller_part=a.hold_smaller_part)
        return SubjectAnchor(a.strength, a.min_level, a.bands, tick, m.encode, settle=self.settings.frames)

    def close(self) -> None:
        """Uninstall the consistency controls from the (shared) model."""
        if self.qcache is not None:
            self.qcache.remove()
            self.qcache = None
        if self.refbank is not None:
            self.refbank.remove()
            self.refbank = None

    def _unet(self, x, t, ctx, attention_kwargs=None, branches=1):
        return self.model.unet(x, t, ctx, self.settings.fps, attention_kwargs, branches)

    def start(self) -> None:
        """Sample the base clip with plain DDIM (SDEdit from the start clip) and noise it into the queue.

        A subject anchor whose reference is ``start`` takes it from this clip, which is then sampled again
        from the same noise with the anchor holding it: the queue starts from frames that show the held
        look (with a palette, the frames the model drew show their in-between colors until then).
        """
        b, c, h, w = self.latent_shape
        g = torch.Generator(device=self.model.device).manual_seed(self.seed)
        noise = torch.randn((b, c, self.settings.frames, h, w), generator=g, device=self.model.device)
        if self.reference_image is not None and self.refbank is not None:
            self._record_reference(self.model.encode(self.reference_image[None]))  # (1, c, 1, h, w)
        x0, strength = None, 1.0
        if self.start_clip is not None:  # an image is repeated over the window; a video's f frames are the window
            x0 = self.model.encode(self.start_clip.frames).expand(-1, -1, self.settings.frames, -1, -1).contiguous()
            strength = self.start_clip.strength
        s, steps_noise = self.settings, g.get_state()

        def base_clip(correct_x0=None):
            clip = sample_ddim(
                self._unet, noise, self.cond, self.uncond, self.model.alphas, s.steps, s.guidance_scale, s.eta, g,
                self.model.scales, s.clip_x0, x0, strength, self.shared_noise, correct_x0,
            )
            return distributed.broadcast_(clip)  # rank 0's clip: identical queues on every rank

        clip, anchor = base_clip(), self.engine.anchor
        if anchor is not None and anchor.reference_tick is None and self.reference_image is None and self.start_clip is None:
            anchor.take_reference(clip[0].transpose(0, 1))
            if anchor.references:  # a clip without a subject gives none: the clip again would be the same
                g.set_state(steps_noise)
                clip = base_clip(lambda pred, i: anchor.correct(pred, torch.full((s.frames,), i)))
        self.begin(clip, self.start_clip is not None and self.start_clip.continues)

    def begin(self, clip: torch.Tensor, continues: bool = False) -> None:
        """Start the queue from the clean base ``clip`` (1, c, f, h, w): a subject anchor without a
        frame reference that has none yet takes it here (the reference image, or the clip's medoid frame)."""
        anchor = self.engine.anchor
        if anchor is not None and anchor.reference_tick is None and not anchor.references:
            if self.reference_image is not None:
                anchor.take_image(self.reference_image)
            else:
                anchor.take_reference(clip[0].transpose(0, 1))
        self.engine.start_from_clip(clip, continues)

    def _record_reference(self, z: torch.Tensor) -> None:
        """Fill the bank from the reference image's latent ``z`` (1, c, 1, h, w): noised to every level
        (seeded), one U-Net row per level and branch."""
        s = self.settings
        levels = fifo_timesteps(s.steps, len(self.model.alphas))
        a = self.model.alphas[levels].float().to(z).reshape(-1, 1, 1, 1, 1)
        g = torch.Generator(device=self.model.device).manual_seed(self.seed + 3)
        noise = torch.randn((s.steps, *z.shape[1:]), generator=g, device=z.device)
        if self.shared_noise is not None:  # row l at level l: as the frames' noise there
            noise = self.shared_noise(noise.transpose(0, 2), levels).transpose(0, 2)
        x = a.sqrt() * z + (1 - a).sqrt() * noise
        rows, level = 2 * s.steps, torch.arange(s.steps).repeat(2)[:, None]
        layout = FrameLayout(
            branch=torch.arange(2).repeat_interleave(s.steps), batch=torch.zeros(rows, dtype=torch.long), level=level,
            owner=torch.ones(rows, 1, dtype=torch.bool), frame=torch.full((rows, 1), self.refbank.reference_tick), batch_size=1,
        )
        t, cond, uncond = levels.to(z.device)[:, None], self.cond.expand(s.steps, -1, -1), self.uncond.expand(s.steps, -1, -1)
        guided_eps(self._unet, x, t, cond, uncond, s.guidance_scale, self.engine.max_batch, self.refbank.attention_kwargs(layout))
        self.refbank.commit(gather=False)  # every rank ran every row

    def tick(self) -> torch.Tensor | None:
        """One tick of the queue (the base clip first): the latent (b, c, h, w) it emits, None in warm-up."""
        if self.engine.queue is None:
            self.start()
        z = self.engine.step(*self._slot_inputs())
        if self.engine.tick <= self.skip:
            return None
        self.emitted += 1
        return z

    def next_latent(self) -> torch.Tensor:
        """The next emitted latent (b, c, h, w), skipping warm-up ticks."""
        while (z := self.tick()) is None:
            pass
        return z

    @property
    def live_frame(self) -> int:
        """The first emitted frame a prompt added now can condition: the one entering the queue's tail next tick.

        Every frame before it is already in the queue (or emitted) under its own context, so an
        added scene that starts here changes nothing before it, and a resume with the scene in
        the storyboard from the start makes the same frames.
        """
        slots = self.settings.queue_length - 1 - self.settings.emit_slot  # ticks from the tail slot to emission
        return max(self.engine.tick + slots - self.skip, 1)

    def plan_scene(self, frame: int, prompt: str, transition: int | None = None, anchor: str = "keep") -> Storyboard:
        """The storyboard :meth:`add_scene` would make (nothing changes); refuses what it would refuse."""
        if frame < self.live_frame:
            raise StoryboardError(f"frame {frame} is already in the queue; a prompt can start at frame {self.live_frame} or later")
        self.model.text_encoder.tokenizer([prompt])  # unknown words
        return self.storyboard.add(frame, prompt, transition, anchor)

    def add_scene(self, frame: int, prompt: str, transition: int | None = None, anchor: str = "keep") -> None:
        """Append a scene from emitted frame ``frame`` (>= :attr:`live_frame`) to the storyboard
        (``anchor``: keep or renew the subject anchor's reference)."""
        storyboard = self.plan_scene(frame, prompt, transition, anchor)
        context = self.model.encode_text([prompt])
        self.storyboard, self.scene_contexts = storyboard, torch.cat([self.scene_contexts, context])

    def _slot_inputs(self) -> tuple[torch.Tensor, torch.Tensor, SlotScenes | None]:
        """This tick's (cond, uncond, scenes): one context and no scenes, or for a storyboard one context
        per queue slot (1, L, n, d) and each slot's scene (for the anchor)."""
        if len(self.storyboard.scenes) == 1:
            return self.cond, self.uncond, None
        frames = self.engine.slot_frames().to(self.scene_contexts.device) - self.skip  # below 0: warm-up
        cond = self.storyboard.contexts(self.scene_contexts, frames)[None]
        return cond, self.uncond[:, None].expand(-1, cond.shape[1], -1, -1), self.storyboard.slot_scenes(frames)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.decode(self.next_latent())

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """A latent from :meth:`next_latent` as a frame (H, W, 3) uint8."""
        return self.model.decode(z[:, :, None], self.cfg.sampling.vae_batch)[0, 0].numpy()

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "emitted": self.emitted}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.emitted = int(state["emitted"])


class Decoder:
    """Decodes latents into frames, on a background thread where ``overlap`` (``runtime.overlap_decode``) says so.

    Submitting latent k and then running tick k+1 overlaps the VAE decode, and its copy to
    the host, with the next tick: the main thread never waits for the GPU in between.
    """

    def __init__(self, stream: FrameStream, overlap: bool | str = "auto"):
        self.stream = stream
        background = resolve_overlap_decode(overlap, stream.model.device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode") if background else None

    @property
    def background(self) -> bool:
        return self._pool is not None

    def submit(self, z: torch.Tensor) -> Future:
        if self._pool is not None:
            return self._pool.submit(self.stream.decode, z)
        done: Future = Future()
        done.set_result(self.stream.decode(z))
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def generate(
    model: VideoModel, cfg: DictConfig, prompt: str | Storyboard, frames: int, seed: int = 0, progress: bool = True
) -> Iterator[np.ndarray]:
    """Yield ``frames`` frames for ``prompt`` (or a storyboard) with a progress bar on a TTY."""
    stream = FrameStream(model, cfg, prompt, seed)
    try:
        with tqdm(total=frames, unit="frame", disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True) as bar:
            for _ in range(frames):
                frame = next(stream)
                bar.update(1)
                yield frame
    finally:
        stream.close()
