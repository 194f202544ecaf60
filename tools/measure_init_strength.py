"""Measure --init-strength on the embedded model: for world renders of four prompts, the fraction
of the first 8 frames that read as the prompt's object, frame 0's distance to the image's object
(model pixels) and how far the object moves over 16 frames.

    python tools/measure_init_strength.py 0.3 0.5 0.7 0.85 1.0
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fifo_stream import world  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.pipeline import FrameStream, StartClip  # noqa: E402

CASES = [
    ("a magenta square moves left on a white background", 1),
    ("a cyan circle moves right on a black background", 2),
    ("a yellow triangle moves down on a gray background", 3),
    ("a green square moves up on a black background", 4),
]


def centroid(frame: np.ndarray) -> np.ndarray:
    """The object's center in model pixels (the frame shows each one as 2x2); NaN where there is none."""
    found = world.centroid(frame, threshold=60)
    return np.asarray(found) / 2 if found else np.full(2, np.nan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("strengths", nargs="+", type=float)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny")
    model = load_model(cfg)
    shown = lambda a: a.repeat(2, -3).repeat(2, -2)  # noqa: E731  (the model shows its 32x32 frames at 64x64)
    for strength in args.strengths:
        accuracy, distance, moved = [], [], []
        for prompt, seed in CASES:
            scene = world.scene_from_caption(prompt, 32, seed, open_identity=True)  # the embedded model's world (v2: hats)
            image = shown(world.render(scene, 32, 1))[0]
            stream = FrameStream(model, cfg, prompt, seed=seed, start=StartClip(image[None], strength))
            frames = [next(stream) for _ in range(16)]
            stream.close()
            target = (scene.objects[0].color, scene.objects[0].shape)
            accuracy.append(np.mean([world.classify_frame(f) == target for f in frames[:8]]))
            distance.append(np.linalg.norm(centroid(frames[0]) - centroid(image)))
            moved.append(np.linalg.norm(centroid(frames[15]) - centroid(frames[0])))
        print(f"strength {strength}: first-8 accuracy {np.mean(accuracy):.3f} (min {min(accuracy):.3f}), "
              f"frame-0 distance {np.mean(distance):.2f} (max {max(distance):.2f}) px, moved {np.mean(moved):.2f} px over 16 frames")


if __name__ == "__main__":
    main()
