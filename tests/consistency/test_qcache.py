"""Q-cache exact math on the fixture U-Net: v = 0 is the plain model; the blend is Q* = (1 - v) Q_dec + v Q_enc."""

import pytest
import torch
import torch.nn.functional as F

from fifo_stream.consistency.qcache import DEFAULT_PAIRS, BlendQueryProcessor, QCache, temporal_self_attention
from fifo_stream.models.unet import UNet3D
from synthetic import FULL_SIZE, fixture_unet


def pairs_for(unet):
    """Pair every decoder temporal attention with the deepest encoder block of the same width and resolution."""
    enc = [i for i in range(len(unet.input_blocks)) if temporal_self_attention(unet, "input_blocks", i) is not None]
    dec = [i for i in range(len(unet.output_blocks)) if temporal_self_attention(unet, "output_blocks", i) is not None]
    width = lambda blocks, i: temporal_self_attention(unet, blocks, i).to_q.out_features  # noqa: E731
    return {d: max(e for e in enc if width("input_blocks", e) == width("output_blocks", d)) for d in dec}


@torch.no_grad()
def test_zero_strength_is_bit_identical(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    plain = unet(i["x"], i["timesteps"], i["context"], i["fps"])
    cache = QCache(unet, pairs_for(unet), strength=0.0)
    assert torch.equal(unet(i["x"], i["timesteps"], i["context"], i["fps"]), plain)
    cache.remove()
    assert torch.equal(unet(i["x"], i["timesteps"], i["context"], i["fps"]), plain)


@pytest.mark.parametrize("strength", [1.0, 0.3])
@torch.no_grad()
def test_decoder_query_is_the_blend_computed_by_hand(tmp_path, strength):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    cache = QCache(unet, pairs_for(unet), strength=strength)
    checked = []

    class Probe:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, x, context=None, **kwargs):
            out = self.inner(attn, x, context, **kwargs)
            q_dec, k, v = self.inner.project(attn, x, x)
            q_enc = kwargs["shared"]["qcache", self.inner.block]
            q = (1 - strength) * q_dec + strength * q_enc
            expected = attn.to_out(attn.merge_heads(F.scaled_dot_product_attention(q, k, v)))
            assert (out - expected).abs().max() <= 1e-5
            if strength == 1.0:
                assert not torch.allclose(q_dec, q_enc)
            checked.append(attn.name)
            return out

    unet.set_attn_processor({n: Probe(p) for n, p in unet.attn_processors.items() if isinstance(p, BlendQueryProcessor)})
    plain_free = unet(i["x"], i["timesteps"], i["context"], i["fps"])
    assert len(checked) == len(pairs_for(unet))
    cache.remove()
    assert not torch.allclose(plain_free, unet(i["x"], i["timesteps"], i["context"], i["fps"]))


def test_strength_follows_each_frames_noise_level(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    cache = QCache(unet, pairs_for(unet), strength=0.9, strength_min=0.1)
    b, _, t, _, _ = fx["inputs"]["x"].shape
    ts = torch.linspace(0, 999, t).round().long().expand(b, t)
    w = cache.weight(ts, torch.zeros(1)).reshape(b, t)
    assert torch.allclose(w[:, 0], torch.tensor(0.1)) and torch.allclose(w[:, -1], torch.tensor(0.9))
    assert torch.allclose(w, 0.1 + 0.8 * ts / 999.0)


def test_default_pairing_fits_the_full_size_layout():
    with torch.device("meta"):
        unet = UNet3D(**FULL_SIZE)
    cache = QCache(unet)
    assert len(cache.layers) == len(DEFAULT_PAIRS) + len(set(DEFAULT_PAIRS.values()))


def test_bad_pairs_are_refused(tmp_path):
    unet, _ = fixture_unet(tmp_path)
    with pytest.raises(Exception, match="no temporal attention"):
        QCache(unet, {3: 8})
