"""UNet3D against the original VideoCrafter U-Net (fixture), and the full-size key layout."""

import torch

from conftest import checkpoint_key_shapes
from synthetic import FULL_SIZE, fixture_unet
from fifo_stream.models.attention import AttnProcessor
from fifo_stream.models.checkpoint import UNET_PREFIX, extract, load_weights, read_state_dict
from fifo_stream.models.unet import UNet3D
from fifo_stream.models.unet_blocks import SpatialTransformer, TemporalTransformer

@torch.no_grad()
def test_matches_reference_output(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    out = unet(i["x"], i["timesteps"], i["context"], i["fps"])
    assert out.shape == fx["output"].shape
    assert (out - fx["output"]).abs().max() <= 1e-4


@torch.no_grad()
def test_int_fps_matches_reference(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    out = unet(i["x"], i["timesteps"], i["context"], 28)
    assert (out - fx["extra"]["output_fps_int_28"]).abs().max() <= 1e-4


@torch.no_grad()
def test_per_frame_timesteps_and_context(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    b, _, t, _, _ = i["x"].shape
    per_sample = unet(i["x"], i["timesteps"], i["context"], i["fps"])
    per_frame = unet(i["x"], i["timesteps"][:, None].expand(b, t), i["context"][:, None].expand(b, t, *i["context"].shape[1:]), i["fps"])
    assert (per_frame - per_sample).abs().max() <= 1e-6

    # Distinct per-frame timesteps: frame j must see exactly the embedding of its own timestep.
    ts = torch.linspace(0, 999, b * t).round().long().reshape(b, t)
    emb = unet.embed(ts, i["fps"], b, t)
    for j in (0, t - 1):
        single = unet.embed(ts[:, j], i["fps"], b, 1)
        assert (emb.reshape(b, t, -1)[:, j] - single).abs().max() <= 1e-6 * single.abs().max()
    mixed = unet(i["x"], ts, i["context"], i["fps"])
    assert not torch.allclose(mixed, per_sample)


def test_full_size_layout_on_meta_device():
    with torch.device("meta"):
        unet = UNet3D(**FULL_SIZE)
    expected = extract(checkpoint_key_shapes(), UNET_PREFIX)
    own = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert own == expected
    assert sum(p.numel() for p in unet.parameters()) == 1_413_284_420


def test_attention_layers_are_named_and_replaceable(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    names = [n for n, _ in unet.attention_layers()]
    assert "init_attn.0.transformer_blocks.0.attn1" in names
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, x, context=None, **kwargs):
            calls.append((attn.name, kwargs["probe"], kwargs["timesteps"].tolist()))
            return self.inner(attn, x, context, **kwargs)

    target = names[-1]
    unet.set_attn_processor({target: Recording(unet.attn_processors[target])})
    i = fx["inputs"]
    with torch.no_grad():
        out = unet(i["x"], i["timesteps"], i["context"], i["fps"], attention_kwargs={"probe": 7})
    b, _, t, _, _ = i["x"].shape
    # The caller's attention kwargs reach the processor, with each frame's timestep added.
    assert calls == [(target, 7, i["timesteps"][:, None].expand(b, t).tolist())]
    assert (out - fx["output"]).abs().max() <= 1e-4


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    unet.train()
    i = fx["inputs"]
    x = i["x"][:1]
    grads = []
    for flag in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = flag
        torch.manual_seed(1)  # same dropout masks in both passes
        unet(x, i["timesteps"][:1], i["context"][:1], i["fps"][:1]).square().mean().backward()
        grads.append(unet.out[2].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_temporal_attention_left_out_of_the_full_size_blocks():
    small = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                 num_head_channels=8, context_dim=16, use_linear=True, temporal_conv=True, temporal_length=4)

    def count(unet, cls):
        return sum(isinstance(m, cls) for m in unet.modules())

    default, fewer = UNet3D(**small), UNet3D(**small, temporal_attention_resolutions=[2])
    assert count(default, SpatialTransformer) == count(default, TemporalTransformer) == 7  # 2 encoder, middle, 4 decoder blocks
    # ds 1 (one encoder and two decoder blocks) loses its temporal transformers; ds 2 and the middle block keep theirs
    assert count(fewer, SpatialTransformer) == 7 and count(fewer, TemporalTransformer) == 4
    assert set(fewer.state_dict()) < set(default.state_dict())  # the same names: weights of the full one fit by dropping
    with torch.no_grad():
        out = fewer(torch.randn(1, 4, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out).all()


@torch.no_grad()
def test_guidance_branches_share_the_layers_before_cross_attention(tmp_path):
    unet, fx = fixture_unet(tmp_path)
    i = fx["inputs"]
    x, ts, fps = i["x"], i["timesteps"], i["fps"]
    b, _, t, _, _ = x.shape
    cond, uncond = i["context"], torch.randn_like(i["context"])
    apart = torch.cat([unet(x, ts, cond, fps), unet(x, ts, uncond, fps)])
    rows = {}
    probes = [unet.init_attn, next(m for m in unet.modules() if isinstance(m, SpatialTransformer))]
    hooks = [m.register_forward_pre_hook(lambda m, args: rows.setdefault(m, args[0].shape[0]) and None) for m in probes]
    shared = unet(x, ts, torch.cat([cond, uncond]), fps, branches=2)
    assert shared.shape == apart.shape and (shared - apart).abs().max() <= 1e-5 * apart.abs().max()
    assert [rows[m] for m in probes] == [b * t, 2 * b * t]  # init_attn once per sample, cross-attention per branch

    class Recording:  # a processor of its own before cross-attention may keep per-row state: no sharing there
        def __call__(self, attn, x, context=None, **kwargs):
            assert kwargs["timesteps"].shape == (2 * b, t)
            return AttnProcessor()(attn, x, context, **kwargs)

    unet.set_attn_processor({"init_attn.0.transformer_blocks.0.attn1": Recording()})
    rows.clear()
    custom = unet(x, ts, torch.cat([cond, uncond]), fps, branches=2)
    for h in hooks:
        h.remove()
    assert [rows[m] for m in probes] == [2 * b * t, 2 * b * t]
    assert (custom - apart).abs().max() <= 1e-5 * apart.abs().max()
