"""Subject appearance anchor: the subject's band colors move to the reference's, nothing else does; exact resume."""

import numpy as np
import pytest
import torch
from conftest import straight_and_resumed

from fifo_stream.config import load_config
from fifo_stream.consistency.anchor import SubjectAnchor, band_means, subject_mask
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream


def scene(body, hat, top, left, height=3, width=3, size=8):
    """A latent frame (1, 4, size, size): background 0, a subject whose first row has the ``hat`` channels and the rest ``body``."""
    z = torch.zeros(1, 4, size, size)
    z[0, :, top, left : left + width] = torch.tensor(hat)[:, None]
    z[0, :, top + 1 : top + height, left : left + width] = torch.tensor(body)[:, None, None]
    return z


RED, GREEN = [2.0, -1.0, 0.5, 0.0], [-1.0, 2.0, 0.0, 0.5]
BLUE, YELLOW = [0.0, 0.5, 2.0, -1.0], [1.5, 1.5, -0.5, 0.0]


def test_the_mask_is_the_subject_and_bands_split_it_from_the_top():
    z = scene(RED, GREEN, top=2, left=3)
    mask = subject_mask(z)
    assert mask[0, 0, 2:5, 3:6].min() == 1 and mask.sum() == 9  # the background reads 0
    means, masks = band_means(z, mask, 3)
    assert torch.allclose(means[0, 0], torch.tensor(GREEN)) and torch.allclose(means[0, 1], torch.tensor(RED))
    assert masks[0, 0, 0, 2].sum() == 3 and masks[0, 0].sum() == 3


def test_a_vertical_gradient_background_is_not_the_subject():
    z = scene(RED, GREEN, top=2, left=3)
    gradient = torch.linspace(-3, 3, 8)[:, None] * torch.tensor([1.0, 1.0, 0.5, 0.0])[:, None, None]  # (4, 8 rows, 1)
    z[0] += gradient * (z[0].abs().sum(0) == 0)  # the background rows only, brighter to the bottom
    mask = subject_mask(z)
    subject = torch.zeros(8, 8, dtype=torch.bool)
    subject[2:5, 3:6] = True
    assert mask[0, 0][~subject].max() == 0 and mask[0, 0][subject].min() > 0
    assert torch.allclose(band_means(z, mask, 3)[0][0, 0], torch.tensor(GREEN))  # the top band: the hat row alone


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_subject_takes_the_references_band_colors_where_it_is_now(strength):
    anchor = SubjectAnchor(strength, min_level=2, bands=3, reference_tick=7)
    anchor.observe(scene(RED, GREEN, top=1, left=1), tick=6)
    assert anchor.reference is None  # not the reference tick
    anchor.observe(scene(RED, GREEN, top=1, left=1), tick=7)
    moved = scene(BLUE, YELLOW, top=4, left=4)  # another place, other colors
    x0 = torch.stack([moved[:, :, None]] * 2, 2)[:, :, :, 0]  # (1, 4, 2 frames, 8, 8)
    out = anchor.correct(x0, torch.tensor([2, 1]))  # frame 0 at a corrected level, frame 1 below it
    want = scene([b + strength * (r - c) for b, r, c in zip(BLUE, RED, BLUE)], [y + strength * (g - c) for y, g, c in zip(YELLOW, GREEN, YELLOW)], top=4, left=4)
    assert torch.allclose(out[:, :, 0], want, atol=1e-5)  # the subject's colors, in place; the background untouched
    assert torch.equal(out[:, :, 1], x0[:, :, 1])
    anchor.observe(scene(BLUE, BLUE, top=0, left=0), tick=7)  # the reference is kept once taken
    assert torch.allclose(anchor.reference[0, 0], torch.tensor(GREEN))


def test_given_reference_frames_give_their_medoids_colors_not_an_odd_frames():
    frames = torch.cat([scene(BLUE, YELLOW, top=1, left=1)] + [scene(RED, GREEN, top=1 + i % 2, left=1 + i) for i in range(4)])
    anchor = SubjectAnchor(1.0, min_level=0, bands=3, reference_tick=None)
    anchor.observe(frames[:1], tick=0)  # no emitted frame is the reference
    assert anchor.reference is None
    anchor.take_reference(frames)  # frame 0 alone shows other colors
    assert torch.allclose(anchor.reference[0, 0], torch.tensor(GREEN)) and torch.allclose(anchor.reference[0, 1], torch.tensor(RED))


def test_without_a_reference_nothing_changes():
    x0 = torch.randn(1, 4, 3, 8, 8)
    assert SubjectAnchor(1.0, 0, 2, 5).correct(x0, torch.tensor([0, 5, 9])) is x0


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=1"])
    return cfg, load_model(cfg)


def test_anchored_runs_resume_exactly_and_differ_from_plain(tiny, tmp_path):
    cfg, model = tiny
    straight, resumed = straight_and_resumed(model, cfg, "a blue square", 3, split=3, total=6, tmp_path=tmp_path)  # saved after the reference (frame 1)
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed))
    plain = FrameStream(model, load_config("tiny-random"), "a blue square", seed=3)
    plain_frames = [next(plain) for _ in range(6)]
    assert np.array_equal(plain_frames[0], straight[0]) and np.array_equal(plain_frames[1], straight[1])  # up to the reference
    assert not np.array_equal(plain_frames[5], straight[5])


def test_a_start_reference_acts_from_the_first_frame_and_resumes_exactly(tmp_path):
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=start"])
    model = load_model(cfg)
    straight, resumed = straight_and_resumed(model, cfg, "a blue square", 3, split=2, total=4, tmp_path=tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed))
    plain = FrameStream(model, load_config("tiny-random"), "a blue square", seed=3)
    assert not np.array_equal(next(plain), straight[0])  # corrected since the queue started: frame 0 too


def test_a_reference_image_gives_the_anchor_its_colors_and_must_be_passed(tiny):
    _, model = tiny
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=mine.png"])
    with pytest.raises(FifoStreamError, match=r"names an image \(mine.png\); pass it as reference_image="):
        FrameStream(model, cfg, "a red circle")
    image = np.zeros((cfg.video.height, cfg.video.width, 3), np.uint8)
    image[20:44, 24:40] = (255, 255, 0)
    stream = FrameStream(model, cfg, "a red circle", reference_image=image)
    stream.start()
    z = model.encode(image[None])[:, :, 0]
    assert torch.equal(stream.engine.anchor.reference, band_means(z, subject_mask(z), 2)[0])


def test_a_level_beyond_the_schedule_is_refused(tiny):
    _, model = tiny
    with pytest.raises(FifoStreamError, match="min_level=99 corrects no level"):
        FrameStream(model, load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.min_level=99"]), "a red circle")
