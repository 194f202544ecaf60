"""tools/santa.py: the grid's cells, its resumability, and the summary it writes."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import eval_consistency  # noqa: E402
import santa  # noqa: E402

from fifo_stream import world  # noqa: E402


def test_prompts_leave_the_color_open_and_storyboards_never_name_it():
    for seed in range(6):
        text = santa.prompt(seed, storyboard=False)
        (pair,), background, direction = world.parse_caption(text)
        assert pair[0] is None and background and direction
        story = santa.prompt(seed, storyboard=True)
        assert story[0] == text and [s.split(":")[0] for s in story[1:]] == [str(f) for f in santa.SCENE_CHANGES]
        assert all(world.parse_caption(s)[0][0] == (None, pair[1]) for s in story)


def test_scene_following_reads_each_scenes_background_and_direction():
    from fifo_stream.consistency.storyboard import Storyboard

    texts = ["a circle moves right on a black background", "a circle moves down on a white background", "a circle moves left on a gradient background"]
    story = Storyboard.parse([texts[0], f"40: {texts[1]}", f"80: {texts[2]}"])
    renders = [world.render(world.scene_from_caption(t, 64, seed=i, open_identity=True), 64, 40) for i, t in enumerate(texts)]
    per_frame = lambda frames: {"centers": [world.centroid(f) for f in frames], "backgrounds": [world.read_background(f) for f in frames]}  # noqa: E731
    followed = santa.scene_following(per_frame([f for r in renders for f in r]), story)
    assert [sc["background"] for sc in followed] == [1.0, 1.0, 1.0]
    assert all(sc["direction"] >= 0.95 for sc in followed), followed
    stuck = santa.scene_following(per_frame([f for f in renders[0]] * 3), story)  # the first scene's frames throughout
    assert [sc["background"] for sc in stuck] == [1.0, 0.0, 0.0]
    assert stuck[1]["direction"] <= 0.05 and stuck[2]["direction"] >= 0.95, stuck  # left after right: the same axis


def test_each_setting_turns_on_only_its_own_controls_whatever_the_config_turns_on():
    from fifo_stream.config import load_config

    config_on = ["consistency.qcache.enabled=true", "consistency.refbank.enabled=true", "consistency.anchor.enabled=true",
                 "consistency.shared_noise=0.2", "sampling.tail_noise=mixed"]
    for name, overrides in santa.SETTINGS.items():
        cfg = load_config("tiny-random", [*config_on, *overrides])
        on = {k for k, v in (("qcache", cfg.consistency.qcache.enabled), ("bank", cfg.consistency.refbank.enabled),
                             ("anchor", cfg.consistency.anchor.enabled), ("shared", cfg.consistency.shared_noise > 0),
                             ("tail", cfg.sampling.tail_noise != "iid")) if v}
        own = {"qcache", "bank", "anchor", "shared", "tail"}
        want = {"plain": set(), "qcache": {"qcache"}, "bank+qcache": {"bank", "qcache"}, "recommended": own, "hold-smaller-part": own}
        kind = next((k for prefix, k in (("bank", "bank"), ("shared", "shared"), ("anchor", "anchor"), ("template", "anchor")) if name.startswith(prefix)), "tail")
        assert on == want.get(name, {kind}), name
    assert load_config("tiny-random", santa.SETTINGS["shared-0.5"]).consistency.shared_noise == 0.5
    assert load_config("tiny-random", santa.SETTINGS["hold-smaller-part"]).consistency.anchor.hold_smaller_part


def test_a_small_grid_writes_its_cells_and_resumes(tmp_path, capsys):
    out = tmp_path / "grid"
    base = ["--out", str(out), "--seeds", "1", "--frames", "6", "--config", "tiny-random"]
    args = [*base, "--settings", "plain,bank"]
    santa.main(args)
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["bank-0.json", "plain-0.json"]
    report = json.loads((out / "cells" / "plain-0.json").read_text())
    assert report["frames"] == 6 and set(report["open"]) == {"color", "hat"} and report["s_per_frame"] > 0 and report["speed"] >= 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"plain", "bank"} and summary["plain"]["seeds"] == 1
    assert (out / "results.md").read_text().startswith("| setting |")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    capsys.readouterr()
    santa.main(args)  # every cell is done: nothing is generated again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before
    assert '"setting"' not in capsys.readouterr().out
    stored = json.loads((out / "cells" / "plain-0.json").read_text())
    stored["open"]["hat"] = {**stored["open"]["hat"], "changes": 999, "retention": -1.0}  # scored by another day's measure
    (out / "cells" / "plain-0.json").write_text(json.dumps(stored))
    santa.main(args)  # cells are scored again from their readings
    hat = eval_consistency.identity([r[2] for r in stored["per_frame"]["readings"]])
    assert json.loads((out / "results.json").read_text())["plain"]["hat_retention"] == hat["retention"] >= 0
    with pytest.raises(SystemExit, match="unknown setting"):
        santa.main([*base, "--settings", "plain,nonsense"])


def test_a_reference_image_is_the_seeds_scene_in_the_given_colors_and_cells_report_the_match(tmp_path):
    image = santa.reference_image(santa.prompt(2, False), 2, ("yellow", "red"), 64)
    assert tuple(world.read_frame(image)) == ("yellow", world.parse_caption(santa.prompt(2, False))[0][0][1], "red")
    out = tmp_path / "ref"
    santa.main(["--out", str(out), "--seeds", "1", "--frames", "4", "--config", "tiny-random", "--settings", "anchor", "--reference", "yellow,red"])
    report = json.loads((out / "cells" / "anchor-0.json").read_text())
    readings = report["per_frame"]["readings"]
    assert report["reference_match"] == sum(r[0] == "yellow" and r[2] == "red" for r in readings) / 4
    assert "frames showing the reference's body and hat" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="two different colors"):
        santa.main(["--out", str(out), "--reference", "yellow,yellow"])


def test_a_given_prompt_replaces_each_seeds_own(tmp_path):
    text = "a circle moves right on a black background"
    out = tmp_path / "given"
    santa.main(["--out", str(out), "--seeds", "2", "--frames", "2", "--config", "tiny-random", "--settings", "plain", "--prompt", text])
    assert {json.loads((out / "cells" / f"plain-{s}.json").read_text())["prompt"] for s in (0, 1)} == {text}
    for bad in (["--prompt", "a red circle and a blue square move on a black background"], ["--prompt", text, "--storyboard", "--frames", "1300"]):
        with pytest.raises(SystemExit, match="one caption of one object"):
            santa.main(["--out", str(out), *bad])


def test_window_agreement_and_check(tmp_path):
    assert santa.agreement(["red"] * 8) == (True, 1.0)
    assert santa.agreement(["red"] * 6 + ["blue", None]) == (False, 0.75)
    assert santa.agreement([None] * 8) == (False, 0.0)
    santa.main(["--out", str(tmp_path), "--windows", "2", "--config", "tiny-random"])
    report = json.loads((tmp_path / "windows.json").read_text())
    assert report["seeds"] == 2 and report["frames"] == 8 and not (tmp_path / "cells").exists()
    assert all(0.0 <= report[f"{a}_{m}"] <= 1.0 for a in ("color", "hat") for m in ("one_value", "agreement"))
    assert 0.0 <= report["direction"] <= 1.0
    shapes = {world.parse_caption(santa.prompt(seed, False))[0][0][1] for seed in range(2)}
    assert set(report["by_shape"]) == shapes and sum(m["clips"] for m in report["by_shape"].values()) == 2
    assert all(0.0 <= m[k] <= 1.0 for m in report["by_shape"].values() for k in ("color_agreement", "hat_agreement", "hat_readable"))
    with pytest.raises(SystemExit, match="--windows makes its own clips and takes no --extend, --prompt; run those apart"):
        santa.main(["--out", str(tmp_path / "mixed"), "--windows", "2", "--extend", "2", "--prompt", "a circle moves right on a black background"])
    with pytest.raises(SystemExit, match="--extend makes its own clips and takes no --reference, --storyboard;"):
        santa.main(["--out", str(tmp_path / "mixed"), "--extend", "2", "--reference", "yellow,red", "--storyboard"])
    assert not (tmp_path / "mixed").exists()  # refused before anything is written


def test_extend_counts_the_new_frames_that_keep_the_clip_identity(tmp_path):
    assert santa.leading_run(["red", "red", None, "red"], "red") == 2 and santa.leading_run(["red"] * 3, "red") == 3
    santa.main(["--out", str(tmp_path), "--extend", "2", "--frames", "3", "--settings", "plain,bank", "--config", "tiny-random"])
    report = json.loads((tmp_path / "extend.json").read_text())
    assert set(report) == {"plain", "bank"}
    for r in report.values():
        assert r["seeds"] == 2 and r["frames"] == 3 and len(r["color_kept_frames"]) == 2 and len(r["hat_kept_frames"]) == 2
        assert all(0 <= k <= 3 for k in r["color_kept_frames"] + r["hat_kept_frames"]) and 0 <= r["hat_retention"] <= 1


def test_a_rerun_with_other_options_is_refused_and_unknown_prompt_words_before_any_cell(tmp_path):
    out = tmp_path / "grid"
    base = ["--out", str(out), "--seeds", "1", "--config", "tiny-random", "--settings", "plain"]
    santa.main([*base, "--frames", "2"])
    with pytest.raises(SystemExit, match=r"made with prompt=None; .* another --out"):
        santa.main([*base, "--frames", "2", "--prompt", "a circle moves right on a black background"])
    with pytest.raises(SystemExit, match="made with frames=2;"):
        santa.main([*base, "--frames", "3"])
    assert [p.name for p in (out / "cells").iterdir()] == ["plain-0.json"]
    santa.main([*base, "--frames", "2", "--seeds", "2"])  # the same run, more seeds: resumes
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["plain-0.json", "plain-1.json"]
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="--prompt: .*'zebra'"):
        # the embedded model (a word vocabulary; tiny-random's BPE takes any word): refused at load, before any cell
        santa.main(["--out", str(fresh), "--seeds", "1", "--frames", "2", "--settings", "plain", "--prompt", "a circle moves right on a zebra background"])
    assert not (fresh / "cells").exists()


def test_the_template_anchor_holds_a_reference_image_whose_colors_the_prompt_leaves_open():
    """#20's reference-image acceptance on the embedded model (world v2): the reference's yellow body and
    red hat in >= 90% of 256 frames, the subject still moving; without the anchor, the seed's own colors."""
    from fifo_stream.config import load_config
    from fifo_stream.models.loading import load_model

    model = load_model(load_config("tiny"))
    text, reference = "a circle moves right on a black background", ("yellow", "red")
    held = santa.run_cell(model, load_config("tiny", santa.SETTINGS["template"]), text, 256, 0, reference)
    assert held["reference_match"] >= 0.9 and held["speed"] > 0.5
    free = santa.run_cell(model, load_config("tiny", santa.SETTINGS["plain"]), text, 32, 0, reference)
    assert free["reference_match"] < 0.5


def test_the_template_anchor_holds_the_subject_through_two_scene_changes():
    """#19's storyboard on the embedded model, scenes shortened (gray, then white at 60, black at 120):
    after the second change the subject shows frame 0's body and hat, each scene its own background.
    One template for every scene (its edge cells shifted to the new background) swapped them here:
    a yellow body under a green hat on black."""
    from fifo_stream.config import load_config
    from fifo_stream.models.loading import load_model

    model = load_model(load_config("tiny"))
    seed, story = 1, santa.prompt(1, storyboard=True)
    story = [story[0], *(f"{frame}: {entry.split(': ', 1)[1]}" for frame, entry in zip((60, 120), story[1:]))]
    report = santa.run_cell(model, load_config("tiny", santa.SETTINGS["template-start"]), story, 200, seed)
    first = report["first_frame"]
    last_scene = report["per_frame"]["readings"][128:]  # one window after the change: the scene's own template
    assert sum(r[0] == first[0] and r[2] == first[2] for r in last_scene) >= 0.85 * len(last_scene), (first, last_scene)
    assert all(scene["background"] >= 0.9 for scene in report["scenes"])


def test_the_defaults_keep_the_hat_and_color_that_plain_fifo_changes():
    """#19's regression on the embedded model: seed 1's triangle changes its hat and body color within
    96 frames under plain FIFO; configs/tiny.yaml's defaults (the template anchor) keep both, and it still moves."""
    from fifo_stream.config import load_config
    from fifo_stream.models.loading import load_model

    model = load_model(load_config("tiny"))
    seed, frames = 1, 96
    text = santa.prompt(seed, storyboard=False)
    plain = santa.run_cell(model, load_config("tiny", santa.SETTINGS["plain"]), text, frames, seed)
    assert plain["open"]["hat"]["changes"] >= 1 and plain["open"]["color"]["changes"] >= 1, plain["open"]
    held = santa.run_cell(model, load_config("tiny"), text, frames, seed)
    assert held["open"]["hat"]["changes"] == 0 and held["open"]["color"]["changes"] == 0, held["open"]
    assert held["open"]["hat"]["retention"] >= 0.97 and held["open"]["color"]["retention"] >= 0.97, held["open"]
    assert held["speed"] > 0.5
