"""The FIFO engine against the official FIFO-Diffusion loop (fixture), plus state and call-count checks."""


import pytest
import torch

from conftest import load_fixture
from fifo_stream.models.checkpoint import UNET_PREFIX, extract, load_weights, read_state_dict
from fifo_stream.sampling.fifo import FifoEngine, FifoSettings
from fifo_stream.sampling.tail_noise import IIDNoise
from fifo_stream.sampling.schedule import alphas_cumprod
from fifo_stream.models.unet import UNet3D


class RecordedNoise:
    """Replays a recorded stream of tail latents (T, b, c, h, w), e.g. a reference run's."""

    def __init__(self, noises: torch.Tensor):
        self.noises = noises
        self.index = 0

    def __call__(self) -> torch.Tensor:
        if self.index >= len(self.noises):
            raise IndexError(f"recorded noise exhausted after {len(self.noises)} latents")
        self.index += 1
        return self.noises[self.index - 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    fifo = load_fixture("fifo_oracle.pt")
    unet_fx = load_fixture("videocrafter_unet_oracle.pt")
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": unet_fx["state_dict"]}, path)
    unet = UNet3D(**fifo["unet_config"]).eval()
    load_weights(unet, extract(read_state_dict(path), UNET_PREFIX), "U-Net")
    sched = fifo["schedule"]
    alphas = alphas_cumprod(sched["num_train_timesteps"], sched["linear_start"], sched["linear_end"])
    return fifo, unet, alphas


def settings_of(fifo, variant, **overrides):
    kw = dict(frames=variant["f"], partitions=variant["n"], lookahead=variant["lookahead"],
              guidance_scale=fifo["guidance_scale"], eta=fifo["eta"], fps=fifo["fps"])
    kw.update(overrides)
    return FifoSettings(**kw)


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls, self.rows = unet, 0, []

    def forward(self, x, t, c, fps, attention_kwargs=None, branches=1):
        self.calls += 1
        self.rows.append(x.shape[0] * branches)
        return self.unet(x, t, c, fps, attention_kwargs, branches)


@pytest.mark.parametrize("variant", ["lookahead", "no_lookahead"])
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_matches_reference_loop(oracle, variant, mode):
    fifo, unet, alphas = oracle
    v = fifo["variants"][variant]
    engine = FifoEngine(unet, alphas, settings_of(fifo, v), RecordedNoise(v["tail_noises"]), mode=mode)
    assert engine.slot_timesteps.tolist() == v["slot_timesteps"]
    assert engine.slot_levels.tolist() == v["slot_ddim_indices"]
    assert engine.settings.emit_slot == v["emitted_slot"]
    assert engine.settings.queue_length == v["queue_len"]
    engine.start_from_queue(v["initial_queue"])
    for k in range(v["num_ticks"]):
        out = engine.step(fifo["cond"], fifo["uncond"])
        ref = v["emitted"][k]
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), f"tick {k}"
        if k == 0:
            assert (engine.queue - v["queue_after_tick1_shifted"]).abs().max() <= 1e-4 * v["queue_after_tick1_shifted"].abs().max()


def test_one_unet_call_per_tick_and_max_batch(oracle):
    fifo, unet, alphas = oracle
    v = fifo["variants"]["lookahead"]
    windows = len(settings_of(fifo, v).window_starts)
    # a call runs both branches of its windows: max_batch 3 fits one window's two rows
    for max_batch, calls_per_tick in ((None, 1), (3, windows), (1, 2 * windows)):
        counting = CountingUNet(unet)
        engine = FifoEngine(counting, alphas, settings_of(fifo, v), RecordedNoise(v["tail_noises"]), max_batch=max_batch)
        engine.start_from_queue(v["initial_queue"])
        for _ in range(2):
            engine.step(fifo["cond"], fifo["uncond"])
        assert counting.calls == 2 * calls_per_tick
        assert max(counting.rows) <= (max_batch or 2 * windows)
    counting = CountingUNet(unet)
    engine = FifoEngine(counting, alphas, settings_of(fifo, v), RecordedNoise(v["tail_noises"]), mode="sequential")
    engine.start_from_queue(v["initial_queue"])
    engine.step(fifo["cond"], fifo["uncond"])
    assert counting.calls == 2 * windows


def run_eta(oracle, mode, seed, ticks, restore_at=None):
    fifo, unet, alphas = oracle
    v = fifo["variants"]["lookahead"]
    s = settings_of(fifo, v, eta=1.0)
    shape = v["tail_noises"].shape[1:]
    engine = FifoEngine(unet, alphas, s, IIDNoise(shape, seed + 1), seed=seed, mode=mode)
    engine.start_from_clip(fifo["base_video_latents"])
    outs = []
    for k in range(ticks):
        if k == restore_at:
            state = engine.state_dict()
            engine = FifoEngine(unet, alphas, s, IIDNoise(shape, 999), seed=999, mode=mode)
            engine.load_state_dict(state)
        outs.append(engine.step(fifo["cond"], fifo["uncond"]))
    return torch.stack(outs)


def test_eta_runs_reproducible_and_resumable(oracle):
    a = run_eta(oracle, "batched", seed=7, ticks=4)
    b = run_eta(oracle, "batched", seed=7, ticks=4)
    assert torch.equal(a, b)
    resumed = run_eta(oracle, "batched", seed=7, ticks=4, restore_at=2)
    assert torch.equal(a, resumed)
    other = run_eta(oracle, "batched", seed=8, ticks=4)
    assert not torch.allclose(a, other)
    seq = run_eta(oracle, "sequential", seed=7, ticks=4)
    assert (seq - a).abs().max() <= 1e-4 * a.abs().max()


def test_start_from_clip_places_frames_at_staggered_levels(oracle):
    fifo, unet, alphas = oracle
    v = fifo["variants"]["lookahead"]
    s = settings_of(fifo, v)
    engine = FifoEngine(unet, alphas, s, RecordedNoise(v["tail_noises"]), seed=3)
    clip = fifo["base_video_latents"]
    engine.start_from_clip(clip)
    eps = torch.randn(engine.queue.shape, generator=torch.Generator().manual_seed(3))
    for slot in (0, s.emit_slot, s.queue_length - 1):
        level = v["slot_ddim_indices"][slot]
        a = alphas[v["ddim_timesteps"][level]].float()
        frame = max(0, slot - (s.queue_length - s.steps) - (s.steps - s.frames)) if slot >= s.queue_length - s.steps else 0
        expected = a.sqrt() * clip[:, :, frame] + (1 - a).sqrt() * eps[:, :, slot]
        assert torch.allclose(engine.queue[:, :, slot], expected, atol=1e-6)


def test_state_from_other_settings_is_refused(oracle):
    fifo, unet, alphas = oracle
    v = fifo["variants"]["lookahead"]
    engine = FifoEngine(unet, alphas, settings_of(fifo, v), RecordedNoise(v["tail_noises"]))
    engine.start_from_queue(v["initial_queue"])
    other = FifoEngine(unet, alphas, settings_of(fifo, v, guidance_scale=3.0), RecordedNoise(v["tail_noises"]))
    with pytest.raises(Exception, match="guidance_scale"):
        other.load_state_dict(engine.state_dict())
