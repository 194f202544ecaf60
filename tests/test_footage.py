"""Starting from the user's footage on the embedded model: an image to animate, a video to
extend, an image as the reference bank's identity; exact resume; a changed input refused."""

import hashlib
import os
import shutil
import signal

import numpy as np
import pytest

import cli_process
from fifo_stream import world
from fifo_stream.config import load_config
from fifo_stream.consistency.refbank import spatial_self_attention
from fifo_stream.models.loading import load_model
from fifo_stream.inputs.video import iter_video
from fifo_stream.outputs.file import FileSink
from fifo_stream.outputs.segments import count_frames
from fifo_stream.outputs.png import PngSink
from fifo_stream.pipeline import FrameStream, StartClip
from fifo_stream.runs.inputs import DEFAULT_STRENGTH

SIZE = 32  # the embedded model's frames; it shows them at 64x64; its world is v2 (open_identity: hats)


def shown(frames):
    """World renders at the model's size, as the model shows them (each pixel 2x2)."""
    return frames.repeat(2, axis=-3).repeat(2, axis=-2)


def centroid(frame):
    """The object's center in model pixels (the frame shows each one as 2x2)."""
    return np.asarray(world.centroid(frame, threshold=60)) / 2


@pytest.fixture(scope="module")
def model():
    cfg = load_config("tiny")
    return cfg, load_model(cfg)


def frames_of(model, prompt, n, seed=0, overrides=(), **kw):
    cfg, m = model
    stream = FrameStream(m, load_config("tiny", list(overrides)) if overrides else cfg, prompt, seed=seed, **kw)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


def test_an_init_image_starts_the_video(model):
    """Plain FIFO: the image's frames are what is tested. The default subject anchor costs named shapes
    here too (12 images x 2 seeds, first 8 frames: 0.69 against 0.76; docs/consistency.md), and this
    case's square reads as a circle in 2 of 8 frames with it on one thread."""
    prompt = "a magenta square moves left on a white background"
    scene = world.scene_from_caption(prompt, SIZE, seed=1, open_identity=True)
    image = shown(world.render(scene, SIZE, 1))[0]
    frames = frames_of(model, prompt, 8, overrides=["consistency.enabled=false"], start=StartClip(image[None], DEFAULT_STRENGTH["init_image"]))
    assert sum(world.classify_frame(f) == ("magenta", "square") for f in frames) >= 7
    assert np.linalg.norm(centroid(frames[0]) - centroid(image)) <= 3


def test_an_init_video_is_continued_where_it_ends(model):
    prompt = "a cyan circle moves right on a black background"
    scene = world.scene_from_caption(prompt, SIZE, seed=8, open_identity=True)  # moving right over its last 12 frames, no bounce
    clip = shown(world.render(scene, SIZE, 32))
    f = model[1].frames_per_window
    path = np.array([centroid(frame) for frame in clip])
    velocity = (path[-1] - path[-9]) / 8
    assert velocity[0] > 0.5 and (np.diff(path[-12:, 0]) > -0.3).all()
    frames = frames_of(model, prompt, 17, start=StartClip(clip[-f:], DEFAULT_STRENGTH["init_video"]))
    assert np.linalg.norm(centroid(frames[0]) - (path[-1] + velocity)) <= 3
    assert world.classify_frame(frames[0]) == ("cyan", "circle")
    xs = np.array([centroid(frame)[0] for frame in frames])
    assert xs[16] > xs[0] and np.polyfit(np.arange(17), xs, 1)[0] > 0  # it keeps moving right


def test_a_reference_image_fills_the_bank_before_the_first_frame(model):
    """Every level's entry comes from the image, with no emitted frame: the bank differs from a
    frame-reference run's, and the video follows it (here: differs from the run without it)."""
    cfg, m = model
    run_cfg = load_config("tiny", ["consistency.refbank.enabled=true", "consistency.refbank.mode=replace", "consistency.refbank.dtype=fp32"])
    prompt = "a red circle moves right on a black background"
    reference = shown(world.render(world.scene_from_caption("a blue square moves left on a black background", SIZE, 5, open_identity=True), SIZE, 1))[0]
    stream = FrameStream(m, run_cfg, prompt, seed=0, reference_image=reference)
    try:
        stream.start()
        bank = stream.refbank
        assert bank.filled.all() and set(bank.keys) == set(bank.layers)
        name = bank.layers[0]
        levels = run_cfg.sampling.partitions * m.frames_per_window
        assert bank.keys[name].shape[0] == 2 * levels
        with_reference = [next(stream) for _ in range(8)]
    finally:
        stream.close()
    assert not any(attn.processor.__class__.__name__ == "RefBankProcessor" for attn in spatial_self_attention(m.unet).values())
    plain = frames_of((run_cfg, m), prompt, 8)
    assert not all((a == b).all() for a, b in zip(with_reference, plain))


def cli(*args, env=None):
    return cli_process.run(*args, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    d = tmp_path_factory.mktemp("footage")
    scene = world.scene_from_caption("a red circle moves right on a black background", SIZE, 3, open_identity=True)
    with PngSink(d / "png") as sink:
        sink.write(shown(world.render(scene, SIZE, 1))[0])
    shutil.move(d / "png" / "000000.png", d / "image.png")
    with FileSink(d / "clip.mp4", 64, 64, 8) as sink:
        for frame in shown(world.render(scene, SIZE, 12)):
            sink.write(frame)
    return d


@pytest.mark.parametrize("flag, name", [("--init-image", "image.png"), ("--init-video", "clip.mp4"), ("consistency.refbank.reference", "image.png")])
def test_kill_and_resume_with_footage_is_exact_and_a_changed_input_is_refused(tmp_path, footage, flag, name):
    source = tmp_path / name
    shutil.copy(footage / name, source)
    # the reference image is held by the bank and the subject anchor both
    controls = ("consistency.refbank", "consistency.anchor")
    given = [f"{c}.{k}" for c in controls for k in (f"reference={source}", "enabled=true")] if flag.startswith("consistency") else [flag, str(source)]
    keep = flag == "--init-video"  # the outputs start with the clip's 12 frames, then the 12 new ones
    base = ["generate", "a red circle moves right on a black background", "--config", "tiny", "--frames", "12",
            "--checkpoint-every", "4", "--quiet", *given, *(["--keep-input"] if keep else [])]
    ref = cli(*base, "--out", str(tmp_path / "ref.mp4"), "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    killed = cli(*base, "--out", str(tmp_path / "run.mp4"), "--run-dir", str(tmp_path / "run"), env={"FIFO_STREAM_FAULT": "frame:6"})
    assert killed.returncode == -signal.SIGKILL
    if keep:  # killed while writing the clip's frames, then after new frames: each resume continues exactly
        killed = cli("resume", str(tmp_path / "run"), "--quiet", env={"FIFO_STREAM_FAULT": "frame:18"})
        assert killed.returncode == -signal.SIGKILL
    done = cli("resume", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 0, done.stderr
    read = lambda d: __import__("json").loads((d / "manifest.json").read_text())["frame_sha256"]  # noqa: E731
    assert read(tmp_path / "run") == read(tmp_path / "ref")
    spec = __import__("json").loads((tmp_path / "ref" / "run.json").read_text())
    assert list(spec["inputs"].values())[0]["path"] == str(source)
    if keep:
        clip = list(iter_video(source, 8, 64, 64))
        assert spec["kept_input_frames"] == 12 and len(read(tmp_path / "ref")) == 24 and count_frames(tmp_path / "ref.mp4") == 24
        assert read(tmp_path / "ref")[:12] == [hashlib.sha256(f.tobytes()).hexdigest() for f in clip]
        plain = cli(*base[:-1], "--out", str(tmp_path / "plain.mp4"), "--run-dir", str(tmp_path / "plain"))
        assert plain.returncode == 0, plain.stderr
        assert read(tmp_path / "plain") == read(tmp_path / "ref")[12:]  # the new frames do not change
    # a changed input: a killed run refuses to continue with it, unless --force
    killed = cli(*base, "--out", str(tmp_path / "again.mp4"), "--run-dir", str(tmp_path / "again"), env={"FIFO_STREAM_FAULT": "frame:2"})
    assert killed.returncode == -signal.SIGKILL
    source.write_bytes(source.read_bytes()[:-1] + b"\x00")
    refused = cli("resume", str(tmp_path / "again"), "--quiet")
    assert refused.returncode == 2 and "changed since the run started" in refused.stderr and refused.stderr.count("\n") == 1
    source.unlink()
    missing = cli("resume", str(tmp_path / "again"), "--quiet")
    assert missing.returncode == 2 and "is missing" in missing.stderr


def test_a_short_video_is_padded_on_request(tmp_path):
    with FileSink(tmp_path / "short.mp4", 64, 64, 8) as sink:
        for frame in shown(world.render(world.scene_from_caption("a red circle moves right on a black background", SIZE, 3, open_identity=True), SIZE, 3)):
            sink.write(frame)
    args = ["generate", "a red circle moves right on a black background", "--config", "tiny", "--frames", "2", "--quiet",
            "--init-video", str(tmp_path / "short.mp4"), "--out", str(tmp_path / "o.mp4"), "--run-dir", str(tmp_path / "r")]
    refused = cli(*args)
    assert refused.returncode == 2 and "--pad-short" in refused.stderr
    done = cli(*args, "--pad-short")
    assert done.returncode == 0, done.stderr
