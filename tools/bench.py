"""Benchmark FIFO generation: one JSON object per run on stdout (from rank 0 under torchrun).

    python tools/bench.py --config bench-anchor --frames 30                         # one run
    python tools/bench.py --config bench-anchor --frames 12 --pairs 5 --baseline    # vs the reference's call pattern
    python tools/bench.py --config bench-anchor --frames 12 --pairs 5 --compare runtime.dtype=bf16
    python tools/bench.py --config bench-anchor --frames 6 --profile 25                # where the time goes (torch.profiler)
    python tools/bench.py --config tiny --frames 6 --op-times 25                       # the same on a CPU, each op's wall time
    python tools/bench.py --config videocrafter2 --frames 20 --peak-tflops 989 --baseline model.weights=random runtime.dtype=bf16
    torchrun --nproc-per-node 8 tools/bench.py --config videocrafter2 --frames 40 --peak-tflops 989 model.weights=random

Timing covers the emitted frames only (U-Net ticks plus VAE decode, run as generation runs
them); model loading and ``--warmup`` frames (compilation, CUDA-graph recording) are excluded.
Speed does not depend on values: the queue starts from a random base clip, frames are emitted
from the first tick, and random weights are fine.

A comparison runs A and B as ``--pairs`` interleaved pairs (ABBA order, since these machines
drift by +-25% within a minute) and reports the median of A's s/frame / B's: B's speedup.
With ``--baseline`` A is the reference's call pattern (one window per call, separate guidance
calls, fp32, eager, decode inline) and B the config; with ``--compare K=V ...`` A is the config
and B the config plus those overrides.

Each run counts the FLOPs of one tick and one decode (torch's FlopCounterMode) and, on the CPU
or without ``--peak-tflops``, probes this machine's matmul and 3x3-convolution rates in the
run's dtype: ``floor_s_per_frame`` is the frame's matmul FLOPs at the matmul rate plus its
convolution FLOPs at the convolution rate, and ``of_floor`` that floor over the measured time.
MFU (with ``--peak-tflops``) = U-Net FLOP/s over all ranks / (peak x ranks).

On a CPU, ``--op-times`` is the honest breakdown: torch.profiler's per-op overhead made small
ops (GELU, products, copies) look 3-4x slower than they are on this 2-core machine, while the
wall times of the ops, taken one by one, add up to the frames' time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream.runs import distributed  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.pipeline import Decoder, FrameStream  # noqa: E402
from fifo_stream.consistency.storyboard import Storyboard  # noqa: E402

PROMPT = "a red circle moves left on a blue background"
# The reference's way of running: one window at a time, separate guidance calls, float32, eager, decode inline.
BASELINE = ["sampling.mode=sequential", "sampling.max_batch=null", "runtime.dtype=fp32", "runtime.compile=false",
            "runtime.cuda_graphs=false", "runtime.channels_last=false", "runtime.overlap_decode=false"]
CONV_OPS = {"convolution", "_convolution", "convolution_backward"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def over_ranks(values: list[float], op) -> list[float]:
    """``values`` combined over every rank with ``op`` (a torch.distributed ReduceOp)."""
    if distributed.world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def produce(stream: FrameStream, decoder: Decoder | None, frames: int) -> None:
    """Emit ``frames`` frames as the run loop does: frame k is collected after tick k+1 was started."""
    pending = None
    for _ in range(frames):
        z = stream.next_latent()
        if decoder is not None:
            done, pending = pending, decoder.submit(z)
            if done is not None:
                done.result()
    if pending is not None:
        pending.result()


def split_flops(counter: FlopCounterMode) -> tuple[float, float]:
    """(matmul-like, convolution) FLOPs counted by ``counter``."""
    conv = matmul = 0.0
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        if str(op).split(".")[1] in CONV_OPS:
            conv += n
        else:
            matmul += n
    return matmul, conv


def frame_flops(stream: FrameStream) -> dict:
    """FLOPs of one emitted frame: one tick of this rank (U-Net) and one VAE decode, split by kind.

    On a CPU the tick is counted with the math attention backend: the counter does not know the CPU
    flash kernel, and the math form does the same products.
    """
    backend = sdpa_kernel([SDPBackend.MATH]) if stream.model.device.type == "cpu" else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False) as unet:
        z = stream.tick()
    with FlopCounterMode(display=False) as vae:
        stream.decode(z)
    (u_mm, u_conv), (v_mm, v_conv) = split_flops(unet), split_flops(vae)
    return {"unet_mm": u_mm, "unet_conv": u_conv, "vae_mm": v_mm, "vae_conv": v_conv}


def probe_rates(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> tuple[float, float]:
    """This machine's (matmul, 3x3 convolution) rate in FLOP/s for ``dtype``: the best of short repeated runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(8, 64, 64, 64, device=device, dtype=dtype)
    w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype)
    work = [(lambda: a @ b, 2 * n**3), (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * x.numel() * 64 * 9)]
    rates = []
    with torch.no_grad():
        for fn, flops in work:
            fn()
            best, spent = float("inf"), 0.0
            while spent < seconds:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                took = time.perf_counter() - start
                best, spent = min(best, took), spent + took
            rates.append(flops / best)
    return rates[0], rates[1]


class OpTimes(TorchDispatchMode):
    """The wall time of every op this thread runs under it (CPU: ops are synchronous; a decode on its
    own thread is not seen), per op and input shapes."""

    def __init__(self):
        super().__init__()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = (str(func.overloadpacket), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out

    def table(self, rows: int, frames: int) -> str:
        """Per frame: the ops' total, the top ``rows`` ops, then the top ``rows`` (op, input shapes)."""
        by_op: collections.Counter = collections.Counter()
        for (op, _), s in self.seconds.items():
            by_op[op] += s

        def ms(seconds: float) -> str:
            return f"{1000 * seconds / frames:9.2f} ms"

        lines = [f"{ms(sum(by_op.values()))}  all ops, {sum(self.calls.values()) // frames} calls per frame"]
        lines += [f"{ms(s)}  {op}" for op, s in by_op.most_common(rows)]
        lines += ["", "per input shapes:"]
        lines += [f"{ms(s)}  x{self.calls[k] // frames:<4} {k[0]} {list(k[1])}" for k, s in self.seconds.most_common(rows)]
        return "\n".join(lines)


def run(model, cfg, frames: int, warmup: int, seed: int, args) -> dict:
    if args.op_times and model.device.type == "cuda":
        raise SystemExit("error: --op-times times CPU ops one by one (CUDA runs them asynchronously); use --profile on a GPU")
    prompts = OmegaConf.to_container(cfg.storyboard.prompts)
    stream = FrameStream(model, cfg, Storyboard.parse(prompts, cfg.storyboard.transition) if prompts else PROMPT, seed)
    decoder = Decoder(stream, cfg.runtime.overlap_decode) if distributed.is_main() else None
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        b, c, h, w = stream.latent_shape  # a random base clip: the queue's values do not change the speed
        stream.begin(torch.randn((b, c, stream.settings.frames, h, w), device=model.device))  # an anchor's `start` reference too
        produce(stream, decoder, warmup)
        flops = frame_flops(stream)
        calls = {"n": 0, "evals": 0}
        forward = stream.engine.forward

        def counted(x, *rest, **kwargs):
            calls["n"] += 1
            calls["evals"] += x.shape[0] * kwargs.get("branches", 1) * x.shape[2]
            return forward(x, *rest, **kwargs)

        stream.engine.forward = counted
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        activities = [torch.profiler.ProfilerActivity.CPU, *([torch.profiler.ProfilerActivity.CUDA] if cuda else [])]
        profiler = torch.profiler.profile(activities=activities) if args.profile else OpTimes() if args.op_times else contextlib.nullcontext()
        start = time.perf_counter()
        with profiler:
            produce(stream, decoder, frames)
            sync()
        elapsed = time.perf_counter() - start
        if args.profile and distributed.is_main():
            by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(profiler.key_averages(group_by_input_shape=True).table(sort_by=by, row_limit=args.profile), file=sys.stderr, flush=True)
        if args.op_times and distributed.is_main():
            print(profiler.table(args.op_times, frames), file=sys.stderr, flush=True)
        refbank_mb = stream.refbank.nbytes() / 2**20 if stream.refbank is not None else 0.0
    finally:
        if decoder is not None:
            decoder.close()
        stream.close()
    world = distributed.world_size()
    evals, n_calls, unet_flops = over_ranks([calls["evals"], calls["n"], flops["unet_mm"] + flops["unet_conv"]], dist.ReduceOp.SUM)
    (elapsed,) = over_ranks([elapsed], dist.ReduceOp.MAX)
    s_per_frame = elapsed / frames
    result = {
        "config": cfg.model.name,
        "mode": cfg.sampling.mode,
        "ranks": world,
        "frames": frames,
        "s_per_frame": round(s_per_frame, 4),
        "frames_per_s": round(frames / elapsed, 3),
        "unet_calls_per_frame": n_calls / frames,
        "unet_frame_evals_per_frame": evals / frames,
        "unet_frame_evals_per_s": round(evals / elapsed, 2),
        "gflop_per_frame": round((unet_flops + flops["vae_mm"] + flops["vae_conv"]) / 1e9, 2),
        "unet_gflop_per_frame": round(unet_flops / 1e9, 2),
        "achieved_gflops": round((unet_flops + flops["vae_mm"] + flops["vae_conv"]) / s_per_frame / 1e9, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "refbank_mb": round(refbank_mb, 3),
        "latent": list(stream.latent_shape[1:]),
        "f": stream.settings.frames,
        "n": stream.settings.partitions,
        "lookahead": stream.settings.lookahead,
        "max_batch": stream.engine.max_batch,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **{k: bool(cfg.runtime[k]) for k in ("compile", "cuda_graphs", "channels_last")},
        "overlap_decode": decoder.background if decoder is not None else None,
        "torch": torch.__version__,
    }
    if world == 1 and not (cuda and args.peak_tflops):
        mm_rate, conv_rate = probe_rates(model.device, model.dtype)
        floor = (flops["unet_mm"] + flops["vae_mm"]) / mm_rate + (flops["unet_conv"] + flops["vae_conv"]) / conv_rate
        result.update(probe_matmul_gflops=round(mm_rate / 1e9, 1), probe_conv_gflops=round(conv_rate / 1e9, 1),
                      floor_s_per_frame=round(floor, 4), of_floor=round(floor / s_per_frame, 3))
    if args.peak_tflops:
        result["achieved_tflops"] = round(unet_flops / s_per_frame / 1e12, 2)
        result["mfu"] = round(result["achieved_tflops"] / (args.peak_tflops * world), 4)
    if cuda:
        (peak,) = over_ranks([torch.cuda.max_memory_allocated() / 2**20], dist.ReduceOp.MAX)
        result["peak_cuda_mb"] = round(peak, 1)  # the largest over ranks
        result["gpu"] = torch.cuda.get_device_name()
    return result


def report(result: dict) -> None:
    if distributed.is_main():
        print(json.dumps(result), flush=True)


def compare(args, a_overrides: list[str], b_overrides: list[str]) -> None:
    """Interleaved pairs of A and B (ABBA), then the median of A's s/frame over B's."""
    variants = []
    for overrides in (a_overrides, b_overrides):
        cfg = load_config(args.config, overrides)
        variants.append((cfg, load_model(cfg)))
    times: list[list[float]] = [[], []]
    for pair in range(args.pairs):
        for side in (0, 1) if pair % 2 == 0 else (1, 0):
            cfg, model = variants[side]
            result = run(model, cfg, args.frames, args.warmup, args.seed, args)
            report({"side": "AB"[side], "pair": pair, **result})
            times[side].append(result["s_per_frame"])
    ratios = sorted(a / b for a, b in zip(*times))
    report({"a": a_overrides, "b": b_overrides, "a_s_per_frame": statistics.median(times[0]),
            "b_s_per_frame": statistics.median(times[1]), "speedup_b": round(statistics.median(ratios), 3),
            "speedup_b_range": [round(ratios[0], 3), round(ratios[-1], 3)], "pairs": args.pairs})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-random")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (compilation, CUDA-graph recording)")
    p.add_argument("--mode", choices=["batched", "sequential"], default=None, help="default: the config's")
    p.add_argument("--baseline", action="store_true", help="A = the reference's call pattern, B = the config")
    p.add_argument("--compare", nargs="+", metavar="KEY=VALUE", default=None, help="A = the config, B = the config plus these overrides")
    p.add_argument("--pairs", type=int, default=3, help="interleaved A/B pairs of a comparison")
    p.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's peak dense TFLOP/s for the dtype, to report MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print the timed frames' top ROWS ops (by self time, per input shape) to stderr; times include the profiler's overhead")
    p.add_argument("--op-times", type=int, default=0, metavar="ROWS",
                   help="CPU: print the timed frames' top ROWS ops by wall time, per frame, to stderr (the run's s/frame then includes the timing's overhead)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Warm-up ticks cost what the others cost: emit from the first tick.
    overrides = ["sampling.discard_warmup=false", *args.overrides, *([f"sampling.mode={args.mode}"] if args.mode else [])]
    with distributed.job():
        if args.baseline and args.compare:
            p.error("give --baseline or --compare, not both")
        if args.op_times and args.profile:
            p.error("give --profile or --op-times, not both")
        if (args.baseline or args.compare) and distributed.world_size() > 1:
            p.error("comparisons run on one process")
        if args.baseline:
            compare(args, [*overrides, *BASELINE], overrides)
        elif args.compare:
            compare(args, overrides, [*overrides, *args.compare])
        else:
            cfg = load_config(args.config, overrides)
            report(run(load_model(cfg), cfg, args.frames, args.warmup, args.seed, args))


if __name__ == "__main__":
    main()
