"""Fast-path options: they change how the tick runs, not what it computes (beyond a stated rounding)."""


import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from fifo_stream.config import ConfigError, load_config
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.loading import compile_unet, load_model
from fifo_stream.pipeline import Decoder, FrameStream

TOLERANCE = 1e-5  # max |difference| of emitted latents, relative to their max |value|


def latents(overrides, frames=2):
    cfg = load_config("tiny-random", ["sampling.partitions=1", *overrides])
    stream = FrameStream(load_model(cfg), cfg, "a red circle", seed=4)
    try:
        return torch.stack([stream.next_latent() for _ in range(frames)])
    finally:
        stream.close()


def assert_close(a, b, tolerance=TOLERANCE):
    assert (a - b).abs().max() <= tolerance * b.abs().max()


def test_channels_last_computes_the_same_latents():
    model = load_model(load_config("tiny-random", ["runtime.channels_last=true"]))
    conv = model.unet.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # NHWC convolutions are other kernels, which round differently.
    assert_close(latents(["runtime.channels_last=true"]), latents([]), tolerance=1e-4)


def test_compiled_ticks_compute_the_same_latents(monkeypatch):
    # Dynamo traces the U-Net, its Q-cache hooks and processors for real; the eager backend
    # skips inductor's code generation, which takes minutes on a CPU (the GPU test below uses it).
    calls = []
    compile_ = torch.compile

    def eager_compile(*args, **kwargs):
        calls.append(kwargs)
        return compile_(*args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    qcache = ["consistency.qcache.enabled=true", "consistency.qcache.strength_min=0.2"]
    assert_close(latents([*qcache, "runtime.compile=true"]), latents(qcache))
    assert calls == [{"dynamic": False, "mode": None}]


def test_cuda_graphs_need_compile_and_cuda():
    with pytest.raises(ConfigError, match="runtime.compile=true"):
        load_config("tiny-random", ["runtime.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="runtime.overlap_decode"):
        load_config("tiny-random", ["runtime.overlap_decode=1"])
    unet = load_model(load_config("tiny-random", ["runtime.device=cpu"])).unet
    with pytest.raises(FifoStreamError, match="CUDA"):
        compile_unet(unet, cuda_graphs=True)


def relative_rms(a, b):
    return ((a - b).square().mean().sqrt() / b.square().mean().sqrt()).item()


def test_cpu_bf16_ticks_stay_close_to_fp32():
    z, exact = latents(["runtime.dtype=bf16"], frames=3), latents([], frames=3)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    # bf16 keeps 8 bits of mantissa and guidance 12 amplifies the branches' difference: on the
    # random-weight U-Net 3 ticks differ from fp32 by 6-7% RMS (the fused attention kernel gives
    # the same), against about 140% between two seeds.
    assert relative_rms(z, exact) <= 0.1


def test_cpu_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_instructions():
    model = load_model(load_config("tiny-random", ["runtime.dtype=auto"]))
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert model.dtype == (torch.bfloat16 if fast else torch.float32)


def test_decode_overlaps_the_tick_on_cuda_only_unless_told():
    cfg = load_config("tiny-random", [])
    stream = FrameStream(load_model(cfg), cfg, "a red circle", seed=4)
    try:
        z = stream.next_latent()
        for overlap, background in (("auto", False), (True, True), (False, False)):
            decoder = Decoder(stream, overlap)
            try:
                assert decoder.background is background
                assert (decoder.submit(z).result() == stream.decode(z)).all()
            finally:
                decoder.close()
    finally:
        stream.close()


FAULTS = """
import resource, sys
from fifo_stream.config import load_config
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream
cfg = load_config("bench-anchor", ["runtime.keep_freed_memory=" + sys.argv[1], "sampling.discard_warmup=false"])
stream = FrameStream(load_model(cfg), cfg, "a red circle", seed=0)
for _ in range(3):
    stream.decode(stream.next_latent())
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    stream.decode(stream.next_latent())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_so_steady_ticks_do_not_page_fault():
    def median_faults_per_tick(keep):
        run = subprocess.run([sys.executable, "-c", FAULTS, keep], capture_output=True, text=True, check=True, cwd=ROOT)
        return statistics.median(int(n) for n in run.stdout.split())

    kept, default = median_faults_per_tick("true"), median_faults_per_tick("false")
    # glibc's default maps and unmaps each large activation: thousands of faults on every tick
    # (14,000-45,000 measured). Kept, a tick faults only when the heap grows past its old peak,
    # which happens on the odd tick (256-2,560 faults) and settles: the median tick has none.
    assert default > 5000 and kept < default / 20, (kept, default)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["runtime.compile=true"], ["runtime.compile=true", "runtime.cuda_graphs=true"], ["runtime.channels_last=true"]],
                         ids=["compile", "cuda-graphs", "channels-last"])
def test_gpu_fast_path_computes_the_same_latents(extra):
    base = ["runtime.device=cuda", "runtime.dtype=fp32"]
    # TF32 and inductor's fused kernels round differently from eager float32.
    assert_close(latents([*base, *extra], frames=4), latents(base, frames=4), tolerance=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_half_precision_ticks(dtype):
    z = latents(["runtime.device=cuda", f"runtime.dtype={dtype}"], frames=3)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert_close(z, latents(["runtime.device=cuda", "runtime.dtype=fp32"], frames=3), tolerance=0.1)


@pytest.mark.gpu
def test_gpu_ticks_never_wait_for_the_device():
    cfg = load_config("tiny-random", ["runtime.device=cuda", "runtime.compile=true", "runtime.cuda_graphs=true"])
    stream = FrameStream(load_model(cfg), cfg, "a red circle", seed=4)
    for _ in range(3):  # base clip, compilation, CUDA-graph recording
        stream.next_latent()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for _ in range(3):
            stream.next_latent()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        stream.close()
