"""Progress events: JSON lines, the status snapshot, subscribers, and the lines a terminal gets."""

import io
import json

from fifo_stream.consistency.storyboard import Scene
from fifo_stream.live import LiveControl, Progress, PromptRequest, parse_line


def test_json_mode_writes_one_object_per_line():
    out = io.StringIO()
    progress = Progress(10, [{"frame": 0, "prompt": "a red circle"}], "json", out)
    progress.start(4)
    progress.frame("a red circle")
    progress.frame("a red circle")
    progress.checkpoint()
    progress.scene(Scene(8, "a blue square", 2), "web")
    progress.error("prompt refused (web): no")
    progress.note({"event": "finished", "frame": 10})
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["frame", "frame", "checkpoint", "prompt", "error", "finished"]
    assert events[1]["frame"] == 6 and events[1]["total"] == 10 and events[1]["prompt"] == "a red circle"
    assert events[1]["fps"] > 0 and events[1]["eta_s"] == round(4 / events[1]["fps"], 1)
    assert events[3] == {"event": "prompt", "frame": 8, "prompt": "a blue square", "transition": 2, "anchor": "keep", "source": "web"}
    status = progress.status()
    assert status["storyboard"][-1] == {"frame": 8, "prompt": "a blue square", "transition": 2}
    assert status["checkpoints"] == 1 and status["errors"] == ["prompt refused (web): no"]


def test_subscribers_get_every_later_event_and_terminals_get_lines():
    out = io.StringIO()
    progress = Progress(5, [{"frame": 0, "prompt": "p"}], "none", out)
    progress.start(0)
    events = progress.subscribe()
    progress.frame("p")
    progress.scene(Scene(3, "q", anchor="renew"), "prompts-from")
    progress.unsubscribe(events)
    progress.frame("q")
    assert [events.get_nowait()["event"] for _ in range(2)] == ["frame", "prompt"] and events.empty()
    assert out.getvalue() == "fifo-stream: prompt from frame 3 (prompts-from): q (anchor renew)\n"  # no per-frame lines without a bar
    assert progress.status()["storyboard"][-1] == {"frame": 3, "prompt": "q", "anchor": "renew"}


def test_prompt_lines_and_the_request_queue():
    later = parse_line("  120: a blue square moves left ")
    assert (later.prompt, later.frame, later.transition, later.source) == ("a blue square moves left", 120, None, "prompts-from")
    now = parse_line("a red circle")
    assert now.frame is None and now.prompt == "a red circle" and now.anchor == "keep"
    renewed, renewed_now = parse_line("120 renew: a blue square"), parse_line("renew: a blue square")
    assert (renewed.frame, renewed.prompt, renewed.anchor) == (120, "a blue square", "renew")
    assert (renewed_now.frame, renewed_now.prompt, renewed_now.anchor) == (None, "a blue square", "renew")
    assert parse_line("santa: ho ho").prompt == "santa: ho ho"  # a colon in the prompt alone is the prompt's
    assert parse_line("   ") is None and parse_line("# a comment") is None
    control = LiveControl()
    first, second = PromptRequest("a"), PromptRequest("b")
    control.submit(first)
    control.submit(second)
    assert control.take() is first
    control.refuse_waiting("the run has stopped")
    assert control.take() is None and "stopped" in str(second.answer.exception())
