"""Benchmark FIFO generation: one JSON object per run on stdout (from rank 0 under torchrun).

    python tools/bench.py --config tiny-random --frames 200
    python tools/bench.py --config tiny-random --frames 50 --compare
    python tools/bench.py --config videocrafter2 --frames 20 --peak-tflops 989 --baseline model.weights=random runtime.dtype=bf16
    torchrun --nproc-per-node 8 tools/bench.py --config videocrafter2 --frames 40 --peak-tflops 989 model.weights=random
    python tools/bench.py --frames 30 consistency.refbank.enabled=true          # a consistency control's cost
    python tools/bench.py --frames 30 "storyboard.prompts=[a red circle, '10: a blue square']"

Timing covers the emitted frames only (U-Net ticks plus VAE decode, run as generation runs
them: with runtime.overlap_decode frame k is decoded on a thread while tick k+1 runs);
model loading, the base clip, the warm-up ticks and ``--warmup`` frames (compilation,
CUDA-graph recording) are excluded. Random weights are fine for speed.

MFU = U-Net frame-evaluations per second (all ranks) x --tflop-per-frame-eval / (--peak-tflops x ranks);
the default 0.786 TFLOP is one VideoCrafter2 U-Net forward of one 40x64 latent frame (320x512 px).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream.runs import distributed  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.pipeline import Decoder, FrameStream  # noqa: E402
from fifo_stream.consistency.storyboard import Storyboard  # noqa: E402

PROMPT = "a red circle moves left on a blue background"
# The reference's way of running: one window at a time, separate guidance calls, float32, eager.
BASELINE = ["sampling.mode=sequential", "runtime.dtype=fp32", "runtime.compile=false", "runtime.cuda_graphs=false",
            "runtime.channels_last=false", "runtime.overlap_decode=false"]


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


def run(model, cfg, frames: int, warmup: int, seed: int, args) -> dict:
    prompts = OmegaConf.to_container(cfg.storyboard.prompts)
    stream = FrameStream(model, cfg, Storyboard.parse(prompts, cfg.storyboard.transition) if prompts else PROMPT, seed)
    decoder = Decoder(stream, cfg.runtime.overlap_decode) if distributed.is_main() else None
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        stream.start()
        produce(stream, decoder, warmup)
        calls = {"n": 0, "evals": 0}
        forward = stream.engine.forward

        def counted(x, *rest):
            calls["n"] += 1
            calls["evals"] += x.shape[0] * x.shape[2]
            return forward(x, *rest)

        stream.engine.forward = counted
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        produce(stream, decoder, frames)
        sync()
        elapsed = time.perf_counter() - start
        refbank_mb = stream.refbank.nbytes() / 2**20 if stream.refbank is not None else 0.0
    finally:
        if decoder is not None:
            decoder.close()
        stream.close()
    world = distributed.world_size()
    evals, n_calls = over_ranks([calls["evals"], calls["n"]], dist.ReduceOp.SUM)
    (elapsed,) = over_ranks([elapsed], dist.ReduceOp.MAX)
    result = {
        "config": cfg.model.name,
        "mode": cfg.sampling.mode,
        "ranks": world,
        "frames": frames,
        "s_per_frame": elapsed / frames,
        "frames_per_s": frames / elapsed,
        "unet_calls_per_frame": n_calls / frames,
        "unet_frame_evals_per_frame": evals / frames,
        "unet_frame_evals_per_s": evals / elapsed,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "refbank_mb": round(refbank_mb, 3),
        "latent": list(stream.latent_shape[1:]),
        "f": stream.settings.frames,
        "n": stream.settings.partitions,
        "lookahead": stream.settings.lookahead,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        **{k: bool(cfg.runtime[k]) for k in ("compile", "cuda_graphs", "channels_last", "overlap_decode")},
        "torch": torch.__version__,
    }
    if args.peak_tflops:  # only meaningful where --tflop-per-frame-eval fits the model and size
        result["achieved_tflops"] = evals / elapsed * args.tflop_per_frame_eval
        result["mfu"] = round(result["achieved_tflops"] / (args.peak_tflops * world), 4)
    if cuda:
        (peak,) = over_ranks([torch.cuda.max_memory_allocated() / 2**20], dist.ReduceOp.MAX)
        result["peak_cuda_mb"] = round(peak, 1)  # the largest over ranks
        result["gpu"] = torch.cuda.get_device_name()
    return result


def report(result: dict) -> None:
    if distributed.is_main():
        print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-random")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (compilation, CUDA-graph recording)")
    p.add_argument("--mode", choices=["batched", "sequential"], default=None, help="default: the config's")
    p.add_argument("--compare", action="store_true", help="run batched and sequential and print their ratio")
    p.add_argument("--baseline", action="store_true", help="also run the reference's pattern (sequential, fp32, eager) and print the speedup")
    p.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's peak dense TFLOP/s for the dtype, to report MFU")
    p.add_argument("--tflop-per-frame-eval", type=float, default=0.786, help="U-Net TFLOP per latent frame (default: VideoCrafter2 at 40x64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with distributed.job():
        if (args.compare or args.baseline) and distributed.world_size() > 1:
            p.error("--compare and --baseline run the sequential mode, which runs on one process")
        cfg = load_config(args.config, args.overrides)
        if args.mode:
            cfg.sampling.mode = args.mode
        model = load_model(cfg)
        result = run(model, cfg, args.frames, args.warmup, args.seed, args)
        report(result)
        if args.compare:
            cfg.sampling.mode = "sequential" if cfg.sampling.mode == "batched" else "batched"
            other = run(model, cfg, args.frames, args.warmup, args.seed, args)
            report(other)
            batched, sequential = (result, other) if result["mode"] == "batched" else (other, result)
            report({"compare": "sequential_s_per_frame / batched_s_per_frame", "speedup": round(sequential["s_per_frame"] / batched["s_per_frame"], 3)})
        if args.baseline:
            del model
            base_cfg = load_config(args.config, [*args.overrides, *BASELINE])
            base = run(load_model(base_cfg), base_cfg, args.frames, args.warmup, args.seed, args)
            report({**base, "baseline": True})
            report({"compare": "baseline_s_per_frame / s_per_frame", "speedup": round(base["s_per_frame"] / result["s_per_frame"], 3)})


if __name__ == "__main__":
    main()
