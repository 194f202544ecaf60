"""FIFO diagonal denoising (FIFO-Diffusion): a queue of latents at staggered noise levels.

Each tick every slot advances one DDIM step, the finished head latent is emitted,
the queue shifts one slot toward the head and fresh noise enters the tail. With f
frames per window and n partitions the queue holds S = f n levels (plus f/2
fully-denoised lookahead slots at the head with ``lookahead``).

All windows of a tick read only the pre-tick queue and write disjoint slots, so
in ``batched`` mode they and both guidance branches run as one U-Net batch (the branches share
the layers before cross-attention: :func:`~fifo_stream.sampling.ddim.guided_eps`).
``sequential`` mode reproduces the reference's call pattern (one window at a time,
highest first, separate guidance calls) as a baseline and cross-check.

A control that needs to know which queue frame each U-Net row is (the reference K/V bank,
:mod:`fifo_stream.consistency.refbank`) is given the tick's :class:`FrameLayout` and returns
the attention kwargs of the tick; each U-Net call gets them for its own rows.

Under torchrun each rank computes its share of the batch and gathers the rest
(see :mod:`fifo_stream.runs.distributed`), so every rank's queue stays identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..consistency.storyboard import SlotScenes
from ..errors import FifoStreamError
from ..models.attention import rows_of
from ..runs import distributed
from .ddim import ddim_step, guided_eps
from .schedule import fifo_timesteps, step_values
from .shared_noise import SharedNoise


@dataclass
class FrameLayout:
    """What each frame of each U-Net sample row is, for the rows of one tick in call order.

    ``branch`` (R,): 0 conditional, 1 unconditional; ``batch`` (R,): the item in the engine's
    batch of ``batch_size``; ``level`` (R, f): the noise level index of the frame's slot;
    ``owner`` (R, f): this row's result is the one written back for that slot; ``frame``
    (R, f): the engine tick at which the frame leaves the queue (its emission tick).
    """

    branch: torch.Tensor
    batch: torch.Tensor
    level: torch.Tensor
    owner: torch.Tensor
    frame: torch.Tensor
    batch_size: int


@dataclass(frozen=True)
class FifoSettings:
    """What defines a FIFO run's arithmetic (a checkpoint is only valid for the same settings)."""

    frames: int  # f: frames per window, the model's temporal length
    partitions: int  # n
    lookahead: bool = True
    guidance_scale: float = 12.0
    eta: float = 1.0
    fps: int = 8
    use_scale: bool = False
    clip_x0: float | None = None  # clamp predicted clean latents (pixel-space models)

    @property
    def steps(self) -> int:
        return self.frames * self.partitions

    @property
    def queue_length(self) -> int:
        return self.steps + (self.frames // 2 if self.lookahead else 0)

    @property
    def emit_slot(self) -> int:
        return self.frames // 2 if self.lookahead else 0

    @property
    def window_starts(self) -> list[int]:
        stride = self.frames // 2 if self.lookahead else self.frames
        count = 2 * self.partitions if self.lookahead else self.partitions
        return [r * stride for r in range(count)]

    @property
    def written_per_window(self) -> int:
        """Slots each window writes back: its second half with lookahead, all of it without."""
        return self.frames // 2 if self.lookahead else self.frames

    @property
    def warmup_frames(self) -> int:
        """Leading emitted frames built from copies of the base clip's first frame."""
        return self.steps - self.frames


class FifoEngine:
    """The queue and its per-tick update; everything a checkpoint needs is in ``state_dict()``."""

    def __init__(
        self,
        unet,
        alphas: torch.Tensor,
        settings: FifoSettings,
        noise,
        seed: int = 0,
        mode: str = "batched",
        max_batch: int | None = None,
        scales: torch.Tensor | None = None,
        refbank=None,
        forward=None,
        shared_noise: SharedNoise | None = None,
        anchor=None,
    ):
        """``forward`` replaces ``unet(x, t, context, fps, attention_kwargs=..., branches=...)`` for the ticks, e.g. a compiled U-Net.

        ``refbank`` is a control with ``attention_kwargs(layout)`` and ``commit()`` (see the module docstring).
        ``shared_noise`` mixes every noise latent that enters a slot with the shared component of the slot's level.
        ``anchor`` is a control with ``observe(latent, tick)``, ``correct(x0, levels)`` and a state
        (:class:`~fifo_stream.consistency.anchor.SubjectAnchor`): it corrects each step's predicted clean latents.
        """
        self.unet = unet
        self.forward = unet if forward is None else forward
        self.settings = s = settings
        self.noise = noise
        self.mode = mode
        self.max_batch = max_batch
        self.refbank = refbank
        self.shared_noise = shared_noise
        self.anchor = anchor
        self.device = next(unet.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

        levels = fifo_timesteps(s.steps, len(alphas))
        slot_levels = torch.arange(s.steps)
        if s.lookahead:
            slot_levels = torch.cat([torch.zeros(s.frames // 2, dtype=torch.long), slot_levels])
        self.slot_levels = slot_levels
        self.slot_timesteps = levels[slot_levels].to(self.device)
        a_t, a_prev = step_values(alphas, levels)
        shape = (1, 1, -1, 1, 1)
        self._a_t = a_t[slot_levels].float().reshape(shape).to(self.device)
        self._a_prev = a_prev[slot_levels].float().reshape(shape).to(self.device)
        if s.use_scale:
            if scales is None:
                raise FifoStreamError("use_scale needs the model's scale array")
            s_t, s_prev = step_values(scales, levels)
            self._s_t = s_t[slot_levels].float().reshape(shape).to(self.device)
            self._s_prev = s_prev[slot_levels].float().reshape(shape).to(self.device)
        else:
            self._s_t = self._s_prev = None
        self.queue: torch.Tensor | None = None
        self.tick = 0

    # -- starting --------------------------------------------------------------------

    def start_from_queue(self, queue: torch.Tensor) -> None:
        """Start from an explicit queue (b, c, L, h, w), slot 0 the least noisy."""
        if queue.shape[2] != self.settings.queue_length:
            raise FifoStreamError(f"initial queue has {queue.shape[2]} slots; these settings need {self.settings.queue_length}")
        self.queue = queue.to(self.device, torch.float32).clone()
        self.tick = 0

    def start_from_clip(self, clip: torch.Tensor, continues: bool = False) -> None:
        """Noise a clean clip of f latent frames (b, c, f, h, w) to the staggered levels.

        As in the reference, the clip's first frame fills the low levels and its frames end at
        the noisiest slot; with ``continues`` (a video to extend) slot j holds frame min(j, f - 1)
        instead, so the clip sits at the low levels, in order, and the new frames grow from
        noisier copies of its last frame.
        """
        s = self.settings
        if clip.shape[2] != s.frames:
            raise FifoStreamError(f"base clip has {clip.shape[2]} frames; the model's window is {s.frames}")
        clip = clip.to(self.device, torch.float32)
        offset = s.steps - s.frames
        if continues:
            frame = torch.arange(s.queue_length, device=self.device).clamp(max=s.frames - 1)
        else:
            frame = torch.tensor([0] * (s.queue_length - s.steps) + [max(0, i - offset) for i in range(s.steps)], device=self.device)
        x0 = clip[:, :, frame]
        eps = self._mix(torch.randn(x0.shape, generator=self.generator, device=self.device), self.slot_timesteps)
        self.start_from_queue(self._a_t.sqrt() * x0 + (1 - self._a_t).sqrt() * eps)

    # -- ticking ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, cond: torch.Tensor, uncond: torch.Tensor, scenes: SlotScenes | None = None) -> torch.Tensor:
        """Advance one tick and return the finished latent (b, c, h, w).

        ``cond``/``uncond`` are (b, n, d), or (b, L, n, d) with one context per queue slot;
        ``scenes``, the storyboard scene of each slot, for the anchor (None: one scene).
        """
        if self.queue is None:
            raise RuntimeError("start the engine (start_from_queue / start_from_clip) before stepping")
        s, q = self.settings, self.queue
        noise = self._mix(torch.randn(q.shape, generator=self.generator, device=self.device), self.slot_timesteps) if s.eta > 0 else None
        kwargs = self.refbank.attention_kwargs(self.layout(q.shape[0])) if self.refbank is not None else None
        if self.mode == "batched":
            head = slice(s.emit_slot, None)
            q[:, :, head] = self._update(q[:, :, head], self._eps_batched(q, cond, uncond, kwargs)[:, :, head], noise, head, scenes)
        else:
            self._sequential(q, cond, uncond, noise, kwargs, scenes)
        if self.refbank is not None:
            self.refbank.commit()
        out = q[:, :, s.emit_slot].clone()
        if self.anchor is not None:
            self.anchor.observe(out, self.tick, *(() if scenes is None else (int(scenes.index[s.emit_slot]), scenes.renew)))
        tail = self._mix(self.noise().to(self.device, torch.float32)[:, :, None], self.slot_timesteps[-1])[:, :, 0]
        self.queue = torch.cat([q[:, :, 1:], tail[:, :, None]], dim=2)
        self.tick += 1
        return out

    def slot_frames(self) -> torch.Tensor:
        """The engine tick at which each queue slot's latent is emitted (past ticks for lookahead slots)."""
        return self.tick + torch.arange(self.settings.queue_length) - self.settings.emit_slot

    def layout(self, batch: int) -> FrameLayout:
        """The rows of this tick's U-Net calls: batched, both branches of every window (all
        cond rows first, as :func:`guided_eps` indexes them); sequential, in call order, per
        window from the highest, cond then uncond. Each row is ``batch`` samples of one window."""
        s = self.settings
        if self.mode == "batched":
            groups = [(branch, w) for branch in (0, 1) for w in s.window_starts]
        else:
            groups = [(branch, w) for w in reversed(s.window_starts) for branch in (0, 1)]
        rows = [(branch, i, w) for branch, w in groups for i in range(batch)]
        branch, item, start = (torch.tensor(v) for v in zip(*rows))
        slots = start[:, None] + torch.arange(s.frames)
        owner = (torch.arange(s.frames) >= s.frames - s.written_per_window).expand(len(rows), -1)
        return FrameLayout(branch, item, self.slot_levels[slots], owner, self.slot_frames()[slots], batch)

    def _mix(self, fresh: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return fresh if self.shared_noise is None else self.shared_noise(fresh, timestep)

    def _call_unet(self, x, t, c, attention_kwargs=None, branches=1):
        return self.forward(x, t, c, self.settings.fps, attention_kwargs=attention_kwargs, branches=branches)

    def _window_inputs(self, q, start, context):
        f, b = self.settings.frames, q.shape[0]
        window = slice(start, start + f)
        ctx = context[:, window] if context.dim() == 4 else context
        return q[:, :, window], self.slot_timesteps[window].expand(b, f), ctx

    def _eps_batched(self, q, cond, uncond, attention_kwargs):
        s = self.settings
        windows = [(*self._window_inputs(q, w, cond), self._window_inputs(q, w, uncond)[2]) for w in s.window_starts]
        x, t, c, u = (torch.cat(parts) for parts in zip(*windows))
        mine = distributed.share(len(x))
        if mine.start < mine.stop:
            rows = torch.arange(mine.start, mine.stop)  # this rank's rows of both branches, as guided_eps stacks them
            kwargs = rows_of(attention_kwargs, torch.cat([rows, rows + len(x)]))
            part = guided_eps(self._call_unet, x[mine], t[mine], c[mine], u[mine], s.guidance_scale, self.max_batch, kwargs)
        else:  # more ranks than windows
            part = torch.empty_like(x[mine])
        eps_w = distributed.gather(part, len(x))
        eps = torch.empty_like(q)
        keep, b = s.written_per_window, q.shape[0]
        for i, w in enumerate(s.window_starts):
            eps[:, :, w + s.frames - keep : w + s.frames] = eps_w[i * b : (i + 1) * b, :, -keep:]
        return eps

    def _update(self, x, eps, noise, slots: slice, scenes: SlotScenes | None = None):
        """DDIM step of the latents ``x`` that sit in queue ``slots``."""
        n = noise[:, :, slots] if noise is not None else None
        s_t, s_prev = (v[:, :, slots] if v is not None else 1.0 for v in (self._s_t, self._s_prev))
        where = () if scenes is None else (scenes.index[slots], scenes.renew)
        correct = None if self.anchor is None else (lambda x0: self.anchor.correct(x0, self.slot_levels[slots], *where))
        return ddim_step(x, eps, self._a_t[:, :, slots], self._a_prev[:, :, slots], self.settings.eta, n, s_t, s_prev, self.settings.clip_x0, correct)

    def _sequential(self, q, cond, uncond, noise, attention_kwargs, scenes: SlotScenes | None = None):
        s = self.settings
        keep, b = s.written_per_window, q.shape[0]
        for i, w in enumerate(reversed(s.window_starts)):
            x, t, c = self._window_inputs(q, w, cond)
            u = self._window_inputs(q, w, uncond)[2]
            rows_c, rows_u = (rows_of(attention_kwargs, slice((2 * i + j) * b, (2 * i + j + 1) * b)) for j in (0, 1))
            e_c, e_u = self._call_unet(x, t, c, rows_c), self._call_unet(x, t, u, rows_u)
            eps = (e_u + s.guidance_scale * (e_c - e_u))[:, :, -keep:]
            written = slice(w + s.frames - keep, w + s.frames)
            q[:, :, written] = self._update(q[:, :, written], eps, noise, written, scenes)

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        s = self.settings
        return {
            "queue": self.queue.cpu().clone() if self.queue is not None else None,
            "tick": self.tick,
            "generator": self.generator.get_state(),
            "noise": self.noise.state_dict(),
            "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
            "shared_noise": self._shared_strength(),
            **({"refbank": self.refbank.state_dict()} if self.refbank is not None else {}),
            **({"anchor": self.anchor.state_dict()} if self.anchor is not None else {}),
        }

    def _shared_strength(self) -> float:
        return 0.0 if self.shared_noise is None else self.shared_noise.strength

    def load_state_dict(self, state: dict) -> None:
        own = {k: getattr(self.settings, k) for k in self.settings.__dataclass_fields__}
        if state["settings"] != own:
            diff = sorted(k for k in own if state["settings"].get(k) != own[k])
            raise FifoStreamError(f"engine checkpoint was made with other FIFO settings ({', '.join(diff)} differ)")
        if state.get("shared_noise", 0.0) != self._shared_strength():
            raise FifoStreamError(
                f"engine checkpoint was made with consistency.shared_noise={state.get('shared_noise', 0.0)}, "
                f"not {self._shared_strength()}; resume with the run's own config"
            )
        self.queue = state["queue"].to(self.device) if state["queue"] is not None else None
        self.tick = int(state["tick"])
        self.generator.set_state(state["generator"])
        self.noise.load_state_dict(state["noise"])
        if self.refbank is not None:
            if "refbank" not in state:
                raise FifoStreamError("engine checkpoint holds no reference bank (made without consistency.refbank); resume with the run's own config")
            self.refbank.load_state_dict(state["refbank"])
        if self.anchor is not None:
            if "anchor" not in state:
                raise FifoStreamError("engine checkpoint holds no subject anchor (made without consistency.anchor); resume with the run's own config")
            self.anchor.load_state_dict(state["anchor"])
