"""The procedural shapes world, its frame classifier and the consistency evaluator."""

import dataclasses
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
    obj = world.WorldObject("square", "red", 10.0, (20.0, 30.0), (-3.0, 1.0), "blue")
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


def test_object_mask_is_where_render_draws_the_objects():
    hatted = world.WorldObject("triangle", "red", 12.0, (20.0, 40.0), (2.0, -1.0), "blue")
    plain = world.WorldObject("circle", "green", 9.0, (44.0, 20.0), (-1.0, 2.0), None)
    scene = world.Scene((hatted, plain), "black")
    drawn = (world.render(scene, SIZE, 6, start=3) != world.background_image("black", SIZE)).any(-1)
    mask = world.object_mask(scene, SIZE, 6, start=3)
    assert mask.shape == (6, SIZE, SIZE) and np.array_equal(mask, drawn) and mask.any()
    hats = world.object_mask(scene, SIZE, 6, start=3, hats=True)
    blue = np.all(world.render(scene, SIZE, 6, start=3) == world.COLORS["blue"], axis=-1)
    assert np.array_equal(hats, blue) and hats.any()


@pytest.mark.parametrize("open_identity", [False, True], ids=["v1", "v2"])
def test_captions_follow_the_grammar_and_parse_back(open_identity):
    for seed in range(40):
        scene = world.random_scene(SIZE, seed, two_objects=0.5, open_identity=open_identity)
        pairs, background, direction = world.parse_caption(scene.caption)
        assert pairs == [(o.color if o.color_named else None, o.shape) for o in scene.objects]
        assert background == scene.background
        assert direction == (scene.objects[0].direction if len(scene.objects) == 1 else None)
        assert set(scene.caption.split()) <= set(world.VOCAB)


def test_world_v1_names_every_color_and_has_no_hats():
    objects = [o for seed in range(200) for o in world.random_scene(SIZE, seed, two_objects=0.5).objects]
    assert all(o.color_named and o.hat is None for o in objects)
    assert world.scene_from_caption("a red square moves up on a gray background", SIZE, 3).objects[0].hat is None
    v2 = world.random_scene(SIZE, 3, open_identity=True)
    assert v2.objects[0].hat is not None and v2.background in world.BACKGROUNDS


def test_a_third_of_captions_leave_the_body_color_open_and_none_names_the_hat():
    objects = [o for seed in range(600) for o in world.random_scene(SIZE, seed, two_objects=0.5, open_identity=True).objects]
    open_fraction = np.mean([not o.color_named for o in objects])
    assert abs(open_fraction - world.OPEN_COLOR) < 0.05
    assert all(o.hat != o.color and o.hat in world.COLORS for o in objects)
    assert len({o.hat for o in objects}) == len(world.COLORS)
    for seed in range(40):
        scene = world.random_scene(SIZE, seed, two_objects=0.5, open_identity=True)
        words = scene.caption.split()
        for o in scene.objects:
            assert (o.color in words) == o.color_named or any(p.color == o.color for p in scene.objects if p is not o)
            assert o.hat not in words or any(p.color == o.hat and p.color_named for p in scene.objects)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_hat_is_the_top_third_of_the_object_and_stays_for_the_clip(shape):
    obj = world.WorldObject(shape, "red", 12.0, (32.0, 32.0), (1.0, 0.0), "blue")
    frames = world.render(world.Scene((obj,), "black"), SIZE, 6)
    for frame in frames:
        blue = np.all(frame == world.COLORS["blue"], axis=2)
        red = np.all(frame == world.COLORS["red"], axis=2)
        assert blue.sum() / (blue.sum() + red.sum()) == pytest.approx(1 / 3, abs=0.04)
        assert np.nonzero(blue.any(axis=1))[0].max() < np.nonzero(red.any(axis=1))[0].min()
        assert world.read_frame(frame) == ("red", shape, "blue")


def test_scene_from_caption_leaves_an_open_color_to_the_seed():
    caption = "a circle moves right on a black background"
    scenes = [world.scene_from_caption(caption, SIZE, seed, open_identity=True) for seed in range(30)]
    assert all(s.objects[0].shape == "circle" and not s.objects[0].color_named and s.caption == caption for s in scenes)
    assert len({s.objects[0].color for s in scenes}) == len(world.COLORS)
    two = world.scene_from_caption("a square and a red circle move on a gray background", SIZE, 2)
    assert [o.color_named for o in two.objects] == [False, True] and two.objects[0].color != "red"


def test_scene_from_caption_matches_the_caption():
    scene = world.scene_from_caption("a cyan triangle moves up on a gradient background", SIZE, seed=1)
    (obj,) = scene.objects
    assert (obj.color, obj.shape, obj.direction, scene.background) == ("cyan", "triangle", "up", "gradient")
    with pytest.raises(ValueError, match="names no"):
        world.scene_from_caption("a dog runs", SIZE, seed=1)


def _single_object_frames(scenes: int):
    """Frames 0, 4 and 8 of ``scenes`` random one-object scenes (half of world v1, half of v2), with each frame's object."""
    frames, objects = [], []
    for seed in range(scenes):
        scene = world.random_scene(SIZE, seed, two_objects=0.0, open_identity=seed % 2 == 1)
        for frame in world.render(scene, SIZE, 9)[::4]:
            frames.append(frame)
            objects.append(scene.objects[0])
    return frames, objects


def _reading_accuracy(frames, objects) -> dict[str, float]:
    readings = [world.read_frame(f) for f in frames]
    return {attr: float(np.mean([getattr(r, attr) == getattr(o, attr) for r, o in zip(readings, objects)])) for attr in ("color", "shape", "hat")}


def test_reader_is_accurate_on_rendered_frames():
    accuracy = _reading_accuracy(*_single_object_frames(150))
    assert min(accuracy.values()) >= 0.99, accuracy


def test_reader_is_accurate_after_a_libx264_encode(tmp_path):
    frames, objects = _single_object_frames(150)
    _encode(tmp_path / "v.mp4", frames)
    accuracy = _reading_accuracy(eval_consistency.read_frames(tmp_path / "v.mp4"), objects)
    assert min(accuracy.values()) >= 0.99, accuracy


def _soft(frame: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """``frame`` as the embedded model draws it: averaged to its 32x32 working size, blurred (Gaussian
    ``sigma`` there, about the model's softness at edges) and shown at 64x64 again."""
    x = frame.astype(np.float32).reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean((1, 3))
    k = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        x = np.apply_along_axis(lambda v: np.convolve(np.pad(v, 3, mode="edge"), k, "valid"), axis, x)
    return np.repeat(np.repeat(x, 2, 0), 2, 1).round().clip(0, 255).astype(np.uint8)


def test_reader_reads_soft_edges_as_the_color_over_its_background():
    """A soft edge blends the object's color with the background: a red hat's rim on white is pink,
    nearer magenta than red. Read by the nearest palette color alone, 0.81 of these hats and 0.90 of
    the bodies read right; the reader takes the color whose blend with the background the pixel is."""
    frames, objects = [], []
    for seed in range(150):  # every scene on white and on black, with a red hat (a magenta one on a red body)
        obj = world.random_scene(SIZE, seed, two_objects=0.0, open_identity=True).objects[0]
        obj = dataclasses.replace(obj, hat="magenta" if obj.color == "red" else "red")
        for background in ("white", "black"):
            frames.append(_soft(world.render(world.Scene((obj,), background), SIZE, 1)[0]))
            objects.append(obj)
    accuracy = _reading_accuracy(frames, objects)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_classifier_finds_nothing_on_an_empty_background():
    assert world.read_frame(world.background_image("gradient", SIZE)) == (None, None, None)


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
        assert report["direction_accuracy"] >= 0.99
        assert report["longest_identity_loss"] == 0


def test_evaluator_metrics_by_hand():
    good = world.render(world.scene_from_caption("a green square moves left on a black background", SIZE, 0), SIZE, 10)
    bad = world.render(world.scene_from_caption("a red triangle moves left on a black background", SIZE, 0), SIZE, 10)
    frames = [*good[:4], *bad[:3], *good[7:], *bad[:1]]  # 4 right, 3 lost, 3 right, 1 lost
    report = eval_consistency.evaluate(frames, "a green square moves left on a black background")
    assert report["prompt_accuracy"] == pytest.approx(7 / 11)
    assert report["identity_retention"] == pytest.approx(7 / 11)
    assert report["longest_identity_loss"] == 3
    left = eval_consistency.evaluate(list(good), "a green square moves left on a black background")
    across = eval_consistency.evaluate(list(good), "a green square moves up on a black background")  # it moves left
    assert left["direction_accuracy"] == 1.0 and across["direction_accuracy"] == 0.0
    assert across["prompt_accuracy"] == left["prompt_accuracy"] == 1.0  # the direction is scored apart
    stack = np.stack(frames).astype(np.float64)
    assert report["flicker"] == pytest.approx(1 - np.abs(np.diff(stack, axis=0)).mean() / 255, rel=1e-6)
    still = eval_consistency.evaluate([good[0]] * 3, "a green square moves left on a black background")
    assert still["flicker"] == 1.0


def test_speed_is_the_objects_pixels_per_frame_and_zero_for_a_frozen_video():
    for seed in range(4):  # 8 frames: too few for a bounce to shorten the path much
        scene = world.scene_from_caption("a blue circle moves right on a white background", SIZE, seed)
        frames = list(world.render(scene, SIZE, 8))
        centers = world.positions(scene.objects[0], SIZE, 8)
        truth = np.median(np.hypot(*(centers[4:] - centers[:4]).T) / 4)
        read = [world.centroid(f) for f in frames]
        assert eval_consistency.speed(read) == pytest.approx(truth, abs=0.15)
        assert eval_consistency.speed([read[0]] * 8) == 0.0
    assert eval_consistency.speed([world.centroid(np.zeros((SIZE, SIZE, 3), np.uint8))] * 8) == 0.0  # no object: nothing moves


@pytest.mark.parametrize("direction", world.DIRECTIONS)
def test_along_axis_follows_the_named_direction_through_bounces(direction):
    for seed in range(4):  # 600 frames: many bounces, each reversing the named component
        scene = world.scene_from_caption(f"a square moves {direction} on a gray background", SIZE, seed, open_identity=True)
        centers = [world.centroid(f) for f in world.render(scene, SIZE, 600)]
        assert np.mean(eval_consistency.along_axis(centers, direction)) >= 0.99
        other = {"left": "up", "right": "down", "up": "left", "down": "right"}[direction]
        assert np.mean(eval_consistency.along_axis(centers, other)) <= 0.01
        assert not any(eval_consistency.along_axis([centers[0]] * 20, direction))  # frozen: no axis
    assert not any(eval_consistency.along_axis([None] * 20, direction))  # no object


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
    assert report["frames"] == 16 and report["prompt_accuracy"] == 1.0 and report["open"]["hat"]["changes"] == 0
    assert json.loads(proc.stdout)["prompt_accuracy"] == 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_consistency.py"), str(tmp_path / "missing.mp4"), "--prompt", prompt, "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0 and bad.stderr.startswith("error: cannot read video") and "Traceback" not in bad.stderr


def test_identity_counts_held_changes_not_misreads():
    values = ["red"] * 10 + ["blue"] * 2 + ["red"] * 5 + [None] * 6 + ["red"] * 3 + ["green"] * 4 + ["red"] * 4
    m = eval_consistency.identity(values)
    assert m["start"] == "red" and m["retention"] == pytest.approx(22 / 34)
    assert m["changes"] == 2 and m["first_change"] == 26  # to green at 26, back to red at 30
    assert m["misread_frames"] == 2 + 6  # the 2-frame blue and the unreadable frames
    assert m["changes_per_1000"] == pytest.approx(2000 / 34)
    still = eval_consistency.identity(["red"] * 3 + ["blue"] * 3 + ["red"] * 3)
    assert still["changes"] == 0 and still["first_change"] is None and still["misread_frames"] == 3
    forming = eval_consistency.identity([None, None, "blue", "blue", "cyan"] + ["blue"] * 10 + ["cyan"] * 4 + ["blue"] * 4)
    assert forming["start"] == "blue" and forming["retention"] == pytest.approx(16 / 23)
    assert forming["misread_frames"] == 3 and forming["changes"] == 2 and forming["first_change"] == 15  # frames 0-1 unreadable: misreads


def test_evaluator_reports_the_open_attributes(tmp_path):
    obj = world.WorldObject("circle", "yellow", 12.0, (20.0, 30.0), (1.0, 0.0), "red", color_named=False)
    later = world.WorldObject("circle", "yellow", 12.0, (20.0, 30.0), (1.0, 0.0), "green", color_named=False)
    frames = [*world.render(world.Scene((obj,), "black"), SIZE, 20), *world.render(world.Scene((later,), "black"), SIZE, 10, start=20)]
    report = eval_consistency.evaluate(frames, "a circle moves right on a black background")
    assert report["color_accuracy"] is None and report["prompt_accuracy"] == 1.0
    assert set(report["open"]) == {"color", "hat"}
    assert report["open"]["color"]["retention"] == 1.0 and report["open"]["color"]["changes"] == 0
    assert report["open"]["hat"]["start"] == "red" and report["open"]["hat"]["first_change"] == 20
    named = eval_consistency.evaluate(frames, "a yellow circle moves right on a black background")
    assert set(named["open"]) == {"hat"} and named["color_accuracy"] == 1.0
    eval_consistency.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
