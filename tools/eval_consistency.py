"""Measure prompt accuracy and identity consistency of a video of the shapes world.

    python tools/eval_consistency.py out.mp4 --prompt "a red circle moves left on a black background" --json out.json

Each frame's object body color, shape and hat color are measured with pixel statistics
(``fifo_stream.world.read_frame``). Reported: prompt accuracy (fraction of frames whose
reading matches the color and shape the prompt names), direction accuracy (fraction of frames
moving along the axis of the direction it names: objects bounce off the borders), identity retention (fraction equal to frame 0's in
all three), the longest run of frames that lost frame 0's identity, temporal flicker
(1 - mean |frame_i - frame_(i-1)| / 255), motion (the object's speed in pixels per frame: a
control that holds identity by freezing the video shows here), and for each attribute the prompt leaves open
(the hat; the body color when unnamed): retention (the fraction of frames showing the value the
video starts with, the first one held for 4 frames), changes per 1,000 frames (a new value
held for 4 frames or more), frames until the first change, misread frames. A PNG plot of
each attribute over time is written next to the JSON (or to ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream import world  # noqa: E402

HOLD = 4  # frames a new value must hold to count as a change, not a misread
SPAN = 4  # frames over which motion is measured (a misread or jittering frame averages out)
AXIS_WINDOW = 8  # frames over which the axis of motion is judged: a window of the model, long enough that jitter averages out


def read_frames(path: str | Path) -> list[np.ndarray]:
    """All frames of a video file as uint8 (H, W, 3)."""
    import av

    try:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise SystemExit(f"error: cannot read video {path}: {e}; pass a video file written by fifo-stream") from None


def longest_run(flags: np.ndarray) -> int:
    """The longest run of true flags."""
    return max((length for _, length, flag in runs([bool(f) for f in flags]) if flag), default=0)


def runs(values: list) -> list[tuple[int, int, object]]:
    """(start, length, value) of each run of equal consecutive values."""
    out = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1, v)
        else:
            out.append((i, 1, v))
    return out


def start_value(values: list, hold: int = HOLD) -> object:
    """The value a video starts with: the first one held for ``hold`` consecutive frames (frame 0's
    where none is). Frames before it are misreads, as any shorter departure is: a hat still forming
    in frames 0 and 1 and unreadable there does not make the blue hat of every later frame a change."""
    return next((value for _, length, value in runs(values) if length >= hold), values[0])


def identity(values: list, hold: int = HOLD) -> dict:
    """How well one attribute keeps the value the video starts with (:func:`start_value`).

    A change is a new value (not None) held for ``hold`` or more consecutive frames; shorter
    departures from the value in force are misreads of the evaluator, counted apart.
    """
    started = start_value(values, hold)
    current, changes, first_change, misread = started, 0, None, 0
    for start, length, value in runs(values):
        if value == current:
            continue
        if length >= hold and value is not None:
            current, changes = value, changes + 1
            first_change = start if first_change is None else first_change
        else:
            misread += length
    return {
        "start": started,
        "retention": float(np.mean([v == started for v in values])),
        "changes": changes,
        "changes_per_1000": 1000 * changes / len(values),
        "first_change": first_change,  # None: never changed
        "misread_frames": misread,
    }


def open_identity(readings: list[world.Reading], attrs) -> dict:
    """:func:`identity` of each of ``attrs`` ("color", "hat") over per-frame ``readings``."""
    return {a: identity([getattr(r, a) for r in readings]) for a in attrs}


def speed(centers: list[tuple[float, float] | None], span: int = SPAN) -> float:
    """The object's median speed, pixels per frame, from its per-frame ``centers`` (:func:`world.centroid`;
    None: no object): centroid displacement over ``span`` frames / ``span``."""
    moves = [np.hypot(b[0] - a[0], b[1] - a[1]) / span for a, b in zip(centers, centers[span:]) if a is not None and b is not None]
    return float(np.median(moves)) if moves else 0.0


def along_axis(centers: list[tuple[float, float] | None], direction: str, window: int = AXIS_WINDOW) -> list[bool]:
    """Per frame: does the object move along ``direction``'s axis (horizontal for left and right)? The
    world bounces objects off the borders, so a caption's direction fixes the axis of motion (its
    component is the larger, within 40 degrees) and only the first leg's sign: the path travelled along
    each axis over the ``window`` frames around a frame (absolute steps, so a bounce does not cancel
    them) says which axis it is. Frames with no step read (no object) do not follow."""
    xy = np.array([c if c is not None else (np.nan, np.nan) for c in centers], dtype=np.float64).reshape(-1, 2)
    steps = np.abs(np.diff(xy, axis=0))
    named = 0 if direction in ("left", "right") else 1
    out = []
    for i in range(len(xy)):
        around = steps[max(0, i - window // 2) : i + window // 2]
        read = around[~np.isnan(around).any(axis=1)]
        out.append(bool(len(read)) and read[:, named].sum() > read[:, 1 - named].sum())
    return out


def evaluate(frames: list[np.ndarray], prompt: str) -> dict:
    """Metrics of ``frames`` for a single-object ``prompt``, with per-frame readings.

    Prompt accuracy counts what the prompt names (the shape; the body color unless left
    open). ``open`` holds :func:`identity` for each attribute the prompt leaves open: the hat
    always, the body color when the prompt does not name it.
    """
    pairs, _, direction = world.parse_caption(prompt)
    if len(pairs) != 1:
        raise SystemExit(f"error: the prompt must name exactly one '[color] <shape>' (got {len(pairs)}): {prompt!r}")
    if not frames:
        raise SystemExit("error: the video has no frames")
    readings = [world.read_frame(f) for f in frames]
    centers = [world.centroid(f) for f in frames]
    color, shape = pairs[0]
    color_ok = [color is None or r.color == color for r in readings]
    shape_ok = [r.shape == shape for r in readings]
    lost = np.array([r != readings[0] for r in readings])
    open_attrs = ("hat",) if color else ("color", "hat")
    stack = np.stack(frames).astype(np.float32)
    diffs = np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3)) / 255 if len(frames) > 1 else np.zeros(0)
    return {
        "prompt": prompt,
        "frames": len(frames),
        "prompt_accuracy": float(np.mean(np.logical_and(color_ok, shape_ok))),
        "color_accuracy": float(np.mean(color_ok)) if color else None,
        "shape_accuracy": float(np.mean(shape_ok)),
        # apart from prompt_accuracy: the frames moving along the named direction's axis (None: no direction named)
        "direction_accuracy": float(np.mean(along_axis(centers, direction))) if direction else None,
        "identity_retention": float(1 - lost.mean()),
        "longest_identity_loss": longest_run(lost),
        "flicker": float(1 - diffs.mean()) if len(diffs) else 1.0,
        "speed": speed(centers),
        "first_frame": list(readings[0]),
        "open": open_identity(readings, open_attrs),
        "per_frame": {"readings": [list(r) for r in readings], "diff": [round(float(d), 5) for d in diffs],
                      "centers": [None if c is None else [round(v, 2) for v in c] for c in centers],
                      "backgrounds": [world.read_background(f) for f in frames]},
    }


def plot(report: dict, path: Path) -> None:
    """Each attribute's reading over time (palette colors as colored dots), and the frame differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readings = report["per_frame"]["readings"]
    t = np.arange(len(readings))
    attrs = ("color", "shape", "hat")
    fig, axes = plt.subplots(len(attrs) + 1, 1, figsize=(10, 6), sharex=True)
    for ax, (i, attr) in zip(axes, enumerate(attrs)):
        levels = list(world.SHAPES) if attr == "shape" else list(world.COLORS)
        values = [r[i] for r in readings]
        y = [levels.index(v) if v in levels else -1 for v in values]
        dots = [np.asarray(world.COLORS[v]) / 255 if attr != "shape" and v else (0.3, 0.3, 0.3) for v in values]
        ax.scatter(t, y, c=dots, s=4, marker="s")
        ax.set_yticks(range(-1, len(levels)), ["none", *levels], fontsize=7)
        note = f"retention {report['open'][attr]['retention']:.3f}, {report['open'][attr]['changes']} changes" if attr in report["open"] else "named by the prompt"
        ax.set_ylabel(attr)
        ax.set_title(f"{attr}: {note}", fontsize=8, loc="left")
    axes[0].set_title(f"{report['prompt']}: accuracy {report['prompt_accuracy']:.3f}, identity {report['identity_retention']:.3f}", fontsize=9)
    axes[-1].plot(t[1:], report["per_frame"]["diff"], lw=0.8)
    axes[-1].set_ylabel("frame diff", fontsize=8)
    axes[-1].set_xlabel("frame")
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
    summary = {k: report[k] for k in ("frames", "prompt_accuracy", "identity_retention", "longest_identity_loss", "flicker", "speed")}
    summary["open"] = {a: {k: v for k, v in m.items() if k in ("retention", "changes_per_1000", "first_change")} for a, m in report["open"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
