"""Generate videos of the shapes world for a fixed prompt set and measure their consistency.

    python tools/eval_model.py --prompts 20 --frames 256 --out runs/eval
    python tools/eval_model.py --prompts 4 --frames 1024 --out runs/eval-long consistency.qcache.enabled=true

Prompts are drawn without replacement (seeded) from every single-object caption of the
world. Each video goes through a real encoder (fragmented MP4, as users get it) and is
scored by ``tools/eval_consistency.py``; per-prompt reports and a summary (means over
prompts) are written to ``--out`` and the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_consistency  # noqa: E402
from fifo_stream import world  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.pipeline import generate  # noqa: E402
from fifo_stream.outputs.file import FileSink  # noqa: E402

METRICS = ("prompt_accuracy", "color_accuracy", "shape_accuracy", "direction_accuracy", "identity_retention", "longest_identity_loss", "flicker")


def prompt_set(count: int, seed: int = 0) -> list[str]:
    combos = list(itertools.product(world.COLORS, world.SHAPES, world.DIRECTIONS, world.BACKGROUNDS))
    picks = np.random.default_rng(seed).choice(len(combos), size=count, replace=False)
    return [f"a {c} {s} moves {d} on a {b} background" for c, s, d, b in (combos[i] for i in picks)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompt_set(args.prompts, args.seed)):
        video = out / f"{i:02d}.mp4"
        sink = FileSink(video, cfg.video.width, cfg.video.height, cfg.video.fps)
        for frame in generate(model, cfg, prompt, args.frames, seed=args.seed + i, progress=False):
            sink.write(frame)
        sink.close()
        report = eval_consistency.evaluate(eval_consistency.read_frames(video), prompt)
        (out / f"{i:02d}.json").write_text(json.dumps(report) + "\n")
        reports.append(report)
        print(json.dumps({"prompt": prompt, **{k: report[k] for k in METRICS}}), flush=True)
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "prompts": args.prompts,
        "frames": args.frames,
        **{k: float(np.mean([r[k] for r in reports])) for k in METRICS},
        "min_prompt_accuracy": float(min(r["prompt_accuracy"] for r in reports)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
