"""Benchmark FIFO generation: one JSON object per run on stdout.

    python tools/bench.py --config tiny-random --frames 200
    python tools/bench.py --config tiny-random --frames 50 --compare
    python tools/bench.py --config videocrafter2 --frames 20 model.weights=random runtime.dtype=bf16
    python tools/bench.py --frames 30 consistency.refbank.enabled=true          # a consistency control's cost
    python tools/bench.py --frames 30 "storyboard.prompts=[a red circle, '10: a blue square']"

Timing covers the emitted frames only (U-Net ticks plus VAE decode); model loading,
the base clip and the warm-up ticks are excluded. Random weights are fine for speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.model import load_model  # noqa: E402
from fifo_stream.pipeline import FrameStream  # noqa: E402
from fifo_stream.storyboard import Storyboard  # noqa: E402

PROMPT = "a red circle moves left on a blue background"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model, cfg, mode: str, frames: int, seed: int) -> dict:
    cfg.sampling.mode = mode
    calls = {"n": 0, "frames": 0}

    def count(_module, args):
        calls["n"] += 1
        calls["frames"] += args[0].shape[0] * args[0].shape[2]

    prompts = OmegaConf.to_container(cfg.storyboard.prompts)
    prompt = Storyboard.parse(prompts, cfg.storyboard.transition) if prompts else PROMPT
    stream = FrameStream(model, cfg, prompt, seed)
    stream.start()
    next(stream)  # first frame: after the warm-up ticks
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hook = model.unet.register_forward_pre_hook(count)
    sync()
    start = time.perf_counter()
    for _ in range(frames):
        next(stream)
    sync()
    elapsed = time.perf_counter() - start
    hook.remove()
    refbank_mb = stream.refbank.nbytes() / 2**20 if stream.refbank is not None else 0.0
    stream.close()
    result = {
        "config": cfg.model.name,
        "mode": mode,
        "frames": frames,
        "s_per_frame": elapsed / frames,
        "frames_per_s": frames / elapsed,
        "unet_calls_per_frame": calls["n"] / frames,
        "unet_frame_evals_per_frame": calls["frames"] / frames,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "refbank_mb": round(refbank_mb, 3),
        "latent": list(stream.latent_shape[1:]),
        "f": stream.settings.frames,
        "n": stream.settings.partitions,
        "lookahead": stream.settings.lookahead,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    if model.device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-random")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--mode", choices=["batched", "sequential"], default=None, help="default: the config's")
    p.add_argument("--compare", action="store_true", help="run batched and sequential and print their ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg)
    modes = ["batched", "sequential"] if args.compare else [args.mode or cfg.sampling.mode]
    results = {}
    for mode in modes:
        results[mode] = run(model, cfg, mode, args.frames, args.seed)
        print(json.dumps(results[mode]), flush=True)
    if args.compare:
        ratio = results["sequential"]["s_per_frame"] / results["batched"]["s_per_frame"]
        print(json.dumps({"compare": "sequential_s_per_frame / batched_s_per_frame", "speedup": round(ratio, 3)}), flush=True)


if __name__ == "__main__":
    main()
