"""Reference K/V bank: the attention formulas by hand, momentum, fill order by noise level,
no extra U-Net work, equal results for every call pattern, exact state round trip."""

import math

import pytest
import torch

from fifo_stream.config import ConfigError, load_config
from fifo_stream.consistency.refbank import RefBank, spatial_self_attention
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.attention import AttnProcessor
from fifo_stream.models.unet import UNet3D
from fifo_stream.sampling.fifo import FifoEngine, FifoSettings, FrameLayout
from fifo_stream.sampling.schedule import alphas_cumprod
from fifo_stream.sampling.tail_noise import IIDNoise

CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=2, channel_mult=[1, 2],
    num_head_channels=8, context_dim=64, use_linear=True, temporal_conv=True, addition_attention=True, fps_cond=True, temporal_length=8,
)
LATENT = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet3D(**CONFIG).eval().requires_grad_(False)


@pytest.fixture
def bank_of(unet):
    made = []

    def make(**kw):  # one bank on the U-Net at a time: a new one replaces the last
        kw = {"levels": 2, "layers": "all", "dtype": torch.float32, **kw}
        if made:
            made.pop().remove()
        made.append(RefBank(unet, **kw))
        return made[-1]

    yield make
    for bank in made:
        bank.remove()


def layer(unet):
    name = "output_blocks.3.1.transformer_blocks.0.attn1"
    return spatial_self_attention(unet)[name]


def one_tick(bank, attn, x, level=0, frame=0):
    """Run the bank's processor on ``x`` (N, n, C) as one tick of N owner frames, branch 0, at ``level``."""
    n = x.shape[0]
    kwargs = bank.attention_kwargs(FrameLayout(
        branch=torch.zeros(1, dtype=torch.long), batch=torch.zeros(1, dtype=torch.long),
        level=torch.full((1, n), level), owner=torch.ones(1, n, dtype=torch.bool), frame=torch.full((1, n), frame), batch_size=1,
    ))
    out = attn.processor(attn, x, None, **kwargs)
    bank.commit()
    return out


def heads(attn, t):
    return attn.split_heads(t)


def concat_by_hand(attn, x, x_ref, weight=1.0):
    """softmax([q K^T s, q K_ref^T s + log w]) [V; V_ref], then the output projection."""
    q, k, v = (heads(attn, p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
    k_ref, v_ref = heads(attn, attn.to_k(x_ref)), heads(attn, attn.to_v(x_ref))
    s = attn.dim_head**-0.5
    logits = torch.cat([q @ k.transpose(-1, -2) * s, q @ k_ref.transpose(-1, -2) * s + math.log(weight)], -1)
    return attn.to_out(attn.merge_heads(torch.softmax(logits, -1) @ torch.cat([v, v_ref], 2)))


@torch.no_grad()
@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_concat_with_the_frames_own_keys_is_plain_attention(unet, bank_of, weight):
    bank = bank_of(weight=weight)
    attn = layer(unet)
    x = torch.randn(1, 64, attn.to_q.in_features)
    plain = AttnProcessor()(attn, x, None)
    assert torch.equal(one_tick(bank, attn, x), plain)  # empty bank: exactly the plain processor
    # Keys [K; K] and values [V; V]: any weighting of the duplicates is the same average.
    assert (one_tick(bank, attn, x) - plain).abs().max() <= 1e-6


@torch.no_grad()
def test_replace_is_cross_frame_attention(unet, bank_of):
    bank = bank_of(mode="replace")
    attn = layer(unet)
    x_ref, x = torch.randn(2, 1, 64, attn.to_q.in_features)
    one_tick(bank, attn, x_ref)
    out = one_tick(bank, attn, x)
    q, k_ref, v_ref = heads(attn, attn.to_q(x)), heads(attn, attn.to_k(x_ref)), heads(attn, attn.to_v(x_ref))
    expected = torch.softmax(q @ k_ref.transpose(-1, -2) / math.sqrt(attn.dim_head), -1) @ v_ref
    assert (out - attn.to_out(attn.merge_heads(expected))).abs().max() <= 1e-5
    assert not torch.allclose(out, AttnProcessor()(attn, x, None), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("weight", [0.25, 2.5])
def test_reference_logits_get_log_weight(unet, bank_of, weight):
    bank = bank_of(weight=weight)
    attn = layer(unet)
    x_ref, x = torch.randn(2, 1, 64, attn.to_q.in_features)
    one_tick(bank, attn, x_ref)
    out = one_tick(bank, attn, x)
    assert (out - concat_by_hand(attn, x, x_ref, weight)).abs().max() <= 1e-5
    assert not torch.allclose(out, concat_by_hand(attn, x, x_ref), atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("mu", [1.0, 0.0, 0.3])
def test_momentum(unet, bank_of, mu):
    bank = bank_of(momentum=mu, layers=["output_blocks.3"])
    attn = layer(unet)
    name = attn.name
    x1, x2, x3 = torch.randn(3, 1, 64, attn.to_q.in_features)
    k = lambda x: heads(attn, attn.to_k(x))  # noqa: E731
    one_tick(bank, attn, x1, level=1)
    assert torch.equal(bank.keys[name][1], k(x1)[0])
    out = one_tick(bank, attn, x2, level=1)
    # The tick read the bank as it was before it (x1's keys) and updated it afterwards.
    assert (out - concat_by_hand(attn, x2, x1)).abs().max() <= 1e-5
    expected = mu * k(x1)[0] + (1 - mu) * k(x2)[0]
    assert (bank.keys[name][1] - expected).abs().max() <= 1e-6
    if mu == 1.0:
        assert torch.equal(bank.keys[name][1], k(x1)[0])  # fixed reference
    if mu == 0.0:
        assert torch.equal(bank.keys[name][1], k(x2)[0])  # the last frame's
    one_tick(bank, attn, x3, level=0)  # another level does not touch level 1
    assert (bank.keys[name][1] - expected).abs().max() <= 1e-6
    assert bank.filled.tolist() == [True, True, False, False]


# -- in the FIFO engine --------------------------------------------------------------

ALPHAS = alphas_cumprod(1000, 0.00085, 0.012)
_g = torch.Generator().manual_seed(1)
COND, UNCOND = torch.randn(1, 77, 64, generator=_g), torch.randn(1, 77, 64, generator=_g)
LEVELS = 16  # f = 8, n = 2


def make_engine(unet, bank=None, mode="batched", max_batch=None, lookahead=True):
    settings = FifoSettings(frames=8, partitions=2, lookahead=lookahead, eta=1.0)
    engine = FifoEngine(unet, ALPHAS, settings, IIDNoise(LATENT, 2), seed=1, mode=mode, max_batch=max_batch, refbank=bank)
    engine.start_from_clip(torch.randn((1, 4, 8, *LATENT[2:]), generator=torch.Generator().manual_seed(0)))
    return engine


class Probe:
    """Wraps a layer's processor and keeps the input of its last call."""

    def __init__(self, inner):
        self.inner, self.x = inner, None

    def __call__(self, attn, x, context=None, **kwargs):
        self.x = x
        return self.inner(attn, x, context, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("lookahead", [True, False])
def test_each_level_is_filled_by_the_first_frame_at_or_after_the_reference(unet, bank_of, lookahead):
    # The frame at level k during tick T leaves the queue at tick T + k, so level k is first
    # recorded at tick max(0, reference - k).
    reference = 3
    bank = bank_of(levels=LEVELS, reference_tick=reference, layers=["output_blocks.3"])
    engine = make_engine(unet, bank, lookahead=lookahead)
    filled_at = {}
    for tick in range(reference + 2):
        engine.step(COND, UNCOND)
        for level in range(LEVELS):
            if bank.filled[level] and level not in filled_at:
                filled_at[level] = tick
    assert filled_at == {k: max(0, reference - k) for k in range(LEVELS)}
    assert bank.filled.all()  # and the unconditional branch's entries alike


@torch.no_grad()
@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_bank_holds_the_reference_or_the_last_frame(unet, bank_of, mu):
    bank = bank_of(levels=LEVELS, momentum=mu, layers=["output_blocks.3"])
    attn = layer(unet)
    probe = attn.processor = Probe(attn.processor)
    engine = make_engine(unet, bank)
    engine.step(COND, UNCOND)
    assert bank.filled.all()
    first = {k: t.clone() for k, t in bank.keys.items()}
    s, f = engine.settings, engine.settings.frames
    rows_per_branch = len(s.window_starts) * f
    for _ in range(3):
        engine.step(COND, UNCOND)
        for level in (1, 6, 15):
            slot = s.emit_slot + level
            window = max(w for w in s.window_starts if w + f - s.written_per_window <= slot)  # the one writing the slot
            row = s.window_starts.index(window) * f + slot - window
            for branch in (0, 1):
                x = probe.x[branch * rows_per_branch + row][None]
                stored = bank.keys[attn.name][branch * LEVELS + level]
                if mu == 0.0:
                    assert (stored - heads(attn, attn.to_k(x))[0]).abs().max() <= 1e-5
                else:
                    assert torch.equal(stored, first[attn.name][branch * LEVELS + level])


def count_calls(unet):
    calls = []
    return calls, unet.register_forward_pre_hook(lambda _m, args, kw: calls.append(args[0].shape[0] * kw.get("branches", 1)), with_kwargs=True)


@torch.no_grad()
def test_bank_costs_no_extra_unet_calls(unet, bank_of):
    calls, hook = count_calls(unet)
    plain = make_engine(unet)
    for _ in range(3):
        plain.step(COND, UNCOND)
    without = list(calls)
    calls.clear()
    bank = bank_of(levels=LEVELS, momentum=0.5)
    engine = make_engine(unet, bank)
    for _ in range(3):
        engine.step(COND, UNCOND)
    hook.remove()
    assert calls == without == [2 * len(engine.settings.window_starts)] * 3
    assert bank.filled.all() and bank.nbytes() > 0


@torch.no_grad()
def test_batched_sequential_and_max_batch_agree(unet, bank_of):
    runs = {}
    for mode, max_batch in (("batched", None), ("sequential", None), ("batched", 3)):
        bank = bank_of(levels=LEVELS, momentum=0.5, weight=2.0)
        engine = make_engine(unet, bank, mode=mode, max_batch=max_batch)
        runs[mode, max_batch] = torch.stack([engine.step(COND, UNCOND) for _ in range(3)]), bank.state_dict()
    ref, ref_state = runs["batched", None]
    plain = make_engine(unet)
    assert not torch.allclose(torch.stack([plain.step(COND, UNCOND) for _ in range(3)]), ref, atol=1e-3)
    for out, state in runs.values():
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.equal(state["filled"], ref_state["filled"])
        for name, keys in ref_state["keys"].items():
            assert (state["keys"][name] - keys).abs().max() <= 1e-4 * keys.abs().max()


@torch.no_grad()
def test_state_round_trip_continues_identically(unet, bank_of):
    bank = bank_of(levels=LEVELS, momentum=0.5, reference_tick=1)
    engine = make_engine(unet, bank)
    engine.step(COND, UNCOND)
    engine.step(COND, UNCOND)
    state = engine.state_dict()
    assert "refbank" in state and state["refbank"]["filled"].any()
    tail = [engine.step(COND, UNCOND) for _ in range(2)]
    resumed = make_engine(unet, bank_of(levels=LEVELS, momentum=0.5, reference_tick=1))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.step(COND, UNCOND)) for a in tail)
    without = make_engine(unet)
    with pytest.raises(FifoStreamError, match="reference bank"):
        make_engine(unet, bank_of(levels=LEVELS)).load_state_dict(without.state_dict())


def test_layer_selection(unet, bank_of):
    every = spatial_self_attention(unet)
    assert all(".1.transformer_blocks." in n for n in every) and len(every) == 6  # 2 encoder, middle, 3 decoder blocks
    assert bank_of(layers="decoder").layers == [n for n in every if n.startswith("output_blocks.")]
    assert bank_of(layers=["input_blocks.1", "middle_block"]).layers == [n for n in every if n.startswith(("input_blocks.1.", "middle_block."))]
    for bad, message in ((["output_blocks.3.2"], "names no spatial self-attention"), ("some", "unknown")):
        with pytest.raises(FifoStreamError, match=message):
            bank_of(layers=bad)
    with pytest.raises(ConfigError, match="only acts in concat"):
        load_config("tiny-random", ["consistency.refbank.mode=replace", "consistency.refbank.weight=2.0"])
