"""The ``fifo-stream`` command line.

Every user-caused problem ends as one line on stderr and a non-zero exit code:
2 bad input or configuration, 3 output closed or unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import FifoStreamError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config name in configs/ or a YAML path (default: tiny-random)")
    p.add_argument("--ckpt", default=None, help="model checkpoint (.ckpt or .safetensors); overrides model.checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a checkpoint you trust (can run code)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fifo-stream", description="Arbitrarily long text-to-video streaming with FIFO diagonal denoising.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video from a text prompt")
    gen.add_argument("prompt")
    length = gen.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="number of frames to emit")
    length.add_argument("--seconds", type=float, help="length in seconds at video.fps")
    gen.add_argument("--out", action="append", required=True, help="output: file.mp4|.mkv|.webm, '-' (stdout), rtmp://..., or dir/ for PNGs; repeatable")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(gen)
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.partitions=2")

    conv = sub.add_parser("convert", help="convert a checkpoint to .safetensors once, for fast and safe loading")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast floating tensors (default: keep stored dtypes)")
    conv.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a checkpoint you trust (can run code)")
    return parser


def cmd_convert(args) -> None:
    import torch

    from .checkpoint import read_state_dict, save_safetensors

    src, dst = Path(args.input), Path(args.output)
    if dst.suffix != ".safetensors":
        raise FifoStreamError(f"output must end in .safetensors, got {dst}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise FifoStreamError("output would overwrite the input; choose another output path")
    if not dst.parent.is_dir():
        raise FifoStreamError(f"output directory {dst.parent} does not exist")
    state = read_state_dict(src, trust=args.trust_checkpoint)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    save_safetensors(state, dst, dtype)
    print(f"wrote {len(state)} tensors to {dst}", file=sys.stderr)


def cmd_generate(args) -> None:
    from .config import DEFAULT_CONFIG, load_config
    from .model import load_model
    from .pipeline import generate
    from .sinks import BackgroundSink, MultiSink, open_sink

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    frames = args.frames if args.frames is not None else round(args.seconds * cfg.video.fps)
    if frames < 1:
        raise FifoStreamError(f"the video must have at least one frame (got {frames}); pass --frames N or --seconds S with N, S > 0")
    model = load_model(cfg, args.ckpt, trust=args.trust_checkpoint)
    sinks = []
    try:
        for target in args.out:
            sinks.append(open_sink(target, cfg.video.width, cfg.video.height, cfg.video.fps))
    except FifoStreamError:
        MultiSink(sinks).close()
        raise
    sink = BackgroundSink(MultiSink(sinks))
    try:
        for frame in generate(model, cfg, args.prompt, frames, args.seed, progress=not args.quiet):
            sink.write(frame)
    finally:
        sink.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``key=value`` overrides may stand anywhere after the command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        {"generate": cmd_generate, "convert": cmd_convert}[args.command](args)
    except FifoStreamError as e:
        print(f"fifo-stream: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fifo-stream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
