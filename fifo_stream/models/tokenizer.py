"""OpenCLIP's CLIP byte-level BPE tokenizer (ViT-H-14), reimplemented to run offline.

Reproduces ``open_clip.tokenize`` id for id: ftfy + double HTML unescape, whitespace
collapsed, lower-cased, CLIP pre-tokenization, BPE over the byte-to-unicode alphabet,
``<start_of_text>`` / ``<end_of_text>`` framing, zero padding to the context length.
"""

from __future__ import annotations

import functools
import gzip
import html
import warnings
from importlib import resources
from typing import Sequence

import ftfy
import regex
import torch

from ..errors import FifoStreamError

SOT = "<start_of_text>"
EOT = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # merges are lines 1..48,894 of the vocab file (line 0 is a header)
_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(FifoStreamError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text.strip()).strip().lower()


class ClipTokenizer:
    """Callable tokenizer: ``ClipTokenizer()(texts) -> LongTensor (B, context_length)``.

    The vocabulary is read lazily on first use; BPE results are cached per word.
    """

    def __init__(self, context_length: int = 77, cache_size: int = 100_000):
        self.context_length = context_length
        self._encoder: dict[str, int] | None = None
        self._ranks: dict[tuple[str, str], int] = {}
        self._byte_encoder = _bytes_to_unicode()
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    @property
    def sot_token_id(self) -> int:
        return self._vocab()[SOT]

    @property
    def eot_token_id(self) -> int:
        return self._vocab()[EOT]

    def _vocab(self) -> dict[str, int]:
        if self._encoder is None:
            path = resources.files("fifo_stream") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
            try:
                lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
            except (OSError, EOFError) as e:
                raise TokenizerError(f"cannot read the BPE vocabulary {path} ({e}); reinstall fifo-stream") from None
            merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
            byte_chars = list(self._byte_encoder.values())
            vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
            self._ranks = {m: i for i, m in enumerate(merges)}
            self._encoder = {tok: i for i, tok in enumerate(vocab)}
        return self._encoder

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        if token in (SOT, EOT):
            return (token,)
        word = (*token[:-1], token[-1] + "</w>")
        ranks = self._ranks
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        encoder = self._vocab()
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            piece = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(encoder[t] for t in self._bpe(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Token ids of shape (B, context_length); over-long texts are cut, ending with the end token."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError("prompts must be strings")
        sot, eot = self.sot_token_id, self.eot_token_id
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [sot, *self.encode(text), eot]
            if len(ids) > self.context_length:
                warnings.warn(
                    f"prompt is {len(ids)} tokens, truncated to {self.context_length}: {text[:40]!r}...", stacklevel=2
                )
                ids = ids[: self.context_length]
                ids[-1] = eot
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class WordTokenizer:
    """Whole-word tokenizer over a fixed vocabulary (small models trained on a caption grammar).

    Ids: 0 padding, 1 ``<start_of_text>``, 2 ``<end_of_text>``, then ``vocab`` in order.
    Words outside the vocabulary are refused with a one-line error listing it.
    """

    SPECIALS = ("<pad>", SOT, EOT)

    def __init__(self, vocab: Sequence[str], context_length: int):
        self.vocab = list(vocab)
        self.context_length = context_length
        self._ids = {w: i for i, w in enumerate(self.SPECIALS + tuple(self.vocab))}

    def __len__(self) -> int:
        return len(self._ids)

    def encode(self, text: str) -> list[int]:
        words = regex.findall(r"[\p{L}\p{N}]+", _clean(text))
        unknown = [w for w in words if w not in self._ids]
        if unknown:
            raise TokenizerError(
                f"this model does not know the word(s) {', '.join(repr(w) for w in unknown[:3])}; "
                f"it understands: {' '.join(self.vocab)}"
            )
        return [self._ids[w] for w in words]

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1, *self.encode(text), 2]
            if len(ids) > self.context_length:
                raise TokenizerError(f"prompt has {len(ids) - 2} words; this model takes at most {self.context_length - 2}")
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
