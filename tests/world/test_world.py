"""The procedural shapes world, its frame classifier and the consistency evaluator."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from fifo_stream import world
from fifo_stream.outputs.file import FileSink

sys.path.insert(0, str(ROOT / "tools"))
import eval_consistency  # noqa: E402

SIZE = 64


def test_render_is_a_pure_function_of_the_seed():
    a = world.render(world.random_scene(SIZE, 7), SIZE, 8)
    b = world.render(world.random_scene(SIZE, 7), SIZE, 8)
    c = world.render(world.random_scene(SIZE, 8), SIZE, 8)
    assert a.shape == (8, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_render_from_a_start_frame_continues_the_same_video():
    scene = world.random_scene(SIZE, 3)
    assert np.array_equal(world.render(scene, SIZE, 12)[5:], world.render(scene, SIZE, 7, start=5))


def test_objects_bounce_and_stay_inside():
    obj = world.WorldObject("square", "red", 10.0, (20.0, 30.0), (-3.0, 1.0))
    path = world.positions(obj, SIZE, 400)
    assert path.min() >= obj.radius - 1e-9 and path.max() <= SIZE - obj.radius + 1e-9
    steps = np.abs(np.diff(path, axis=0))
    assert np.all(steps <= [3.0 + 1e-9, 1.0 + 1e-9])  # never faster than its speed
    assert path[1, 0] < path[0, 0] and path[10, 0] > path[5, 0]  # moves left, bounces, moves right


def test_shape_masks_fill_their_bounding_box_as_designed():
    center = np.array([32.0, 32.0])
    fills = {s: world.shape_mask(s, center, 12.0, SIZE).sum() / 24.0**2 for s in world.SHAPES}
    assert fills["square"] == pytest.approx(1.0, abs=0.05)
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert fills["triangle"] == pytest.approx(0.5, abs=0.04)


def test_captions_follow_the_grammar_and_parse_back():
    for seed in range(40):
        scene = world.random_scene(SIZE, seed, two_objects=0.5)
        pairs, background, direction = world.parse_caption(scene.caption)
        assert pairs == [(o.color, o.shape) for o in scene.objects]
        assert background == scene.background
        assert direction == (scene.objects[0].direction if len(scene.objects) == 1 else None)
        assert set(scene.caption.split()) <= set(world.VOCAB)


def test_scene_from_caption_matches_the_caption():
    scene = world.scene_from_caption("a cyan triangle moves up on a gradient background", SIZE, seed=1)
    (obj,) = scene.objects
    assert (obj.color, obj.shape, obj.direction, scene.background) == ("cyan", "triangle", "up", "gradient")
    with pytest.raises(ValueError, match="names no"):
        world.scene_from_caption("a dog runs", SIZE, seed=1)


def test_classifier_is_accurate_on_rendered_frames():
    hits = total = 0
    for seed in range(120):
        scene = world.random_scene(SIZE, seed, two_objects=0.0)
        obj = scene.objects[0]
        for frame in world.render(scene, SIZE, 9)[::4]:
            hits += world.classify_frame(frame) == (obj.color, obj.shape)
            total += 1
    assert hits / total >= 0.99


def test_classifier_finds_nothing_on_an_empty_background():
    assert world.classify_frame(world.background_image("gradient", SIZE)) == (None, None)


def _encode(path, frames, fps=8):
    sink = FileSink(path, SIZE, SIZE, fps)
    for frame in frames:
        sink.write(frame)
    sink.close()


def test_evaluator_scores_world_videos_after_encoding(tmp_path):
    """Validation of the measurement: real encoded videos of the world score >= 99%."""
    prompts = [
        "a red circle moves left on a black background",
        "a yellow square moves down on a white background",
        "a blue triangle moves right on a gradient background",
        "a magenta circle moves up on a gray background",
    ]
    for i, prompt in enumerate(prompts):
        video = tmp_path / f"{i}.mp4"
        _encode(video, world.render(world.scene_from_caption(prompt, SIZE, seed=i), SIZE, 48))
        report = eval_consistency.evaluate(eval_consistency.read_frames(video), prompt)
        assert report["frames"] == 48
        assert report["prompt_accuracy"] >= 0.99 and report["identity_retention"] >= 0.99
        assert report["longest_identity_loss"] == 0


def test_evaluator_metrics_by_hand():
    good = world.render(world.scene_from_caption("a green square moves left on a black background", SIZE, 0), SIZE, 10)
    bad = world.render(world.scene_from_caption("a red triangle moves left on a black background", SIZE, 0), SIZE, 10)
    frames = [*good[:4], *bad[:3], *good[7:], *bad[:1]]  # 4 right, 3 lost, 3 right, 1 lost
    report = eval_consistency.evaluate(frames, "a green square moves left on a black background")
    assert report["prompt_accuracy"] == pytest.approx(7 / 11)
    assert report["identity_retention"] == pytest.approx(7 / 11)
    assert report["longest_identity_loss"] == 3
    stack = np.stack(frames).astype(np.float64)
    assert report["flicker"] == pytest.approx(1 - np.abs(np.diff(stack, axis=0)).mean() / 255, rel=1e-6)
    still = eval_consistency.evaluate([good[0]] * 3, "a green square moves left on a black background")
    assert still["flicker"] == 1.0


def test_evaluator_cli_writes_json_and_plot(tmp_path):
    prompt = "a cyan circle moves right on a gray background"
    video = tmp_path / "v.mkv"
    _encode(video, world.render(world.scene_from_caption(prompt, SIZE, seed=5), SIZE, 16))
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_consistency.py"), str(video), "--prompt", prompt, "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["frames"] == 16 and report["prompt_accuracy"] == 1.0
    assert json.loads(proc.stdout)["prompt_accuracy"] == 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_consistency.py"), str(tmp_path / "missing.mp4"), "--prompt", prompt, "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0 and bad.stderr.startswith("error: cannot read video") and "Traceback" not in bad.stderr
