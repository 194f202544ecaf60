"""Storyboard prompts: parsing, transition blending, and each frame's context reaching the U-Net."""

import pytest
import torch

from fifo_stream.config import load_config
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream
from fifo_stream.consistency.storyboard import Storyboard, StoryboardError


def test_parse_forms():
    board = Storyboard.parse(["santa slides down a chimney", "120: santa eats cookies", {"frame": 240, "prompt": "santa walks out"}], 8)
    assert board.scenes == ((0, "santa slides down a chimney", None, "keep"), (120, "santa eats cookies", None, "keep"), (240, "santa walks out", None, "keep"))
    assert board.transition == 8
    assert Storyboard.parse(["0: 2001: a space odyssey"]).scenes == ((0, "2001: a space odyssey", None, "keep"),)
    assert Storyboard.parse(["a: b"]).scenes == ((0, "a: b", None, "keep"),)  # not a frame number: part of the prompt
    assert Storyboard.parse(board.to_json(), 8) == board
    assert Storyboard.parse(["a", "5: b", "9: a"]).prompts == ["a", "b"]


@pytest.mark.parametrize(
    "entries, transition, message",
    [
        ([], 0, "no prompt given"),
        (["a", "b"], 0, "needs the frame it starts at"),
        (["3: a"], 0, "must start at frame 0"),
        (["a", "10: b", "10: c"], 0, "must increase: 10 follows 10"),
        (["a", "10: b", "5: c"], 0, "must increase"),
        (["a", "-4: b"], 0, ">= 0"),
        (["a", "10:  "], 0, "no prompt text"),
        (["a", {"frame": 3}], 0, "must be 'N: text'"),
        (["a", {120: "b"}], 0, "must be 'N: text'"),
        (["a", "10: b"], 11, "closer than the 11-frame transition"),
        (["a", {"frame": 10, "prompt": "b", "transition": 11}], 0, "closer than the 11-frame transition"),
        (["a", {"frame": 10, "prompt": "b", "transition": -1}], 0, "transition: L >= 0"),
        (["a", {"frame": 10, "prompt": "b", "fade": 2}], 0, "must be 'N: text'"),
        (["a", {"frame": 10, "prompt": "b", "anchor": "forget"}], 0, r"anchor: keep\|renew"),
    ],
)
def test_bad_storyboards_are_refused(entries, transition, message):
    with pytest.raises(StoryboardError, match=message):
        Storyboard.parse(entries, transition)


def test_a_scene_may_renew_the_subject_anchor():
    board = Storyboard.parse(["a red square", {"frame": 10, "prompt": "a blue circle", "anchor": "renew"}, "20: a blue circle moves up"])
    assert [s.anchor for s in board.scenes] == ["keep", "renew", "keep"]
    assert Storyboard.parse(board.to_json()) == board and board.to_json()[2] == {"frame": 20, "prompt": "a blue circle moves up"}
    assert board.describe()[1] == "10: a blue circle (anchor renew)"
    later = board.add(40, "a green star", anchor="renew")
    slots = later.slot_scenes(torch.tensor([-2, 0, 9, 10, 25, 40]))
    assert slots.index.tolist() == [0, 0, 0, 1, 2, 3] and slots.renew == (False, True, False, True)


def test_scenes_appended_later_keep_their_own_transition():
    board = Storyboard.parse(["a", "10: b"], transition=2)
    later = board.add(30, "c", transition=5)
    assert later.scenes[-1] == (30, "c", 5, "keep") and later.transition == 2 and board.scenes[-1] == (10, "b", None, "keep")
    assert Storyboard.parse(later.to_json(), 2) == later
    assert later.describe()[-1] == "30: c (transition 5)"
    assert [later.prompt_at(f) for f in (-3, 0, 9, 10, 29, 30, 1000)] == ["a", "a", "a", "b", "b", "c", "c"]
    with pytest.raises(StoryboardError, match="must increase"):
        later.add(30, "d")
    c = torch.randn(3, 4, 2)
    frames = torch.tensor([10, 11, 12, 30, 31, 34, 35])
    w = torch.tensor([1 / 3, 2 / 3, 1, 1 / 6, 2 / 6, 5 / 6, 1])[:, None, None]
    prev = torch.stack([c[0]] * 3 + [c[1]] * 4)
    new = torch.stack([c[1]] * 3 + [c[2]] * 4)
    assert torch.allclose(later.contexts(c, frames), (1 - w) * prev + w * new)


def test_contexts_blend_linearly_over_the_transition():
    c = torch.randn(3, 4, 2)
    board = Storyboard.parse(["a", "10: b", "20: c"], transition=3)
    frames = torch.tensor([-5, 0, 9, 10, 11, 12, 13, 19, 20, 23, 100])
    out = board.contexts(c, frames)
    expected = [c[0], c[0], c[0], 0.75 * c[0] + 0.25 * c[1], 0.5 * c[0] + 0.5 * c[1], 0.25 * c[0] + 0.75 * c[1],
                c[1], c[1], 0.75 * c[1] + 0.25 * c[2], c[2], c[2]]
    for got, want in zip(out, expected):
        assert torch.allclose(got, want, atol=1e-6)
    pure = [0, 1, 6, 7, 9, 10]  # outside transitions: the scene's context exactly
    assert all(torch.equal(out[i], want) for i, want in zip(pure, [c[0], c[0], c[1], c[1], c[2], c[2]]))
    no_transition = Storyboard.parse(["a", "10: b"]).contexts(c[:2], torch.tensor([9, 10]))
    assert torch.equal(no_transition[0], c[0]) and torch.equal(no_transition[1], c[1])


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-random", ["sampling.partitions=1"])
    return load_model(cfg)


@torch.no_grad()
@pytest.mark.parametrize("overrides", [[], ["sampling.lookahead=false", "sampling.partitions=2"]], ids=["lookahead", "warm-up-discarded"])
def test_every_frame_is_denoised_with_its_own_context(tiny, overrides):
    model = tiny
    cfg = load_config("tiny-random", ["sampling.partitions=1", *overrides])
    board = Storyboard.parse(["a red circle", "2: a blue square", "4: a green star"], transition=1)
    stream = FrameStream(model, cfg, board, seed=0)
    scenes = torch.cat([model.encode_text([s.prompt]) for s in board.scenes])
    skip = stream.skip
    assert skip == (8 if overrides else 0)
    uncond = model.encode_text([cfg.sampling.negative_prompt])[0]

    def by_hand(e):  # the module docstring's formula
        j = max(i for i, (start, *_) in enumerate(board.scenes) if start <= max(e, 0))
        if j == 0 or e >= board.scenes[j][0] + board.transition:
            return scenes[j]
        w = (e - board.scenes[j][0] + 1) / (board.transition + 1)
        return (1 - w) * scenes[j - 1] + w * scenes[j]

    seen = []  # per U-Net call during ticks: (tick, input frames, contexts)

    def probe(_module, args):
        x, _, context = args[0], args[1], args[2]
        b = x.shape[0]  # each call runs both branches of its samples: 2b contexts, conditional first
        assert context.shape[0] == 2 * b
        if stream.engine.queue is None:  # the base clip: the first scene's prompt
            assert torch.equal(context[:b], scenes[:1].expand(b, -1, -1))
            return
        assert context.dim() == 4  # one context per frame
        q, tick = stream.engine.queue, stream.engine.tick
        for r in range(2 * b):
            for t in range(x.shape[2]):
                slot = [i for i in range(q.shape[2]) if torch.equal(q[0, :, i], x[r % b, :, t])]
                assert len(slot) == 1
                if r < b:
                    frame = tick + slot[0] - stream.settings.emit_slot - skip
                    assert torch.allclose(context[r, t], by_hand(frame), atol=1e-6), (tick, slot, frame)
                    seen.append((tick, x[r, :, t].clone(), context[r, t].clone()))
                else:
                    assert torch.equal(context[r, t], uncond)

    hook = model.unet.register_forward_pre_hook(probe)
    try:
        emitted = [stream.next_latent() for _ in range(6)]
    finally:
        hook.remove()
        stream.close()
    # Independent anchor: the finished latent of emitted frame e is (up to rounding) the U-Net
    # input of its last, identity step, which must have carried frame e's context.
    for e, z in enumerate(emitted):
        last = [ctx for tick, x, ctx in seen if tick == e + skip and torch.allclose(x, z[0], atol=1e-5)]
        assert last and all(torch.allclose(ctx, by_hand(e), atol=1e-6) for ctx in last), e
    assert not torch.allclose(by_hand(0), by_hand(2)) and not torch.allclose(by_hand(2), by_hand(3))  # blended, then pure


@torch.no_grad()
def test_frames_before_the_next_scene_match_the_plain_prompt(tiny):
    cfg = load_config("tiny-random", ["sampling.partitions=1"])
    plain = FrameStream(tiny, cfg, "a red circle", seed=1)
    board = FrameStream(tiny, cfg, Storyboard.parse(["a red circle", "50: a blue square"]), seed=1)
    try:
        for _ in range(3):
            assert torch.equal(plain.next_latent(), board.next_latent())
    finally:
        plain.close()
        board.close()


@torch.no_grad()
def test_a_scene_added_while_running_makes_the_frames_of_one_planned_from_the_start(tiny):
    cfg = load_config("tiny-random", ["sampling.partitions=1"])
    live = FrameStream(tiny, cfg, "a red circle", seed=2)
    plain = FrameStream(tiny, cfg, "a red circle", seed=2)
    try:
        got = [live.next_latent() for _ in range(3)]
        frame = live.live_frame
        assert frame == int(live.engine.slot_frames()[-1]) - live.skip  # the slot that has not been denoised yet
        with pytest.raises(StoryboardError, match=f"already in the queue; a prompt can start at frame {frame}"):
            live.add_scene(frame - 1, "a blue square")
        live.add_scene(frame, "a blue square", transition=2)
        got += [live.next_latent() for _ in range(frame + 3 - 3)]
        planned = FrameStream(tiny, cfg, Storyboard.parse(["a red circle", {"frame": frame, "prompt": "a blue square", "transition": 2}]), seed=2)
        want = [planned.next_latent() for _ in range(len(got))]
        plain_latents = [plain.next_latent() for _ in range(len(got))]
    finally:
        live.close()
        plain.close()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[-1], plain_latents[-1])  # the new prompt reached the frames after it
