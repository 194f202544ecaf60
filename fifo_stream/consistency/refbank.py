"""Reference key/value bank for the spatial self-attention (identity consistency).

Frames also attend to the keys and values of a reference frame in ``attn1`` of the
chosen spatial transformers:

- ``concat``: keys [K_self; K_ref], values [V_self; V_ref], with log(weight) added to the
  reference logits: softmax([q K_self^T s, q K_ref^T s + log w]) [V_self; V_ref],
  s = d_head^-0.5. weight 1 is plain concatenation; weight -> 0 is the plain model.
- ``replace``: keys K_ref, values V_ref only (cross-frame attention as in Text2Video-Zero).

FIFO frames in one window sit at different noise levels, so the bank holds one entry per
noise level (and per guidance branch and batch item). The engine describes the tick's U-Net
rows with a :class:`~fifo_stream.sampling.fifo.FrameLayout`; :meth:`RefBank.rows` turns it
into :class:`BankRows`, which each U-Net call receives for its own rows as the attention
kwarg ``refbank``. Each frame at level k attends to entry k once it is filled, and plain
attention is used before (and in calls without ``refbank``, such as the base clip's). An entry is recorded
from the same U-Net call that denoises the frame (no extra U-Net work): the row whose
result is written back for the slot records its K/V. Entry k is filled by the first frame
at or after the reference (in emission order) that is denoised at level k; frames that
start in the queue below some levels (the base clip's) leave those to the next frames.
Later frames passing level k update it with momentum: bank_k <- mu bank_k + (1 - mu) K_new
(mu = 1: fixed reference, mu = 0: the last frame's). Reads use the bank as it was before
the tick and updates are applied by :meth:`RefBank.commit` after it, so the result does not
depend on how the tick's rows are split into calls (batched, sequential, max_batch) or over
the ranks of a torchrun job (each records its own rows; the commit gathers them all). All of
the bank's logic is here; the engine only describes its calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FifoStreamError
from ..models.attention import Attention, AttnProcessor, attend, PerRow
from ..models.unet_blocks import SpatialTransformer
from ..runs import distributed
from ..sampling.fifo import FrameLayout

SELECTORS = {"decoder": ("output_blocks.",), "encoder": ("input_blocks.",), "middle": ("middle_block.",), "all": ("",)}
CONTROL = "refbank"


def spatial_self_attention(unet) -> dict[str, Attention]:
    """Every ``attn1`` of the U-Net's spatial transformers, by state-dict path."""
    return {
        block.attn1.name: block.attn1
        for module in unet.modules()
        if isinstance(module, SpatialTransformer)
        for block in module.transformer_blocks
    }


def select_layers(unet, layers: str | list[str]) -> list[str]:
    """Layer paths for ``layers``: decoder | encoder | middle | all, or a list of path prefixes."""
    available = spatial_self_attention(unet)
    if isinstance(layers, str):
        if layers not in SELECTORS:
            raise FifoStreamError(f"consistency.refbank.layers={layers!r} is unknown; use decoder, encoder, middle, all or a list of layer paths")
        chosen = [n for n in available if n.startswith(SELECTORS[layers])]
    else:
        chosen = []
        for prefix in layers:
            match = [n for n in available if n == prefix or n.startswith(f"{prefix}.")]
            if not match:
                raise FifoStreamError(
                    f"consistency.refbank.layers: {prefix!r} names no spatial self-attention of this U-Net "
                    f"(e.g. {next(iter(available), 'none')}); use decoder, encoder, middle, all or such paths"
                )
            chosen += [n for n in match if n not in chosen]
    if not chosen:
        raise FifoStreamError(f"consistency.refbank.layers={layers!r} selects no layer of this U-Net")
    return chosen


@dataclass
class BankRows(PerRow):
    """Per frame of each U-Net sample row (R, f): its bank entry, whether it attends to the
    entry, whether it records into it."""

    entry: torch.Tensor
    use: torch.Tensor
    record: torch.Tensor

    def rows(self, index) -> BankRows:
        return BankRows(self.entry[index], self.use[index], self.record[index])


class RefBank:
    """Installs the bank's processors on a U-Net; ``remove()`` restores plain attention.

    ``levels`` is the number of noise levels S; ``reference_tick`` the engine tick at which
    the reference frame is emitted. Entries are stored in ``dtype``.
    """

    def __init__(
        self,
        unet,
        levels: int,
        layers: str | list[str] = "decoder",
        mode: str = "concat",
        weight: float = 1.0,
        momentum: float = 1.0,
        reference_tick: int = 0,
        dtype: torch.dtype = torch.float16,
    ):
        self.unet, self.levels, self.mode = unet, int(levels), mode
        self.log_weight = math.log(weight)
        self.momentum = float(momentum)
        self.reference_tick = int(reference_tick)
        self.dtype = dtype
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.filled: torch.Tensor | None = None  # (2 * batch * levels,) bool
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        unet.add_control(CONTROL, {name: RefBankProcessor(self) for name in select_layers(unet, layers)})

    @property
    def layers(self) -> list[str]:
        return self.unet.controls[CONTROL]

    # -- the engine's side ------------------------------------------------------------

    def attention_kwargs(self, layout: FrameLayout) -> dict[str, BankRows]:
        """The attention kwargs of a tick whose U-Net rows ``layout`` describes (slice them per call)."""
        device = next(self.unet.parameters()).device
        size = 2 * layout.batch_size * self.levels
        if self.filled is None:
            self.filled = torch.zeros(size, dtype=torch.bool, device=device)
        elif self.filled.numel() != size:
            raise FifoStreamError("the reference bank was made for another batch size")
        entry = ((layout.branch * layout.batch_size + layout.batch)[:, None] * self.levels + layout.level).to(device)
        use = self.filled[entry]
        record = layout.owner.to(device) & (layout.frame.to(device) >= self.reference_tick)
        if self.momentum == 1.0:
            record &= ~use  # a fixed reference: only empty entries are recorded
        return {CONTROL: BankRows(entry, use, record)}

    def commit(self, gather: bool = True) -> None:
        """Apply the tick's recordings: fill empty entries, blend the others with momentum.

        Under torchrun every rank applies every rank's recordings, so all hold the same bank
        (``gather=False`` where every rank recorded the same rows itself, as for a reference
        image). An entry is recorded at most once per tick, so the order does not matter.
        """
        recorded = []
        for name, entry, k, v in self._gathered() if gather and distributed.world_size() > 1 else self._pending:
            for bank, new in ((self.keys, k), (self.values, v)):
                if name not in bank:
                    bank[name] = torch.zeros((self.filled.numel(), *new.shape[1:]), dtype=self.dtype, device=new.device)
                old = bank[name][entry].float()
                mix = self.momentum * old + (1 - self.momentum) * new.float()
                bank[name][entry] = torch.where(self.filled[entry, None, None, None], mix, new.float()).to(self.dtype)
            recorded.append(entry)
        if recorded:
            self.filled[torch.cat(recorded)] = True
        self._pending.clear()

    def _gathered(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every rank's recordings of the tick, per layer (every rank calls this, in the same layer order)."""
        device = next(self.unet.parameters()).device
        out = []
        for name in self.layers:
            mine = [p[1:] for p in self._pending if p[0] == name]
            parts = [torch.cat(t) for t in zip(*mine)] if mine else [None, None, None]
            entry, k, v = (distributed.gather_uneven(t, device) for t in parts)
            if entry is not None:
                out.append((name, entry, k, v))
        return out

    # -- the processors' side ---------------------------------------------------------

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """Attention of queries (N, heads, n, d) to their own K/V and bank ``entry`` (N,)."""
        k_ref, v_ref = self.keys[name][entry].to(q.dtype), self.values[name][entry].to(q.dtype)
        if self.mode == "replace":
            return attend(q, k_ref, v_ref)
        bias = None
        if self.log_weight:
            bias = torch.zeros(1, k.shape[2] + k_ref.shape[2], dtype=q.dtype, device=q.device)
            bias[:, k.shape[2] :] = self.log_weight
        return attend(q, torch.cat([k, k_ref], 2), torch.cat([v, v_ref], 2), attn_mask=bias)

    def record(self, name: str, entry: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's K/V of frames that fill or update ``entry``, for :meth:`commit`."""
        self._pending.append((name, entry, k.to(self.dtype), v.to(self.dtype)))

    # -- state -----------------------------------------------------------------------

    def nbytes(self) -> int:
        """Memory held by the bank (keys, values and fill flags), in bytes."""
        tensors = [*self.keys.values(), *self.values.values()] + ([self.filled] if self.filled is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict:
        copy = lambda d: {k: t.to("cpu", copy=True) for k, t in d.items()}  # noqa: E731
        filled = None if self.filled is None else self.filled.to("cpu", copy=True)
        return {"keys": copy(self.keys), "values": copy(self.values), "filled": filled}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.unet.parameters()).device
        self.keys = {k: t.to(device, self.dtype) for k, t in state["keys"].items()}
        self.values = {k: t.to(device, self.dtype) for k, t in state["values"].items()}
        self.filled = None if state["filled"] is None else state["filled"].to(device)

    def remove(self) -> None:
        self.unet.remove_control(CONTROL)


class RefBankProcessor(AttnProcessor):
    """Spatial self-attention that also attends to, and records into, the reference bank."""

    def __init__(self, bank: RefBank):
        self.bank = bank

    def __call__(
        self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None, *, refbank: BankRows | None = None, **_: Any
    ) -> torch.Tensor:
        q, k, v = self.project(attn, x, None)
        if refbank is None:
            return self.output(attn, attend(q, k, v))
        # Frames are folded into the batch row-major, "(b t)", as in the U-Net.
        entry, use, record = (t.reshape(-1) for t in (refbank.entry, refbank.use, refbank.record))
        if len(entry) != len(q):
            raise RuntimeError(f"reference bank: a U-Net call of {len(q)} frames got rows for {len(entry)}")
        if not use.any():
            out = attend(q, k, v)
        else:
            out = torch.empty_like(q)
            plain = ~use
            if plain.any():
                out[plain] = attend(q[plain], k[plain], v[plain])
            out[use] = self.bank.attend(attn.name, q[use], k[use], v[use], entry[use])
        if record.any():
            self.bank.record(attn.name, entry[record], k[record], v[record])
        return self.output(attn, out)
