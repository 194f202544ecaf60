"""Fit exported weights to a U-Net with fewer layers by dropping the layers it lacks.

    python tools/drop_layers.py --config models/tiny-cheap-unet.yaml OLD.safetensors NEW.safetensors   # OLD: trained with configs/tiny.yaml

The start of a fine-tune to a cheaper architecture (tools/train.py --init NEW.safetensors): every
U-Net weight the new architecture has is kept, with its name and shape; the weights of layers it
lacks are dropped. Since every block is residual, the pruned model computes the old one minus those
branches, and a short fine-tune recovers. The VAE, the text encoder and the metadata (the
vocabulary) are copied unchanged. Refused with one line if the new architecture has a U-Net
weight the old file lacks or holds with another shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.errors import FifoStreamError  # noqa: E402
from fifo_stream.models.checkpoint import UNET_PREFIX, differences, extract, read_metadata, read_state_dict, save_safetensors  # noqa: E402
from fifo_stream.models.unet import UNet3D  # noqa: E402


def drop_layers(state: dict[str, torch.Tensor], unet: UNet3D) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` without the U-Net weights ``unet`` lacks, and their names (without the U-Net prefix)."""
    missing, dropped, mismatched = differences(unet.state_dict(), extract(state, UNET_PREFIX))
    if missing or mismatched:
        raise FifoStreamError(
            f"the new U-Net is not a subset of the old one: {len(missing)} weights missing, {len(mismatched)} of another shape "
            f"(first: {(missing or mismatched)[0]}); only dropping layers is supported"
        )
    gone = {UNET_PREFIX + k for k in dropped}
    return {k: v for k, v in state.items() if k not in gone}, dropped


def layer_of(key: str) -> str:
    """The layer a U-Net weight belongs to: ``input_blocks.1.1`` for a block's layer, ``init_attn.0`` elsewhere."""
    parts = key.split(".")
    return ".".join(parts[:3] if parts[0].endswith("_blocks") or parts[0] == "middle_block" else parts[:2])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="the new architecture's config")
    p.add_argument("old", help="exported weights (.safetensors)")
    p.add_argument("new", help="where to write the pruned weights")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides that describe the new architecture")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        with torch.device("meta"):
            unet = UNet3D(**OmegaConf.to_container(cfg.model.unet))
        state, dropped = drop_layers(read_state_dict(args.old), unet)
    except FifoStreamError as e:
        raise SystemExit(f"error: {e}") from None
    save_safetensors(state, args.new, metadata=read_metadata(args.old))
    layers = sorted({layer_of(k) for k in dropped})
    print(f"kept {sum(k.startswith(UNET_PREFIX) for k in state)} U-Net weights, dropped {len(dropped)} "
          f"({len(layers)} layers: {', '.join(layers)}); wrote {args.new}")


if __name__ == "__main__":
    main()
