"""Encoder-to-decoder query cache (Q-cache) for the temporal transformers.

In every U-Net forward pass each enabled decoder temporal attention (``attn1`` of
``output_blocks.D.2``) blends its query with the query of a paired encoder block
(``input_blocks.E.2``) of the same width, recorded earlier in the SAME pass:
Q* = (1 - v) Q_dec + v Q_enc. v = 0 is exactly the plain model. v may follow the
noise level linearly, per frame, since frames of one FIFO window sit at different levels.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .attention import Attention, AttnProcessor
from .errors import FifoStreamError

# The pairing used in published experiments on the full-size layout (decoder -> encoder block).
DEFAULT_PAIRS = {3: 8, 4: 7, 5: 7, 6: 5, 7: 4, 8: 4, 9: 2, 10: 1, 11: 1}


def temporal_attn1(blocks: str, index: int) -> str:
    """State-dict path of a block's temporal self-attention, e.g. ``output_blocks.9.2.transformer_blocks.0.attn1``."""
    return f"{blocks}.{index}.2.transformer_blocks.0.attn1"


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
        pairs = dict(DEFAULT_PAIRS if pairs is None else pairs)
        layers = dict(unet.attention_layers())
        self.unet = unet
        self.strength = float(strength)
        self.strength_min = self.strength if strength_min is None else float(strength_min)
        for v in (self.strength, self.strength_min):
            if not 0.0 <= v <= 1.0:
                raise FifoStreamError(f"Q-cache strength must be in [0, 1], got {v}")
        self.max_timestep = num_train_timesteps - 1
        self.queries: dict[int, torch.Tensor] = {}
        self.timesteps: torch.Tensor | None = None
        processors = {}
        for dec, enc in pairs.items():
            dec_name, enc_name = temporal_attn1("output_blocks", int(dec)), temporal_attn1("input_blocks", int(enc))
            for name in (dec_name, enc_name):
                if name not in layers:
                    raise FifoStreamError(f"Q-cache pair {dec}->{enc}: this U-Net has no temporal attention {name}; set consistency.qcache.pairs")
            if layers[dec_name].to_q.out_features != layers[enc_name].to_q.out_features:
                raise FifoStreamError(f"Q-cache pair {dec}->{enc}: the blocks differ in width; pair blocks of the same width")
            processors[enc_name] = RecordQueryProcessor(self, int(enc))
            processors[dec_name] = BlendQueryProcessor(self, int(enc))
        self.layers = sorted(processors)
        unet.set_attn_processor(processors)
        self._hook = unet.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, _module, args) -> None:
        x, timesteps = args[0], args[1]
        b, t = x.shape[0], x.shape[2]
        self.timesteps = timesteps[:, None].expand(b, t) if timesteps.dim() == 1 else timesteps
        self.queries.clear()

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """v per frame, shaped (b, 1, 1, t, 1) to broadcast over queries viewed as (b, hw, heads, t, d)."""
        frac = self.timesteps.to(like.dtype) / self.max_timestep
        v = self.strength_min + (self.strength - self.strength_min) * frac
        return v[:, None, None, :, None]

    def remove(self) -> None:
        self._hook.remove()
        self.unet.set_attn_processor({name: AttnProcessor() for name in self.layers})
        self.queries.clear()


class RecordQueryProcessor(AttnProcessor):
    """Plain attention that keeps its query for the paired decoder blocks."""

    def __init__(self, cache: QCache, block: int):
        self.cache, self.block = cache, block

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.project(attn, x, x if context is None else context)
        self.cache.queries[self.block] = q
        return attn.to_out(attn.merge_heads(F.scaled_dot_product_attention(q, k, v)))


class BlendQueryProcessor(AttnProcessor):
    """Attention whose query is blended with the paired encoder block's query."""

    def __init__(self, cache: QCache, block: int):
        self.cache, self.block = cache, block

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.project(attn, x, x if context is None else context)
        q_enc = self.cache.queries.get(self.block)
        if q_enc is None:
            raise RuntimeError(f"Q-cache: encoder block {self.block} recorded no query in this forward pass")
        b, t = self.cache.timesteps.shape
        shape = q.shape
        w = self.cache.weight(q)
        q = ((1 - w) * q.reshape(b, -1, *shape[1:]) + w * q_enc.reshape(b, -1, *shape[1:])).reshape(shape)
        return attn.to_out(attn.merge_heads(F.scaled_dot_product_attention(q, k, v)))
