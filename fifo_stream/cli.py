"""The ``fifo-stream`` command line.

Every user-caused problem ends as one line on stderr and a non-zero exit code:
2 bad input or configuration, 3 output closed or unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .errors import FifoStreamError, PeerExit
from .inputs.fit import FIT_MODES
from .outputs.formats import PIPE_FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config name in configs/ or a YAML path (default: $FIFO_STREAM_CONFIG, else tiny, the embedded model)")
    p.add_argument("--ckpt", default=None, help="model checkpoint (.ckpt or .safetensors); overrides model.checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a checkpoint you trust (can run code)")


def _add_live_args(p: argparse.ArgumentParser) -> None:
    from .live.progress import PROGRESS_MODES

    p.add_argument("--quiet", action="store_true", help="no progress output (same as --progress none)")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                   help="bar (on a terminal; the default), json (one JSON object per line on stderr, for programs) or none")
    p.add_argument("--preview-every", type=int, default=0, metavar="K", help="write RUN_DIR/preview.jpg every K frames (atomically)")
    p.add_argument("--serve", metavar="[HOST:]PORT", help="serve the live page (video, progress, a prompt box) on HOST (default 127.0.0.1):PORT; 0 picks a free port")
    p.add_argument("--serve-token", metavar="TOKEN", help="token every request to --serve must carry (needed for any host other than loopback)")
    p.add_argument("--prompts-from", metavar="FILE", help="live prompts, one per line: 'N: text' from frame N, 'text' as soon as possible; '-' reads stdin")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fifo-stream", description="Arbitrarily long text-to-video streaming with FIFO diagonal denoising.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video from a text prompt (or a storyboard of prompts)")
    gen.add_argument("prompt", nargs="?", help="the prompt (or the first prompt of a storyboard)")
    gen.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="'[N:] TEXT'",
                     help="storyboard prompt starting at emitted frame N (the first may leave out 'N:'); repeatable")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, help="number of frames to emit")
    length.add_argument("--seconds", type=float, default=30.0, help="length in seconds at video.fps (default 30)")
    gen.add_argument("--out", action="append", required=True, help="output: file.mp4|.mkv|.webm, '-' (stdout), rtmp://..., or dir/ for PNGs; repeatable")
    gen.add_argument("--pipe-format", choices=list(PIPE_FORMATS), default="matroska", help="container for --out - (default matroska)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--run-dir", default=None, help="where checkpoints and segments go (default: runs/DATE-TIME-PROMPT)")
    gen.add_argument("--checkpoint-every", type=int, default=100, metavar="K", help="checkpoint every K frames (default 100)")
    _add_live_args(gen)
    start = gen.add_mutually_exclusive_group()
    start.add_argument("--init-image", metavar="PATH", help="start the video from this image (PNG, JPEG, WebP; an animated image's first frame)")
    start.add_argument("--init-video", metavar="PATH", help="continue this video: its last frames (one window) start the generation")
    gen.add_argument("--init-strength", type=float, metavar="S",
                     help="how far the init footage is noised before denoising, 0..1 (default 0.8 for an image, 0 for a video)")
    gen.add_argument("--fit", choices=FIT_MODES, default="crop", help="fit footage to the video size: crop (default), pad or stretch")
    gen.add_argument("--pad-short", action="store_true", help="an init video shorter than one window repeats its last frame")
    gen.add_argument("--keep-input", action="store_true",
                     help="the outputs start with the whole init video (on video.fps), then the new frames")
    _add_model_args(gen)
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.partitions=2")

    res = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    res.add_argument("run_dir")
    res.add_argument("--force", action="store_true", help="use the checkpoint even if the config, model or init footage changed")
    _add_live_args(res)
    res.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a model checkpoint you trust (can run code)")

    info = sub.add_parser("info", help="show a run's progress, config and outputs")
    info.add_argument("run_dir")

    conv = sub.add_parser("convert", help="convert a checkpoint to .safetensors once, for fast and safe loading")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast floating tensors (default: keep stored dtypes)")
    conv.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a checkpoint you trust (can run code)")
    return parser


def cmd_convert(args) -> None:
    from .models.checkpoint import read_metadata, read_state_dict, save_safetensors
    from .models.loading import DTYPES

    src, dst = Path(args.input), Path(args.output)
    if dst.suffix != ".safetensors":
        raise FifoStreamError(f"output must end in .safetensors, got {dst}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise FifoStreamError("output would overwrite the input; choose another output path")
    if not dst.parent.is_dir():
        raise FifoStreamError(f"output directory {dst.parent} does not exist")
    state = read_state_dict(src, trust=args.trust_checkpoint)
    dtype = DTYPES.get(args.dtype)
    save_safetensors(state, dst, dtype, read_metadata(src))
    print(f"wrote {len(state)} tensors to {dst}", file=sys.stderr)


def _weights_path(cfg, ckpt: str | None) -> Path | None:
    from .models.checkpoint import find_checkpoint

    if ckpt is None and cfg.model.weights == "random":
        return None
    return find_checkpoint(ckpt or cfg.model.checkpoint)


class _LiveFromArgs:
    """A run's live side from the command line: progress, and with --serve or --prompts-from, live prompts."""

    def __init__(self, args, frames: int, storyboard: list[dict], outputs: list[str]):
        from .live import LiveControl, Progress
        from .runs import distributed

        if args.preview_every < 0:
            raise FifoStreamError(f"--preview-every must be >= 0 (got {args.preview_every})")
        mode = "none" if args.quiet else args.progress
        self.progress = Progress(frames, storyboard, "none" if mode == "bar" and not sys.stderr.isatty() else mode)
        self.preview_every = args.preview_every
        self.control = LiveControl() if args.serve is not None or args.prompts_from else None
        if self.control is not None and distributed.world_size() > 1:
            raise FifoStreamError("--serve and --prompts-from run on a single process; drop them under torchrun")
        if args.serve_token and args.serve is None:
            raise FifoStreamError("--serve-token needs --serve [HOST:]PORT")
        self.server = self.prompts = None
        if args.serve is not None:
            from .web import LiveServer

            hls = next((Path(t) for t in outputs if t.endswith(".m3u8")), None)
            self.server = LiveServer(args.serve, args.serve_token, self.progress, self.control, hls)
        if args.prompts_from:
            try:
                self.prompts = sys.stdin if args.prompts_from == "-" else open(args.prompts_from, encoding="utf-8")
            except OSError as e:
                raise FifoStreamError(f"cannot read --prompts-from {args.prompts_from} ({e.strerror}); give a text file of 'N: prompt' lines or '-'") from None

    def start(self) -> None:
        """Start serving and reading prompts (after the checks, before the run begins)."""
        from .live import read_prompts

        if self.server is not None:
            url = self.server.start()
            self.progress.note({"event": "serving", "url": url}, f"live page at {url}")
        if self.prompts is not None:
            read_prompts(self.prompts, self.control)

    def summary(self, line: str) -> None:
        """The closing line on stderr (with --progress json, the ``finished`` event says it)."""
        if self.progress.mode != "json":
            print(line, file=sys.stderr)

    def run(self, execute, *args, **kwargs) -> None:
        """``execute(*args, **kwargs)`` with this progress, control and preview; the server stops after it."""
        try:
            execute(*args, progress=self.progress, control=self.control, preview_every=self.preview_every, **kwargs)
        finally:
            if self.server is not None:
                self.server.stop()


def _footage(args, cfg) -> dict[str, dict]:
    """Check the footage flags and return the footage's fingerprints by role."""
    from .runs.inputs import record_inputs

    if args.init_strength is not None and not ((args.init_image or args.init_video) and 0.0 <= args.init_strength <= 1.0):
        raise FifoStreamError(f"--init-strength {args.init_strength} needs --init-image or --init-video and a value from 0 to 1")
    for flag, given in (("--pad-short", args.pad_short), ("--keep-input", args.keep_input)):
        if given and not args.init_video:
            raise FifoStreamError(f"{flag} applies to --init-video; give a video or drop it")
    return record_inputs({"init_image": args.init_image, "init_video": args.init_video, "reference": _reference_image(cfg)})


def _reference_image(cfg) -> str | None:
    """The reference image the enabled controls name; with one, every enabled control that holds a reference takes it."""
    from .pipeline import REFERENCE_CONTROLS, reference_image_path

    named = {name: reference_image_path(cfg, name) for name in REFERENCE_CONTROLS if cfg.consistency[name].enabled}
    images = set(named.values()) - {None}
    if not images:
        return None
    if len(images) > 1 or None in named.values():
        given = ", ".join(f"consistency.{name}.reference={cfg.consistency[name].reference}" for name in named)
        raise FifoStreamError(f"{given}: a reference image is the reference of every enabled control; give each the same path")
    return images.pop()


def cmd_generate(args) -> None:
    import time

    from omegaconf import OmegaConf

    from .runs import distributed
    from .config import default_config, load_config
    from .models.loading import load_model
    from .pipeline import REFERENCE_CONTROLS, check_world_size
    from .consistency.refbank import select_layers
    from .runs.inputs import kept_input_length, load_inputs
    from .runs.loop import execute
    from .runs.rundir import LIVE_PLAYLIST, SEGMENTS, RunDir, RunSpec, fingerprint
    from .outputs.targets import validate_targets
    from .consistency.storyboard import Storyboard

    cfg = load_config(args.config or default_config(), args.overrides)
    frames = args.frames if args.frames is not None else round(args.seconds * cfg.video.fps)
    if frames < 1:
        raise FifoStreamError(f"the video must have at least one frame (got {frames}); pass --frames N or --seconds S with N, S > 0")
    entries = ([args.prompt] if args.prompt is not None else []) + args.prompts
    if entries and cfg.storyboard.prompts:
        raise FifoStreamError("prompts given both on the command line and in storyboard.prompts; give them in one place")
    storyboard = Storyboard.parse(entries or OmegaConf.to_container(cfg.storyboard.prompts), cfg.storyboard.transition)
    if storyboard.scenes[-1][0] >= frames:
        raise FifoStreamError(f"the prompt at frame {storyboard.scenes[-1][0]} starts after the video's last frame ({frames - 1}); drop it or make the video longer")
    for name in REFERENCE_CONTROLS:
        control = cfg.consistency[name]
        if control.enabled and isinstance(control.reference, int) and control.reference >= frames:
            raise FifoStreamError(f"consistency.{name}.reference={control.reference} is after the video's last frame ({frames - 1}); choose an earlier frame")
    if args.checkpoint_every < 1:
        raise FifoStreamError(f"--checkpoint-every must be >= 1 (got {args.checkpoint_every})")
    check_world_size(cfg)
    slug = re.sub(r"[^a-z0-9]+", "-", storyboard.scenes[0][1].lower()).strip("-")[:40] or "run"
    run_dir = Path(args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}")
    outputs = list(args.out)
    if args.serve is not None and not any(t.endswith(".m3u8") for t in outputs):
        outputs.append(str(run_dir / LIVE_PLAYLIST))  # the page's video
    spec = RunSpec(
        storyboard.scenes[0][1], frames, outputs, args.seed, args.checkpoint_every, args.ckpt, args.pipe_format,
        storyboard.to_json(), _footage(args, cfg), args.init_strength, args.fit, args.pad_short,
    )
    load_inputs(spec, cfg, cfg.model.unet.temporal_length)  # a bad file fails before anything is written
    if args.keep_input:
        spec.kept_input_frames = kept_input_length(spec, cfg)
    live = _LiveFromArgs(args, spec.output_frames, storyboard.to_json(), outputs)
    validate_targets(outputs, run_dir / SEGMENTS)
    distributed.from_main(lambda: RunDir.check_new(run_dir))
    weights = _weights_path(cfg, args.ckpt)
    with distributed.all_ranks():
        model = load_model(cfg, args.ckpt, trust=args.trust_checkpoint)
    model.text_encoder.tokenizer([*storyboard.prompts, cfg.sampling.negative_prompt])  # refuse unknown words before writing anything
    if cfg.consistency.refbank.enabled:
        select_layers(model.unet, cfg.consistency.refbank.layers)  # refuse bad layers before creating the run
    live.start()
    run = distributed.from_main(lambda: RunDir.create(run_dir, spec, cfg))
    try:
        live.run(execute, run, model, cfg, fingerprint(cfg, weights))
    finally:
        run.release()
    if distributed.is_main():
        live.summary(f"wrote {spec.output_frames} frames; run directory {run_dir}")


def cmd_resume(args) -> None:
    from .runs import distributed
    from .models.loading import load_model
    from .runs.loop import execute
    from .runs.inputs import check_inputs
    from .runs.rundir import RunDir, RunError, fingerprint

    def open_run():
        run = RunDir.open(args.run_dir, writer=True)
        try:
            spec, manifest = run.spec, run.manifest
            if manifest["finished"]:
                raise RunError(f"{run.path} is already finished ({manifest['frames_written']} frames); nothing to resume")
            if not args.force:
                check_inputs(spec)
            return run, spec, run.config
        except BaseException:
            run.release()  # the lock is taken: a refused resume must not keep it
            raise

    # Only rank 0 needs to see the run directory (other nodes may not share its file system).
    run, spec, cfg = distributed.from_main(open_run)
    try:
        live = _LiveFromArgs(args, spec.output_frames, spec.schedule(cfg.storyboard.transition).to_json(), spec.outputs)
        weights = _weights_path(cfg, spec.checkpoint)
        with distributed.all_ranks():
            model = load_model(cfg, spec.checkpoint, trust=args.trust_checkpoint)
        live.start()
        live.run(execute, run, model, cfg, fingerprint(cfg, weights), force=args.force)
    finally:
        run.release()
    if distributed.is_main():
        live.summary(f"finished {spec.output_frames} frames; run directory {run.path}")


def cmd_info(args) -> None:
    from .runs import lock
    from .runs.rundir import STATE, RunDir

    run = RunDir.open(args.run_dir)
    spec, manifest, cfg = run.spec, run.manifest, run.config
    done = manifest["frames_written"]
    weights = spec.checkpoint or (cfg.model.checkpoint if cfg.model.weights == "checkpoint" else "random weights")
    status = "finished" if manifest["finished"] else ("not started" if not (run.path / STATE).exists() else "interrupted")
    if (pid := lock.holder(run.path)) is not None:
        status = f"running (process {pid})"
    storyboard = spec.schedule(cfg.storyboard.transition)
    if len(storyboard.scenes) == 1:
        prompts = [f"prompt:      {spec.prompt}"]
    else:
        prompts = [f"{'storyboard:' if i == 0 else '':<13}frame {line}" for i, line in enumerate(storyboard.describe())]
        prompts += [f"transition:  {storyboard.transition} frames"] if storyboard.transition else []
    lines = [
        f"run:         {run.path}",
        *prompts,
        f"progress:    {done} / {spec.output_frames} frames ({100 * done // max(spec.output_frames, 1)}%), {status}",
        f"model:       {cfg.model.name} ({weights})",
        f"video:       {cfg.video.width}x{cfg.video.height} @ {cfg.video.fps} fps, seed {spec.seed}",
        f"sampling:    partitions {cfg.sampling.partitions}, lookahead {cfg.sampling.lookahead}, guidance {cfg.sampling.guidance_scale}, eta {cfg.sampling.eta}",
        f"checkpoints: every {spec.checkpoint_every} frames",
    ]
    for i, target in enumerate(spec.outputs):
        segments = manifest["segments"].get(str(i))
        lines.append(f"output:      {target}" + (f" ({len(segments)} segments)" if segments is not None else ""))
    print("\n".join(lines))


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*", re.DOTALL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``key=value`` overrides may stand anywhere after the command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "prompt", None) is not None and _OVERRIDE.fullmatch(args.prompt):  # no PROMPT, only --prompt
        args.overrides, args.prompt = [args.prompt, *args.overrides], None
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command in ("generate", "resume"):
            from .runs.distributed import job

            with job():  # one process of a torchrun job, or the only one
                {"generate": cmd_generate, "resume": cmd_resume}[args.command](args)
        else:
            {"info": cmd_info, "convert": cmd_convert}[args.command](args)
    except PeerExit as e:  # another process of the job has reported why
        return e.exit_code
    except FifoStreamError as e:
        where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"fifo-stream: error: {where}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fifo-stream: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fifo-stream info RUN | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
