"""Measure prompt accuracy and identity consistency of a video of the shapes world.

    python tools/eval_consistency.py out.mp4 --prompt "a red circle moves left on a black background" --json out.json

Each frame's object color and shape are measured with pixel statistics
(``fifo_stream.world.classify_frame``). Reported: prompt accuracy (fraction of frames
whose classes match the prompt), identity retention (fraction equal to frame 0's),
the longest run of frames that lost frame 0's identity, and temporal flicker
(1 - mean |frame_i - frame_(i-1)| / 255). A PNG plot over time is written next to
the JSON (or to ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream import world  # noqa: E402


def read_frames(path: str | Path) -> list[np.ndarray]:
    """All frames of a video file as uint8 (H, W, 3)."""
    import av

    try:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise SystemExit(f"error: cannot read video {path}: {e}; pass a video file written by fifo-stream") from None


def longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def evaluate(frames: list[np.ndarray], prompt: str) -> dict:
    """Consistency metrics of ``frames`` for a single-object ``prompt``, with per-frame classes."""
    pairs, _, _ = world.parse_caption(prompt)
    if len(pairs) != 1:
        raise SystemExit(f"error: the prompt must name exactly one '<color> <shape>' (got {len(pairs)}): {prompt!r}")
    if not frames:
        raise SystemExit("error: the video has no frames")
    classes = [world.classify_frame(f) for f in frames]
    target = pairs[0]
    correct = np.array([c == target for c in classes])
    lost = np.array([c != classes[0] for c in classes])
    stack = np.stack(frames).astype(np.float32)
    diffs = np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3)) / 255 if len(frames) > 1 else np.zeros(0)
    return {
        "prompt": prompt,
        "frames": len(frames),
        "prompt_accuracy": float(correct.mean()),
        "color_accuracy": float(np.mean([c[0] == target[0] for c in classes])),
        "shape_accuracy": float(np.mean([c[1] == target[1] for c in classes])),
        "identity_retention": float(1 - lost.mean()),
        "longest_identity_loss": longest_run(lost),
        "flicker": float(1 - diffs.mean()) if len(diffs) else 1.0,
        "first_frame_classes": list(classes[0]),
        "per_frame": {"classes": [list(c) for c in classes], "diff": [round(float(d), 5) for d in diffs]},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, _, _ = world.parse_caption(report["prompt"])
    classes = report["per_frame"]["classes"]
    t = np.arange(len(classes))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
    top.step(t, [c[0] == pairs[0][0] for c in classes], where="mid", label="color matches prompt")
    top.step(t, [0.96 * (c[1] == pairs[0][1]) for c in classes], where="mid", label="shape matches prompt")
    top.step(t, [0.92 * (c == classes[0]) for c in classes], where="mid", label="same as frame 0")
    top.set_yticks([0, 1], ["no", "yes"])
    top.legend(loc="lower left", fontsize=8)
    top.set_title(f"{report['prompt']}: accuracy {report['prompt_accuracy']:.3f}, identity {report['identity_retention']:.3f}")
    bottom.plot(t[1:], report["per_frame"]["diff"], lw=0.8)
    bottom.set_ylabel("|frame_i - frame_i-1| / 255")
    bottom.set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video")
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--plot", default=None, help="PNG plot over time (default: the JSON path with .png)")
    args = p.parse_args(argv)
    report = evaluate(read_frames(args.video), args.prompt)
    out = Path(args.json)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    summary = {k: report[k] for k in ("frames", "prompt_accuracy", "identity_retention", "longest_identity_loss", "flicker")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
