"""The Santa test: does a long video keep what its prompt leaves open?

    python tools/santa.py --out runs/santa --seeds 10 --frames 2000
    python tools/santa.py --out runs/santa-quick --seeds 4 --frames 512 --settings plain,bank,bank+qcache
    python tools/santa.py --out runs/santa-story --storyboard --settings plain,recommended
    python tools/santa.py --ckpt runs/v2/tiny-shapes.safetensors ...   # other world v2 weights (see models/tiny-shapes.md)
    python tools/santa.py --windows 16 --ckpt ...   # first: does the model keep them within one window?
    python tools/santa.py --extend 8 --frames 64 --settings plain,bank --ckpt ...   # and past the end of a clip?
    python tools/santa.py --reference yellow,red --settings plain,anchor --ckpt ...   # the user's image as the identity

Every prompt leaves the body color open ("a circle moves right on a black background") and
no prompt names the hat, so both are chosen by the first frames' noise; the question is whether
frame 2,000 still shows frame 0's, while the object keeps moving (the speed column: a control
that holds identity by freezing the video shows there). Each cell (setting x seed) generates a video on the embedded
model and reads every frame with ``world.read_frame`` (the generated frames themselves, no
encode); ``tools/eval_consistency.py`` computes retention, changes per 1,000 frames (a new value
held >= 4 frames) and frames until the first change for each open attribute.

``--storyboard`` runs three scenes that never name the color (direction and background change
at frames 600 and 1,200; use --frames 1800 or more) to measure identity across scene changes; each
cell also reports, per scene, the fraction of its frames that show the background it names and that
move along the axis of the direction it names (objects bounce off the borders: the axis is what a
caption's direction fixes).

``--windows N`` checks the model first: N plain DDIM clips of one window (every frame at one
noise level, no FIFO), the color left open. Controls that carry identity from window to window
cannot help a model that does not keep it within one (``OUT/windows.json``, also per shape).

``--extend N`` continues N world clips (the last window of a 32-frame render, as
``--init-video`` does) whose body color and hat are known, the prompt leaving both open, and
counts the new frames that keep them: from the first new frame, and in all (``OUT/extend.json``).

``--prompt TEXT`` gives every seed that prompt instead of its own (the scene of #20's reference-image
test: ``--prompt "a circle moves right on a black background" --reference yellow,red``).

``--reference BODY,HAT`` gives every cell a reference image: the seed's scene rendered with that
body and hat color, the reference of every enabled control (``reference_image``); each cell then
also reports ``reference_match``, the fraction of frames showing that body and that hat.

Resumable: each finished cell is written to ``OUT/cells/`` and skipped on the next run; what the
cells depend on (config, weights and their SHA-256, frames, prompt, storyboard, reference) is kept in ``OUT/run.json``,
and a rerun into the same OUT with other values is refused, so cells of two runs never mix. The
summary is ``OUT/results.json``, ``OUT/results.md`` (a Markdown table) and ``OUT/results.png``
(per setting, the fraction of seeds whose hat is still frame 0's, over time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_consistency  # noqa: E402
from fifo_stream import world  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.consistency.storyboard import Storyboard  # noqa: E402
from fifo_stream.durable import atomic_write  # noqa: E402
from fifo_stream.errors import FifoStreamError  # noqa: E402
from fifo_stream.inputs.fit import fit_frame  # noqa: E402
from fifo_stream.inputs.record import describe_input  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.pipeline import FrameStream, StartClip, fifo_settings  # noqa: E402
from fifo_stream.sampling.ddim import sample_ddim  # noqa: E402

OFF = ["consistency.qcache.enabled=false", "consistency.refbank.enabled=false", "consistency.anchor.enabled=false", "consistency.shared_noise=0",
       "sampling.tail_noise=iid"]
BANK = [*OFF, "consistency.refbank.enabled=true"]
# Each setting is every control off but its own, whatever the config turns on; "recommended" is the config's own
# (and "hold-smaller-part" the config's own with that option).
SETTINGS = {
    "plain": ["consistency.enabled=false"],
    "qcache": [*OFF, "consistency.qcache.enabled=true"],
    "bank": BANK,
    "bank-replace": [*BANK, "consistency.refbank.mode=replace"],
    "bank-m0.95": [*BANK, "consistency.refbank.momentum=0.95"],
    "bank-m0.5": [*BANK, "consistency.refbank.momentum=0.5"],
    "bank-all-layers": [*BANK, "consistency.refbank.layers=all"],
    "bank-encoder": [*BANK, "consistency.refbank.layers=encoder"],
    "bank+qcache": [*BANK, "consistency.qcache.enabled=true"],
    "tail-coherent": [*OFF, "sampling.tail_noise=coherent"],
    "tail-dependency": [*OFF, "sampling.tail_noise=dependency"],
    "tail-mixed": [*OFF, "sampling.tail_noise=mixed"],
    **{f"shared-{a}": [*OFF, f"consistency.shared_noise={a}"] for a in (0.3, 0.5, 0.9)},
    "anchor": [*OFF, "consistency.anchor.enabled=true"],
    "anchor-3-bands": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.bands=3"],
    "anchor-top-half": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.min_level=8"],
    "anchor-start": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.reference=start"],
    "anchor-start-3-bands": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.reference=start", "consistency.anchor.bands=3"],
    "template-start": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.reference=start", "consistency.anchor.mode=template"],
    "template-start-top-half": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.reference=start", "consistency.anchor.mode=template",
                                "consistency.anchor.min_level=8"],
    "template": [*OFF, "consistency.anchor.enabled=true", "consistency.anchor.mode=template"],
    "recommended": [],
    "hold-smaller-part": ["consistency.anchor.hold_smaller_part=true"],  # the hat's thin cells held whole: configs/tiny.yaml's own since late 2026-12-07
}
SCENE_CHANGES = (600, 1200)


def prompt(seed: int, storyboard: bool) -> str | list[str]:
    """The seed's prompt, the body color left open; a storyboard of three scenes with ``storyboard``."""
    rng = np.random.default_rng([seed, 5])
    shape = str(rng.choice(world.SHAPES))
    directions = rng.permutation(world.DIRECTIONS)[:3]
    backgrounds = rng.permutation(list(world.BACKGROUNDS))[:3]
    scenes = [f"a {shape} moves {d} on a {b} background" for d, b in zip(directions, backgrounds)]
    if not storyboard:
        return scenes[0]
    return [scenes[0], *(f"{frame}: {text}" for frame, text in zip(SCENE_CHANGES, scenes[1:]))]


def reference_image(text: str, seed: int, colors: tuple[str, str], size: int) -> np.ndarray:
    """The seed's scene of caption ``text``, its object drawn with body and hat ``colors``: one frame (size, size, 3)."""
    scene = world.scene_from_caption(text, size, seed, open_identity=True)
    obj = dataclasses.replace(scene.objects[0], color=colors[0], hat=colors[1])
    return world.render(dataclasses.replace(scene, objects=(obj,)), size, 1)[0]


def scene_following(per_frame: dict, story: Storyboard) -> list[dict]:
    """Per scene: the fraction of its frames showing the background it names, and of those moving along
    the axis of the direction it names (:func:`eval_consistency.along_axis`; objects bounce off the borders,
    so a frame's motion may rightly oppose the caption's sign). Where two scenes name the same axis
    (left, then right) the second's direction cannot be told from the first's. ``per_frame``: the
    centers and backgrounds :func:`eval_consistency.evaluate` read."""
    out = []
    for j, scene in enumerate(story.scenes):
        frames = slice(scene.frame, story.scenes[j + 1].frame if j + 1 < len(story.scenes) else len(per_frame["centers"]))
        if per_frame["centers"][frames]:
            _, background, direction = world.parse_caption(scene.prompt)
            out.append({"frame": scene.frame, "prompt": scene.prompt, "background": float(np.mean([b == background for b in per_frame["backgrounds"][frames]])),
                        "direction": float(np.mean(eval_consistency.along_axis(per_frame["centers"][frames], direction)))})
    return out


def run_cell(model, cfg, text: str | list[str], frames: int, seed: int, reference: tuple[str, str] | None = None) -> dict:
    """Generate one video and score it (per-frame readings kept for the plot); with ``reference``
    (body, hat) the controls hold a rendered reference image and the report says how many frames show it."""
    story = Storyboard.parse([text] if isinstance(text, str) else text, cfg.storyboard.transition)
    image = reference_image(story.prompts[0], seed, reference, cfg.video.height) if reference else None
    start = time.perf_counter()
    stream = FrameStream(model, cfg, story, seed, reference_image=image)
    try:
        video = [next(stream) for _ in range(frames)]
    finally:
        stream.close()
    seconds = time.perf_counter() - start
    report = eval_consistency.evaluate(video, story.prompts[0])
    if reference:
        report["reference"] = list(reference)
        report["reference_match"] = float(np.mean([r[0] == reference[0] and r[2] == reference[1] for r in report["per_frame"]["readings"]]))
    if not isinstance(text, str):  # later scenes name other directions and backgrounds, never the color
        report["storyboard"] = text
        report["scenes"] = scene_following(report["per_frame"], story)
    report["s_per_frame"] = seconds / frames
    report["seed"] = seed
    return report


def rescored(report: dict) -> dict:
    """A stored cell with its open attributes (and a storyboard's scenes, where its centers were kept)
    scored again from its per-frame readings by today's :func:`eval_consistency.identity` and
    :func:`scene_following`, so a grid resumed across a change of those measures reads as one (the
    readings themselves are the reader's of the time: the frames are not kept)."""
    readings = [world.Reading(*r) for r in report["per_frame"]["readings"]]
    report = {**report, "open": eval_consistency.open_identity(readings, report["open"])}
    if "storyboard" in report and "centers" in report["per_frame"]:
        report["scenes"] = scene_following(report["per_frame"], Storyboard.parse(report["storyboard"]))
    return report


def agreement(values: list) -> tuple[bool, float]:
    """(every frame shows one value, the fraction of frames showing the most common one); None (unreadable) never agrees."""
    read = [v for v in values if v is not None]
    return len(read) == len(values) and len(set(read)) == 1, max((read.count(v) for v in read), default=0) / len(values)


def window_check(model, cfg, seeds: int) -> dict:
    """Per open attribute: the fraction of one-window DDIM clips showing one value in every frame,
    and the mean fraction of a clip's frames showing its most common value (unreadable frames never agree);
    the mean fraction of frames moving along the named direction's axis (``direction``);
    the agreements and the fraction of frames with a readable hat also per shape (``by_shape``)."""
    s = fifo_settings(cfg, model)
    unet = lambda x, t, c, attention_kwargs=None, branches=1: model.unet(x, t, c, s.fps, attention_kwargs, branches)  # noqa: E731
    uncond = model.encode_text([cfg.sampling.negative_prompt])
    h, w = cfg.video.height // model.spatial_factor, cfg.video.width // model.spatial_factor
    one, share, along = {"color": [], "hat": []}, {"color": [], "hat": []}, []
    by_shape: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        g = torch.Generator(device=model.device).manual_seed(seed)
        noise = torch.randn((1, model.unet.in_channels, s.frames, h, w), generator=g, device=model.device)
        text = prompt(seed, False)
        clip = sample_ddim(unet, noise, model.encode_text([text]), uncond, model.alphas, s.steps, s.guidance_scale, s.eta, g, model.scales, s.clip_x0)
        frames = model.decode(clip, cfg.sampling.vae_batch)[0].numpy()
        readings = [world.read_frame(f) for f in frames]
        ((_, shape),), _, direction = world.parse_caption(text)
        along.append(float(np.mean(eval_consistency.along_axis([world.centroid(f) for f in frames], direction))))
        shape_stats = by_shape.setdefault(shape, {"color_agreement": [], "hat_agreement": [], "hat_readable": []})
        shape_stats["hat_readable"].append(float(np.mean([r.hat is not None for r in readings])))
        for attr in one:
            kept, agreeing = agreement([getattr(r, attr) for r in readings])
            one[attr].append(kept)
            share[attr].append(agreeing)
            shape_stats[f"{attr}_agreement"].append(agreeing)
    return {"seeds": seeds, "frames": s.frames,
            **{f"{a}_one_value": float(np.mean(one[a])) for a in one}, **{f"{a}_agreement": float(np.mean(share[a])) for a in one},
            "direction": float(np.mean(along)),
            "by_shape": {name: {k: float(np.mean(v)) for k, v in m.items()} | {"clips": len(m["hat_readable"])} for name, m in sorted(by_shape.items())}}


def leading_run(values: list, value) -> int:
    """How many frames from the first show ``value``."""
    return next((i for i, v in enumerate(values) if v != value), len(values))


def extend_check(model, cfg, seeds: int, frames: int) -> dict:
    """Continue world clips whose body color and hat are known (the prompt leaves both open) and
    count, per attribute, the new frames that keep the clip's value: from the first one, and in all."""
    size, f = cfg.video.height, model.frames_per_window
    kept, share = {"color": [], "hat": []}, {"color": [], "hat": []}
    for seed in range(seeds):
        text = prompt(seed, False)
        scene = world.scene_from_caption(text, size, seed, open_identity=True)
        clip = np.stack([fit_frame(frame, cfg.video.width, size) for frame in world.render(scene, size, f, start=24)])  # the end of a 32-frame clip
        stream = FrameStream(model, cfg, text, seed, start=StartClip(clip, 0.0))
        try:
            readings = [world.read_frame(next(stream)) for _ in range(frames)]
        finally:
            stream.close()
        for attr, truth in (("color", scene.objects[0].color), ("hat", scene.objects[0].hat)):
            values = [getattr(r, attr) for r in readings]
            kept[attr].append(leading_run(values, truth))
            share[attr].append(values.count(truth) / frames)
    return {"seeds": seeds, "frames": frames, **{f"{a}_kept_frames": kept[a] for a in kept},
            **{f"{a}_retention": float(np.mean(share[a])) for a in share}}


def summarize(cells: dict[str, list[dict]]) -> dict:
    """Per setting: means and worst seeds of the open attributes' identity, accuracy, flicker, speed."""
    out = {}
    for name, reports in cells.items():
        row = {"seeds": len(reports), "frames": reports[0]["frames"]}
        for attr in ("color", "hat"):
            ms = [r["open"][attr] for r in reports]
            row[f"{attr}_retention"] = float(np.mean([m["retention"] for m in ms]))
            row[f"{attr}_retention_worst"] = float(min(m["retention"] for m in ms))
            row[f"{attr}_changes_per_1000"] = float(np.mean([m["changes_per_1000"] for m in ms]))
            row[f"{attr}_kept_all"] = sum(m["changes"] == 0 for m in ms)
        row["shape_accuracy"] = float(np.mean([r["shape_accuracy"] for r in reports]))
        row["flicker"] = float(np.mean([r["flicker"] for r in reports]))
        row["speed"] = float(np.mean([r["speed"] for r in reports]))
        row["s_per_frame"] = float(np.mean([r["s_per_frame"] for r in reports]))
        if "scenes" in reports[0]:
            scenes = [sc for r in reports for sc in r["scenes"]]
            row["scene_background"] = float(np.mean([sc["background"] for sc in scenes]))
            row["scene_background_worst"] = float(min(sc["background"] for sc in scenes))
            if all("direction" in sc for sc in scenes):  # cells from before the direction was scored have none
                row["scene_direction"] = float(np.mean([sc["direction"] for sc in scenes]))
                row["scene_direction_worst"] = float(min(sc["direction"] for sc in scenes))
        if "reference_match" in reports[0]:
            row["reference_match"] = float(np.mean([r["reference_match"] for r in reports]))
            row["reference_match_worst"] = float(min(r["reference_match"] for r in reports))
        out[name] = row
    return out


def table(summary: dict) -> str:
    head = ("setting", "seeds x frames", "color retention (mean / worst)", "color changes / 1k", "hat retention (mean / worst)",
            "hat changes / 1k", "seeds keeping color / hat", "shape accuracy", "flicker", "speed (px/frame)", "s/frame")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['seeds']} x {r['frames']} | {r['color_retention']:.3f} / {r['color_retention_worst']:.3f} | "
            f"{r['color_changes_per_1000']:.2f} | {r['hat_retention']:.3f} / {r['hat_retention_worst']:.3f} | {r['hat_changes_per_1000']:.2f} | "
            f"{r['color_kept_all']} / {r['hat_kept_all']} | {r['shape_accuracy']:.3f} | {r['flicker']:.3f} | {r['speed']:.2f} | {r['s_per_frame']:.3f} |"
        )
    scenes = [f"| {name} | {r['scene_background']:.3f} / {r['scene_background_worst']:.3f} | "
              + (f"{r['scene_direction']:.3f} / {r['scene_direction_worst']:.3f} |" if "scene_direction" in r else "not scored |")
              for name, r in summary.items() if "scene_background" in r]
    if scenes:
        lines += ["", "| setting | scene frames showing the scene's background (mean / worst scene) | moving along its direction's axis (mean / worst scene) |",
                  "| --- | --- | --- |", *scenes]
    matches = [f"| {name} | {r['reference_match']:.3f} / {r['reference_match_worst']:.3f} |" for name, r in summary.items() if "reference_match" in r]
    if matches:
        lines += ["", "| setting | frames showing the reference's body and hat (mean / worst) |", "| --- | --- |", *matches]
    return "\n".join(lines) + "\n"


def plot(cells: dict[str, list[dict]], path: Path) -> None:
    """Per setting, the fraction of seeds whose body color and hat have not changed yet, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, attr in zip(axes, ("color", "hat")):
        for name, reports in cells.items():
            frames = reports[0]["frames"]
            firsts = [r["open"][attr]["first_change"] for r in reports]
            kept = [np.mean([f is None or f > t for f in firsts]) for t in range(frames)]
            ax.plot(range(frames), kept, label=name, lw=1)
        ax.set_title(f"{attr}: seeds still showing frame 0's value")
        ax.set_xlabel("frame")
    axes[0].set_ylabel("fraction of seeds")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_same_run(path: Path, options: dict) -> None:
    """Record the options the cells depend on in ``path``; refuse (one line) if it holds others."""
    if path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in sorted(set(before) | set(options)) if before.get(k) != options.get(k)]
        if changed:
            was = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
            raise SystemExit(f"error: {path.parent} holds cells made with {was}; rerun with those options or choose another --out")
    else:
        atomic_write(path, (json.dumps(options) + "\n").encode())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/santa")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--storyboard", action="store_true", help="three scenes, changing at frames 600 and 1,200")
    p.add_argument("--prompt", default=None, help="one single-object prompt for every seed instead of each seed's own (see above)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--ckpt", default=None, help="model weights (default: the config's); hats need a world v2 model")
    p.add_argument("--windows", type=int, default=0, metavar="N", help="only check N one-window clips (see above)")
    p.add_argument("--reference", default=None, metavar="BODY,HAT", help="a rendered reference image with these body and hat colors (see above)")
    p.add_argument("--extend", type=int, default=0, metavar="N", help="only continue N world clips of known identity, --frames new frames each, per --settings (see above)")
    args = p.parse_args(argv)
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    if args.windows or args.extend:
        ignored = [flag for flag, given in (("--extend", args.windows and args.extend), ("--prompt", args.prompt is not None),
                                             ("--reference", args.reference), ("--storyboard", args.storyboard)) if given]
        if ignored:
            raise SystemExit(f"error: --{'windows' if args.windows else 'extend'} makes its own clips and takes no {', '.join(ignored)}; run those apart")
    if args.storyboard and args.frames <= SCENE_CHANGES[-1]:
        raise SystemExit(f"error: --storyboard needs --frames above {SCENE_CHANGES[-1]} (its last scene starts there)")
    if args.prompt is not None and (args.storyboard or len(world.parse_caption(args.prompt)[0]) != 1):
        raise SystemExit("error: --prompt takes one caption of one object, e.g. 'a circle moves right on a black background', and no --storyboard")
    reference = tuple(args.reference.split(",")) if args.reference else None
    if reference and (len(reference) != 2 or reference[0] == reference[1] or not set(reference) <= set(world.COLORS)):
        raise SystemExit(f"error: --reference takes two different colors BODY,HAT of: {', '.join(world.COLORS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(load_config(args.config), args.ckpt)  # the settings change sampling and consistency, not the model
    if args.prompt is not None:
        try:
            model.text_encoder.tokenizer([args.prompt])  # unknown words, before any cell runs
        except FifoStreamError as e:
            raise SystemExit(f"error: --prompt: {e}") from None
    if args.windows:
        report = window_check(model, load_config(args.config), args.windows)
        atomic_write(out / "windows.json", (json.dumps(report) + "\n").encode())
        print(json.dumps(report))
        return
    if args.extend:
        report = {name: extend_check(model, load_config(args.config, SETTINGS[name]), args.extend, args.frames) for name in names}
        atomic_write(out / "extend.json", (json.dumps(report) + "\n").encode())
        print(json.dumps(report))
        return
    check_same_run(out / "run.json", {
        "config": args.config, "ckpt": args.ckpt, "ckpt_sha256": describe_input(args.ckpt)["sha256"] if args.ckpt else None,
        "frames": args.frames, "prompt": args.prompt, "storyboard": args.storyboard, "reference": args.reference,
    })
    (out / "cells").mkdir(exist_ok=True)
    cells: dict[str, list[dict]] = {}
    for seed in range(args.seeds):  # seeds outermost: an interrupted grid has every setting on the first seeds
        for name in names:
            path = out / "cells" / f"{name}-{seed}.json"
            if not path.exists():
                cfg = load_config(args.config, SETTINGS[name])
                report = run_cell(model, cfg, args.prompt or prompt(seed, args.storyboard), args.frames, seed, reference)
                atomic_write(path, (json.dumps(report) + "\n").encode())
                print(json.dumps({"setting": name, "seed": seed, **{a: m["retention"] for a, m in report["open"].items()}}), flush=True)
            cells.setdefault(name, []).append(rescored(json.loads(path.read_text())))
    summary = summarize(cells)
    atomic_write(out / "results.json", (json.dumps(summary, indent=1) + "\n").encode())
    atomic_write(out / "results.md", table(summary).encode())
    plot(cells, out / "results.png")
    print(table(summary))


if __name__ == "__main__":
    main()
