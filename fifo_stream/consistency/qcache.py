"""Encoder-to-decoder query cache (Q-cache) for the temporal transformers.

In every U-Net forward pass each enabled decoder temporal attention (``attn1`` of the
temporal transformer of ``output_blocks.D``) blends its query with the query of a paired
encoder block (``input_blocks.E``) of the same width, recorded earlier in the SAME pass:
Q* = (1 - v) Q_dec + v Q_enc. v = 0 is exactly the plain model. v may follow the noise
level linearly, per frame, since frames of one FIFO window sit at different levels.

Everything a pass needs arrives as attention kwargs: each frame's ``timesteps`` (b, t), and
``shared``, the dict of the pass in which encoder queries wait for their decoder blocks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import FifoStreamError
from ..models.attention import Attention, AttnProcessor, attend
from ..models.unet_blocks import TemporalTransformer

# The pairing used in published experiments on the full-size layout (decoder -> encoder block).
DEFAULT_PAIRS = {3: 8, 4: 7, 5: 7, 6: 5, 7: 4, 8: 4, 9: 2, 10: 1, 11: 1}
CONTROL = "qcache"


def temporal_self_attention(unet, blocks: str, index: int) -> Attention | None:
    """``attn1`` of the temporal transformer in ``unet.<blocks>[index]``, or None if it has none."""
    if not 0 <= index < len(getattr(unet, blocks)):
        return None
    found = [m for m in getattr(unet, blocks)[index] if isinstance(m, TemporalTransformer)]
    return found[0].transformer_blocks[0].attn1 if found else None


class QCache:
    """Installs the Q-cache processors on a U-Net; ``remove()`` restores plain attention.

    ``strength`` is v at the highest noise level (timestep N-1) and ``strength_min`` at
    timestep 0; between them v is linear in the frame's timestep (equal values: constant).
    """

    def __init__(
        self,
        unet,
        pairs: Mapping[int, int] | None = None,
        strength: float = 0.9,
        strength_min: float | None = None,
        num_train_timesteps: int = 1000,
    ):
        self.unet = unet
        self.strength = float(strength)
        self.strength_min = self.strength if strength_min is None else float(strength_min)
        self.max_timestep = num_train_timesteps - 1
        processors = {}
        for dec, enc in dict(DEFAULT_PAIRS if pairs is None else pairs).items():
            dec_attn, enc_attn = temporal_self_attention(unet, "output_blocks", int(dec)), temporal_self_attention(unet, "input_blocks", int(enc))
            for where, attn in ((f"output_blocks.{dec}", dec_attn), (f"input_blocks.{enc}", enc_attn)):
                if attn is None:
                    raise FifoStreamError(f"Q-cache pair {dec}->{enc}: this U-Net has no temporal attention in {where}; set consistency.qcache.pairs")
            if dec_attn.to_q.out_features != enc_attn.to_q.out_features:
                raise FifoStreamError(f"Q-cache pair {dec}->{enc}: the blocks differ in width; pair blocks of the same width")
            processors[enc_attn.name] = RecordQueryProcessor(int(enc))
            processors[dec_attn.name] = BlendQueryProcessor(self, int(enc))
        unet.add_control(CONTROL, processors)

    @property
    def layers(self) -> list[str]:
        return self.unet.controls[CONTROL]

    def weight(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """v per frame, shaped (b, 1, 1, t, 1) to broadcast over queries viewed as (b, hw, heads, t, d)."""
        frac = timesteps.to(like.dtype) / self.max_timestep
        v = self.strength_min + (self.strength - self.strength_min) * frac
        return v[:, None, None, :, None]

    def remove(self) -> None:
        self.unet.remove_control(CONTROL)


class RecordQueryProcessor(AttnProcessor):
    """Plain attention that leaves its query in the pass's ``shared`` dict for the paired decoder blocks."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None, *, shared: dict, **_: Any) -> torch.Tensor:
        q, k, v = self.project(attn, x, context)
        shared[CONTROL, self.block] = q
        return self.output(attn, attend(q, k, v))


class BlendQueryProcessor(AttnProcessor):
    """Attention whose query is blended with the paired encoder block's query of the same pass."""

    def __init__(self, cache: QCache, block: int):
        self.cache, self.block = cache, block

    def __call__(
        self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None, *, shared: dict, timesteps: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        q, k, v = self.project(attn, x, context)
        q = self.blend(q, shared[CONTROL, self.block], timesteps)
        return self.output(attn, attend(q, k, v))

    def blend(self, q: torch.Tensor, q_enc: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(1 - v) q + v q_enc, with each frame's v; queries are ((b h w), heads, t, d)."""
        b = timesteps.shape[0]
        w = self.cache.weight(timesteps, q)
        return ((1 - w) * q.reshape(b, -1, *q.shape[1:]) + w * q_enc.reshape(b, -1, *q.shape[1:])).reshape(q.shape)
