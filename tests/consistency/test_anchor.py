"""Subject appearance anchor: the subject's band colors move to the reference's, nothing else does; exact resume."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import straight_and_resumed

from fifo_stream import world
from fifo_stream.config import load_config
from fifo_stream.consistency.anchor import SubjectAnchor, band_means, subject_mask
from fifo_stream.consistency.template import TemplateAnchor, find_object
from fifo_stream.consistency.storyboard import Storyboard
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream
from fifo_stream.sampling.ddim import sample_ddim


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
    assert anchor.references == {}  # not the reference tick
    anchor.observe(scene(RED, GREEN, top=1, left=1), tick=7)
    moved = scene(BLUE, YELLOW, top=4, left=4)  # another place, other colors
    x0 = torch.stack([moved[:, :, None]] * 2, 2)[:, :, :, 0]  # (1, 4, 2 frames, 8, 8)
    out = anchor.correct(x0, torch.tensor([2, 1]))  # frame 0 at a corrected level, frame 1 below it
    want = scene([b + strength * (r - c) for b, r, c in zip(BLUE, RED, BLUE)], [y + strength * (g - c) for y, g, c in zip(YELLOW, GREEN, YELLOW)], top=4, left=4)
    assert torch.allclose(out[:, :, 0], want, atol=1e-5)  # the subject's colors, in place; the background untouched
    assert torch.equal(out[:, :, 1], x0[:, :, 1])
    anchor.observe(scene(BLUE, BLUE, top=0, left=0), tick=7)  # the reference is kept once taken
    assert torch.allclose(anchor.references[0][0, 0], torch.tensor(GREEN))


def test_given_reference_frames_give_their_medoids_colors_not_an_odd_frames():
    frames = torch.cat([scene(BLUE, YELLOW, top=1, left=1)] + [scene(RED, GREEN, top=1 + i % 2, left=1 + i) for i in range(4)])
    anchor = SubjectAnchor(1.0, min_level=0, bands=3, reference_tick=None)
    anchor.observe(frames[:1], tick=0)  # no emitted frame is the reference
    assert anchor.references == {}
    anchor.take_reference(frames)  # frame 0 alone shows other colors
    assert torch.allclose(anchor.references[0][0, 0], torch.tensor(GREEN)) and torch.allclose(anchor.references[0][0, 1], torch.tensor(RED))


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


@pytest.mark.parametrize("mode", ["bands", "template"])
def test_a_start_reference_acts_from_the_first_frame_and_resumes_exactly(tmp_path, mode):
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=start", f"consistency.anchor.mode={mode}"])
    model = load_model(cfg)
    straight, resumed = straight_and_resumed(model, cfg, "a blue square", 3, split=2, total=4, tmp_path=tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed))
    plain = FrameStream(model, load_config("tiny-random"), "a blue square", seed=3)
    assert not np.array_equal(next(plain), straight[0])  # corrected since the queue started: frame 0 too


def test_a_start_reference_is_taken_from_the_base_clip_which_is_then_sampled_again_held_by_the_anchor(monkeypatch):
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=start", "consistency.anchor.mode=template"])
    model = load_model(cfg)
    begun = []
    monkeypatch.setattr(FrameStream, "begin", lambda self, clip, continues=False: begun.append(clip))
    stream = FrameStream(model, cfg, "a blue square", seed=3)
    stream.start()
    s = stream.settings
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((1, 4, s.frames, *stream.latent_shape[2:]), generator=g)
    ddim = (stream._unet, noise, stream.cond, stream.uncond, model.alphas, s.steps, s.guidance_scale, s.eta)
    plain = sample_ddim(*ddim, torch.Generator().manual_seed(3).set_state(g.get_state()), model.scales, s.clip_x0)
    taken = TemplateAnchor(1.0, 0, None, model.encode, model.decode, model.spatial_factor, model.upscale)
    taken.take_reference(plain[0].transpose(0, 1))
    assert torch.equal(stream.engine.anchor.references[0].patches, taken.references[0].patches)  # taken from the plain clip
    held = sample_ddim(*ddim, torch.Generator().manual_seed(3).set_state(g.get_state()), model.scales, s.clip_x0,
                       correct_x0=lambda x0, i: taken.correct(x0, torch.full((s.frames,), i)))
    assert torch.equal(begun[0], held) and not torch.allclose(held, plain, atol=1e-3)  # the queue starts from the held clip


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
    assert torch.equal(stream.engine.anchor.references[0], band_means(z, subject_mask(z), 2)[0])
    template = FrameStream(model, load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=mine.png",
                                                               "consistency.anchor.mode=template"]), "a red circle", reference_image=image)
    template.start()
    direct = TemplateAnchor(1.0, 0, None, model.encode, model.decode, model.spatial_factor, model.upscale)
    direct.take_image(image)  # the image itself, not its latent decoded
    assert torch.equal(template.engine.anchor.references[0].patches, direct.references[0].patches)


def test_a_level_beyond_the_schedule_is_refused(tiny):
    _, model = tiny
    with pytest.raises(FifoStreamError, match="min_level=99 corrects no level"):
        FrameStream(model, load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.min_level=99"]), "a red circle")


FACTOR = 4  # pixels per latent cell of the test codec


def encode_blocks(frames: np.ndarray) -> torch.Tensor:
    """A linear codec: each latent cell is its FACTOR x FACTOR block's mean color in [-1, 1]: (1, 3, n, h, w)."""
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 127.5 - 1
    return torch.nn.functional.avg_pool2d(x, FACTOR).permute(1, 0, 2, 3)[None]


def decode_blocks(z: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.interpolate(z[0].transpose(0, 1), scale_factor=FACTOR)
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)[None]


def hatted(body, hat, top: int, left: int, size: int = 32, background=120) -> np.ndarray:
    """A (size, size, 3) image: a 12 x 12 square on ``background`` (gray), its top 4 rows the ``hat`` color."""
    image = np.full((size, size, 3), background, np.uint8)
    image[top : top + 12, left : left + 12] = body
    image[top : top + 4, left : left + 12] = hat
    return image


def covered(top: int, left: int, size: int = 32) -> torch.Tensor:
    """(1, 1, 1, h, w): the share of each cell under a :func:`hatted` object: how far a template moves it."""
    mask = np.zeros((size, size), np.float32)
    mask[top : top + 12, left : left + 12] = 1
    return torch.from_numpy(mask.reshape(size // FACTOR, FACTOR, size // FACTOR, FACTOR).mean((1, 3)))[None, None, None]


def moved_by_share(frame: torch.Tensor, target: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """``frame`` with each cell moved toward ``target`` by the object's share of it (at ``top``, ``left``)."""
    return frame + covered(top, left) * (target - frame)


def template_anchor(strength=1.0, min_level=0, reference_tick=None, full_cover=1.0):
    return TemplateAnchor(strength, min_level, reference_tick, encode_blocks, decode_blocks, FACTOR, 1, full_cover=full_cover)


RED_PX, GREEN_PX, BLUE_PX, YELLOW_PX = (230, 40, 40), (40, 190, 60), (50, 80, 235), (235, 215, 40)


@pytest.mark.parametrize("drifted", [(RED_PX, YELLOW_PX), (BLUE_PX, GREEN_PX)], ids=["hat", "body"])
def test_the_template_gives_hat_and_body_cells_their_own_colors_where_the_subject_is_now(drifted):
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # red, green hat
    template = anchor.references[0]
    assert template.patches.shape == (FACTOR * FACTOR, 3, 4, 4) and template.part_coverage.shape == (FACTOR * FACTOR, 2, 4, 4)
    assert torch.allclose(template.part_coverage.sum((2, 3)), torch.tensor([96 / 16, 48 / 16]))
    moved = encode_blocks(hatted(*drifted, top=16, left=12)[None])  # elsewhere, the hat or the body another color
    out = anchor.correct(moved, torch.tensor([0]))
    want = encode_blocks(hatted(RED_PX, GREEN_PX, top=16, left=12)[None])
    assert torch.allclose(out, want, atol=1e-5)  # cell for cell: the hat row green, the body red, the gray untouched
    assert not torch.allclose(moved, want, atol=0.1)


def test_a_subject_between_cells_takes_the_template_of_its_offset():
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))
    for top, left in ((13, 9), (18, 17), (6, 1)):
        moved = encode_blocks(hatted(RED_PX, (215, 50, 210), top=top, left=left)[None])  # a magenta hat
        want = moved_by_share(moved, encode_blocks(hatted(RED_PX, GREEN_PX, top=top, left=left)[None]), top, left)
        assert torch.allclose(anchor.correct(moved, torch.tensor([3])), want, atol=1e-5)


def test_a_subject_in_the_frames_last_cells_is_placed_where_it_is():
    """The patch keeps a margin cell for the offsets; by the bottom or right edge that margin hangs past
    the frame (the object does not cover it), and the subject is still held where it is, not a cell inward."""
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))
    assert anchor.references[0].patches.shape[-2:] == (4, 4)  # 12 pixels: 3 cells and the margin
    for top, left in ((20, 9), (6, 20), (20, 20)):
        moved = encode_blocks(hatted(RED_PX, (215, 50, 210), top=top, left=left)[None])
        want = moved_by_share(moved, encode_blocks(hatted(RED_PX, GREEN_PX, top=top, left=left)[None]), top, left)
        assert torch.allclose(anchor.correct(moved, torch.tensor([3])), want, atol=1e-5)


def test_each_part_of_the_template_is_one_color():
    """A hat the reference frame drew in two tones is held in its main one (the frames kept both, and
    the reader took either)."""
    anchor = template_anchor()
    reference = hatted(GREEN_PX, (200, 40, 40), top=2, left=3)
    reference[5, 3:15] = (250, 40, 40)  # the hat's last row in a second tone
    anchor.take_image(reference)
    for top, left in ((13, 9), (6, 1)):
        moved = encode_blocks(hatted(GREEN_PX, (215, 50, 210), top=top, left=left)[None])  # a magenta hat
        want = moved_by_share(moved, encode_blocks(hatted(GREEN_PX, (200, 40, 40), top=top, left=left)[None]), top, left)
        assert torch.allclose(anchor.correct(moved, torch.tensor([3])), want, atol=1e-5)


PALETTE = np.array([RED_PX, YELLOW_PX, GREEN_PX, BLUE_PX], np.float32)


def test_a_palette_holds_each_part_the_model_drew_in_its_nearest_color_and_a_users_image_as_it_is():
    """An orange hat (the model's draw between red and yellow) and an off-blue body are held yellow and blue."""
    drawn = hatted((60, 90, 220), (230, 165, 53), 4, 4)  # cell-aligned: decoded exactly
    anchor = TemplateAnchor(1.0, 0, None, encode_blocks, decode_blocks, FACTOR, 1, palette=PALETTE)
    anchor.take_reference(encode_blocks(drawn[None])[0].transpose(0, 1))
    clean = template_anchor()
    clean.take_image(hatted(BLUE_PX, YELLOW_PX, 4, 4))
    assert torch.allclose(anchor.references[0].patches, clean.references[0].patches, atol=1e-6)
    # an emitted frame's (or a renewed scene's) object is the model's too
    assert torch.allclose(anchor.reference_from(encode_blocks(drawn[None])[:, :, 0]).patches, clean.references[0].patches, atol=1e-6)
    anchor.take_image(drawn)
    as_given = template_anchor()
    as_given.take_image(drawn)
    assert torch.equal(anchor.references[0].patches, as_given.references[0].patches)
    assert not torch.allclose(as_given.references[0].patches, clean.references[0].patches, atol=0.05)


def test_cells_the_subject_shares_with_a_new_background_show_that_background():
    """A storyboard's background change: the cells the object half covers mix it with today's background."""
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # on gray
    for background in ((235, 235, 235), (20, 20, 20)):
        moved = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9, background=background)[None])
        want = moved_by_share(moved, encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9, background=background)[None]), 13, 9)
        assert torch.allclose(anchor.correct(moved, torch.tensor([0])), want, atol=1e-5)
    old = template_anchor()  # a checkpoint from before the shift: the reference's own background, as it ran then
    old.load_state_dict({"patches": anchor.references[0].patches, "part_coverage": anchor.references[0].part_coverage})
    gray_edges = encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9)[None])
    on_white = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9, background=(235, 235, 235))[None])
    full = (covered(13, 9) == 1).expand_as(on_white)  # cells wholly under the object move all the way
    assert full.any() and torch.allclose(old.correct(on_white, torch.tensor([0]))[full], gray_edges[full], atol=1e-5)


def test_cells_held_whole_keep_the_templates_background_and_the_others_shift_by_what_they_are_not_held():
    """full_cover 0.5: a cell the object covers at least half of becomes the template's cell as it is (the
    reference's gray edges included); one it covers less moves by twice its share, its background part
    shifted to today's background by the rest."""
    anchor = template_anchor(full_cover=0.5)
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # on gray
    on_white = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9, background=(235, 235, 235))[None])
    gray_edges = encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9)[None])
    white_edges = encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9, background=(235, 235, 235))[None])
    share = covered(13, 9).expand_as(on_white)
    weight = (share / 0.5).clamp(max=1)
    held, part = (share >= 0.5) & (share < 1), (share > 0) & (share < 0.5)
    assert held.any() and part.any()
    out = anchor.correct(on_white, torch.tensor([0]))
    assert torch.allclose(out[held], gray_edges[held], atol=1e-5) and not torch.allclose(gray_edges[held], white_edges[held], atol=0.1)
    target = gray_edges + (1 - weight) * (white_edges - gray_edges) / (1 - share).clamp(min=1e-6)  # the background part, shifted by 1 - w
    assert torch.allclose(out[part], (on_white + weight * (target - on_white))[part], atol=1e-5)


def test_hold_smaller_part_holds_every_cell_where_the_hat_has_most_of_the_objects_share_however_little_it_covers():
    """The hat of a :func:`hatted` object at (13, 9) lies in cell row 3 (3 of its 4 pixel rows), its cells 9, 12, 12
    and 3 sixteenths covered: held whole with the option, moved by their share without it."""
    hat, body = np.zeros((32, 32), np.float32), np.zeros((32, 32), np.float32)
    hat[13:17, 9:21], body[17:25, 9:21] = 1, 1
    hat_share, body_share = (torch.from_numpy(m.reshape(8, FACTOR, 8, FACTOR).mean((1, 3)))[None, None, None] for m in (hat, body))
    hat_cells = (hat_share > 0) & (hat_share >= 0.5 * (hat_share + body_share))
    assert hat_cells.sum() == 4 and ((hat_share[hat_cells] < 0.5)).any()
    frame = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9)[None])
    target = encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9)[None])
    for hold in (True, False):
        anchor = TemplateAnchor(1.0, 0, None, encode_blocks, decode_blocks, FACTOR, 1, hold_smaller_part=hold)
        anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))
        weight = torch.where(hat_cells, 1.0, covered(13, 9)) if hold else covered(13, 9)
        assert torch.allclose(anchor.correct(frame, torch.tensor([0])), frame + weight * (target - frame), atol=1e-5)


def test_hold_smaller_part_holds_nothing_more_where_both_parts_are_held_in_one_color():
    """The model's one-colored object, its darker top split off as a second part: both parts held red, so
    there is no hat to hold (the Santa grid's seed 9, whose held "hat" cells were its red rim)."""
    drawn = hatted(RED_PX, (200, 30, 30), 4, 4)
    frame = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9)[None])
    outs = []
    for hold in (True, False):
        anchor = TemplateAnchor(1.0, 0, None, encode_blocks, decode_blocks, FACTOR, 1, palette=PALETTE, hold_smaller_part=hold)
        anchor.take_reference(encode_blocks(drawn[None])[0].transpose(0, 1))
        outs.append(anchor.correct(frame, torch.tensor([0])))
    template = anchor.references[0]
    assert (template.part_coverage.sum((2, 3)) > 0).all() and (template.cut.part_colors() == RED_PX).all()  # two parts, one color
    assert not template.smaller_part_cells.any() and torch.equal(*outs)


@pytest.mark.parametrize("full_cover", [1.0, 0.5])
def test_a_later_scenes_frames_before_its_own_template_take_the_object_on_their_predicted_background(full_cover):
    """A keeping storyboard scene's frames before its own template exists: an interim template, the object
    composited on the background of the scene's least noisy frame (white), not the previous scene's
    template shifted in latents (which a real VAE decodes in another hue). Every cell's uncovered part
    takes each frame's own background, the cells held whole too (exact for a linear codec); on its own
    scene's frames a held cell keeps the template's (the test above)."""
    anchor = template_anchor(full_cover=full_cover)
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # on gray: scene 0's template
    backgrounds = ((235, 235, 235), (200, 200, 200))
    x0 = torch.cat([encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9, background=b)[None]) for b in backgrounds], 2)
    edges = torch.cat([encode_blocks(hatted(RED_PX, GREEN_PX, top=13, left=9, background=b)[None]) for b in backgrounds], 2)
    share = covered(13, 9).expand_as(x0)
    weight = (share / full_cover).clamp(max=1)
    assert ((share >= 0.5) & (share < 1)).any()
    out = anchor.correct(x0, torch.tensor([0, 3]), scenes=torch.tensor([1, 1]), renew=(False, False))
    on_white = template_anchor()
    on_white.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3, background=backgrounds[0]))
    assert anchor.interim[1][0] == 0 and torch.allclose(anchor.interim[1][1].patches, on_white.references[0].patches, atol=1e-5)
    assert torch.allclose(out, x0 + weight * (edges - x0), atol=1e-5)
    own = anchor.correct(x0[:, :, :1], torch.tensor([0]), scenes=torch.tensor([0]))
    assert full_cover == 1.0 or not torch.allclose(own, out[:, :, :1], atol=0.1)


def test_the_interim_template_is_made_again_as_the_scenes_lead_frame_halves_its_level_and_gives_way_to_its_own():
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # on gray
    white, black = (235, 235, 235), (20, 20, 20)
    direct = {}
    for background in (white, black):
        direct[background] = template_anchor()
        direct[background].take_image(hatted(RED_PX, GREEN_PX, top=2, left=3, background=background))
    renew = (False, False)

    def tick(level, background):
        x0 = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=13, left=9, background=background)[None])
        return anchor.correct(x0, torch.tensor([level]), torch.tensor([1]), renew)

    made = []
    for level, background in ((6, white), (4, black), (3, black)):
        tick(level, background)
        made.append((anchor.interim[1][0], anchor.interim[1][1].patches))
    assert [level for level, _ in made] == [6, 6, 3]  # made when the scene enters, again at half the level
    assert torch.allclose(made[1][1], direct[white].references[0].patches, atol=1e-5)
    assert torch.allclose(made[2][1], direct[black].references[0].patches, atol=1e-5)
    resumed = template_anchor()
    resumed.load_state_dict(anchor.state_dict())
    assert resumed.interim[1][0] == 3 and torch.equal(resumed.interim[1][1].patches, anchor.interim[1][1].patches)
    anchor.observe(encode_blocks(hatted(BLUE_PX, YELLOW_PX, 8, 8, background=black)[None])[:, :, 0], tick=50, scene=1, renew=renew)
    assert anchor.interim == {} and torch.allclose(anchor.references[1].patches, direct[black].references[0].patches, atol=1e-5)


@pytest.fixture(scope="module")
def embedded():
    return load_model(load_config("tiny"))


@pytest.mark.parametrize("body, hat, old_background, new_background",
                         [("blue", "yellow", "gray", "black"), ("red", "green", "gray", "white"), ("cyan", "magenta", "black", "white")])
def test_on_the_embedded_vae_a_new_scenes_frames_keep_the_subjects_colors_where_the_old_template_shifted_in_latents_does_not(
        embedded, body, hat, old_background, new_background):
    """The storyboard episode at a change to black or white: the previous scene's template, shifted in latents
    onto the far background, decodes in another hue (blue went cyan on black); the interim template, the
    object composited in pixels on the new background, keeps body and hat."""
    subject = dataclasses.replace(world.scene_from_caption(f"a {body} circle", 128, 1, open_identity=True).objects[0], hat=hat, velocity=(0.0, 0.0))
    reference = world.render(world.Scene((subject,), old_background), 128, 1)[0]
    drifted = dataclasses.replace(subject, color="magenta" if body != "magenta" else "red", position=(subject.position[0] + 5, subject.position[1] + 3))
    x0 = embedded.encode(world.render(world.Scene((drifted,), new_background), 128, 1)).float()

    def anchor():
        return TemplateAnchor(1.0, 0, None, embedded.encode, embedded.decode, embedded.spatial_factor, embedded.upscale, full_cover=0.5)

    def read_corrected(a):
        return world.read_frame(embedded.decode(a.correct(x0, torch.tensor([0]), torch.tensor([1]), (False, False)))[0, 0].numpy())

    held = anchor()
    held.take_image(reference)
    uncut = {k: v for k, v in held.references[0].state_dict().items() if k in ("patches", "part_coverage", "background")}
    assert read_corrected(held)[:3] == (body, "circle", hat)
    shifted = anchor()  # without the object's pixels: the latent shift
    shifted.load_state_dict({"references": {0: uncut}, "scene": 0, "scene_frames": 0})
    assert read_corrected(shifted)[0] != body


def test_the_template_acts_only_at_its_levels_and_resumes_from_its_state():
    anchor = template_anchor(strength=0.5, min_level=2, reference_tick=4)
    anchor.observe(encode_blocks(hatted(RED_PX, GREEN_PX, 4, 4)[None])[:, :, 0], tick=3)  # cell-aligned: decoded exactly
    assert anchor.references == {}
    x0 = torch.cat([encode_blocks(hatted(BLUE_PX, GREEN_PX, 16, 12)[None])] * 2, 2)
    assert anchor.correct(x0, torch.tensor([2, 1])) is x0  # no reference yet
    anchor.observe(encode_blocks(hatted(RED_PX, GREEN_PX, 4, 4)[None])[:, :, 0], tick=4)  # cell-aligned: decoded exactly
    out = anchor.correct(x0, torch.tensor([2, 1]))
    want = (x0[:, :, :1] + encode_blocks(hatted(RED_PX, GREEN_PX, 16, 12)[None])) / 2
    assert torch.allclose(out[:, :, :1], want, atol=1e-5) and torch.equal(out[:, :, 1], x0[:, :, 1])
    resumed = template_anchor(strength=0.5, min_level=2, reference_tick=4)
    resumed.load_state_dict(anchor.state_dict())
    assert torch.equal(resumed.correct(x0, torch.tensor([2, 1])), out)


def test_start_frames_give_the_template_of_the_subject_most_like_the_others():
    places = ((4, 4), (8, 12), (16, 8), (12, 16))  # cell-aligned: decoded exactly
    colors = [(BLUE_PX, YELLOW_PX)] + [(RED_PX, GREEN_PX)] * 3  # frame 0 alone shows other colors
    frames = torch.cat([encode_blocks(hatted(*c, *p)[None]) for c, p in zip(colors, places)], 2)[0].transpose(0, 1)
    anchor = template_anchor()
    anchor.take_reference(frames)
    direct = template_anchor()
    direct.take_image(hatted(RED_PX, GREEN_PX, 4, 4))
    assert torch.allclose(anchor.references[0].patches, direct.references[0].patches, atol=1e-6)


def test_a_reference_without_a_subject_is_refused():
    with pytest.raises(FifoStreamError, match="shows no subject"):
        template_anchor().take_image(np.full((32, 32, 3), 120, np.uint8))


def test_a_scene_that_keeps_the_subject_gets_the_object_on_its_own_background():
    anchor = template_anchor()
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))  # on gray
    white = (235, 235, 235)
    anchor.observe(encode_blocks(hatted(BLUE_PX, YELLOW_PX, 8, 8, background=white)[None])[:, :, 0], tick=50, scene=1, renew=(False, False))
    direct = template_anchor()
    direct.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3, background=white))  # the object drawn on white
    assert torch.allclose(anchor.references[1].patches, direct.references[0].patches, atol=1e-5)
    x0 = torch.cat([encode_blocks(hatted(BLUE_PX, YELLOW_PX, 13, 9, background=b)[None]) for b in ((120,) * 3, white)], 2)
    out = anchor.correct(x0, torch.tensor([0, 0]), torch.tensor([0, 1]), (False, False))
    want = torch.cat([encode_blocks(hatted(RED_PX, GREEN_PX, 13, 9, background=b)[None]) for b in ((120,) * 3, white)], 2)
    want = moved_by_share(x0, want, 13, 9)
    assert torch.allclose(out, want, atol=1e-5)  # each frame the reference object on its own scene's background


@pytest.mark.parametrize("kind", ["template", "bands"])
def test_a_scene_that_renews_the_subject_takes_its_first_frame_and_is_not_corrected_before(kind):
    anchor = template_anchor() if kind == "template" else SubjectAnchor(1.0, 0, 2, None)
    reference, new = hatted(RED_PX, GREEN_PX, 4, 4), hatted(BLUE_PX, YELLOW_PX, 8, 8)  # cell-aligned: decoded exactly
    if kind == "template":
        anchor.take_image(reference)
    else:
        anchor.take_reference(encode_blocks(reference[None])[0].transpose(0, 1))
    renew = (False, True)
    drifted = torch.cat([encode_blocks(hatted(GREEN_PX, RED_PX, 16, 12)[None])] * 2, 2)  # a scene 0 and a scene 1 frame
    scenes = torch.tensor([0, 1])
    before = anchor.correct(drifted, torch.tensor([3, 3]), scenes, renew)
    assert torch.equal(before[:, :, 1], drifted[:, :, 1]) and not torch.allclose(before[:, :, 0], drifted[:, :, 0])  # scene 1 waits for its reference
    anchor.observe(encode_blocks(new[None])[:, :, 0], tick=40, scene=1, renew=renew)
    after = anchor.correct(drifted, torch.tensor([3, 3]), scenes, renew)
    assert torch.equal(after[:, :, 0], before[:, :, 0])  # scene 0 keeps its reference
    if kind == "template":
        assert torch.allclose(after[:, :, 1], encode_blocks(hatted(BLUE_PX, YELLOW_PX, 16, 12)[None])[:, :, 0], atol=1e-5)
    else:
        z = encode_blocks(new[None])[:, :, 0]
        assert torch.equal(anchor.references[1], band_means(z, subject_mask(z), 2)[0])
        assert not torch.allclose(after[:, :, 1], drifted[:, :, 1])
    resumed = template_anchor() if kind == "template" else SubjectAnchor(1.0, 0, 2, None)
    resumed.load_state_dict(anchor.state_dict())
    assert torch.equal(resumed.correct(drifted, torch.tensor([3, 3]), scenes, renew), after)


def test_storyboard_scenes_with_the_anchor_resume_exactly(tmp_path):
    cfg = load_config("tiny-random", ["consistency.anchor.enabled=true", "consistency.anchor.reference=start", "consistency.anchor.mode=template"])
    model = load_model(cfg)
    settle = model.frames_per_window  # a scene's reference is its frame number `settle`
    story = Storyboard.parse(["a blue square", "2: a red circle", {"frame": settle + 4, "prompt": "a blue square", "anchor": "renew"}])
    total = 2 * settle + 5
    straight, resumed = straight_and_resumed(model, cfg, story, 3, split=settle + 2, total=total, tmp_path=tmp_path)  # saved before scene 1's reference
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed))
    stream = FrameStream(model, cfg, story, seed=3)
    made = []
    for _ in range(total):
        next(stream)
        made.append((sorted(stream.engine.anchor.references), sorted(stream.engine.anchor.interim)))
    assert made[2 + settle - 1] == ([0], [1]) and made[2 + settle] == ([0, 1], [])  # saved above with scene 1's interim template
    assert made[-2] == ([0, 1], []) and made[-1] == ([0, 1, 2], [])  # the renewing scene's own too, and no interim one


def test_an_objects_blended_edge_goes_onto_a_new_background_without_the_old_one():
    def drawn(background):
        image = hatted(RED_PX, GREEN_PX, 8, 8, background=background).astype(np.float32)
        image[8:20, 20] = 0.5 * np.array(RED_PX) + 0.5 * np.array(background)  # a half-covered column at the right edge
        image[7, 8:20] = 0.75 * np.array(GREEN_PX) + 0.25 * np.array(background)  # a three-quarters-covered row above the hat
        return image.round().astype(np.uint8)

    white, black = (235, 235, 235), (20, 20, 20)
    cut = find_object(drawn(white), 2)
    assert cut.alpha.shape == (13, 13) and cut.alpha.max() == 1 and 0.4 < cut.alpha[1:, -1].mean() < 0.6  # the edge column: half the object's
    assert 0.65 < cut.alpha[0, :-1].mean() < 0.85
    moved = cut.over(np.full((*cut.alpha.shape, 3), black, np.float32))
    want = drawn(black)[7:20, 8:21].astype(np.float32)
    assert np.abs(moved - want).max() <= 2  # as if drawn there; pasting the pixels would keep the white fringe
    assert np.abs(drawn(white)[7:20, 8:21].astype(np.float32) - want).max() > 100


def test_the_cut_keeps_the_objects_soft_rim_and_thin_parts():
    """A decoded frame's object fades into the background over a few pixels, and a triangle's apex is
    a faint line: both belong to the object, or a template made from the cut loses them."""
    background = np.array((120, 120, 120), np.float32)
    image = np.broadcast_to(background, (32, 32, 3)).copy()
    image[12:24, 8:20] = RED_PX
    image[9:12, 8:20] = GREEN_PX  # the hat
    for i, share in enumerate((0.6, 0.35, 0.15)):  # a soft edge on the right, three pixels wide
        image[9:24, 20 + i] = share * np.array(RED_PX) + (1 - share) * background
    image[5:9, 13] = 0.3 * np.array(GREEN_PX) + 0.7 * background  # a faint apex over the hat
    image = image.round().astype(np.uint8)
    cut = find_object(image, 2)
    assert cut.alpha.shape == (19, 15)  # rows 5-23, columns 8-22: rim and apex included
    pasted = cut.over(np.broadcast_to(background, (*cut.alpha.shape, 3)))
    assert np.abs(pasted - image[5:24, 8:23]).max() <= 3


@pytest.mark.parametrize("full_cover", [1.0, 0.5])
def test_the_rim_of_the_frames_subject_moves_by_the_objects_share(full_cover):
    """A cell the object covers a quarter of moves a quarter of the way: the model draws the outline,
    which is the shape the prompt names, not the reference's. With ``full_cover`` f a cell moves by
    share / f, all the way where the object covers at least f of it."""
    anchor = template_anchor(full_cover=full_cover)
    anchor.take_image(hatted(RED_PX, GREEN_PX, top=2, left=3))
    moved = encode_blocks(hatted(BLUE_PX, YELLOW_PX, top=15, left=9)[None])
    want = encode_blocks(hatted(RED_PX, GREEN_PX, top=15, left=9)[None])
    out = anchor.correct(moved, torch.tensor([0]))
    share = covered(15, 9).expand_as(moved)
    assert set(share.unique().tolist()) == {0.0, 0.0625, 0.1875, 0.25, 0.5625, 0.75, 1.0}  # a rim of several shares
    weight = (share / full_cover).clamp(max=1)
    part, full = (weight > 0) & (weight < 1), weight == 1
    assert torch.allclose(out[part], (moved + weight * (want - moved))[part], atol=1e-5)
    assert torch.allclose(out[full], want[full], atol=1e-5) and torch.equal(out[share == 0], moved[share == 0])
    assert full.sum() > (share == 1).sum() if full_cover < 1 else torch.equal(full, share == 1)
