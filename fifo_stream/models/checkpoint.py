"""Reading VideoCrafter checkpoints safely and loading them into modules.

A VideoCrafter ``model.ckpt`` is a torch pickle whose state dict sits under
``state_dict``, under ``module`` (DeepSpeed/Lightning, keys prefixed with
``_forward_module.``), or at the top level. ``.safetensors`` files hold the flat
state dict. Nothing is ever unpickled beyond tensors unless the caller opts in.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import FifoStreamError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
_LIGHTNING_PREFIX = "_forward_module."
TRUST_FLAG = "--trust-checkpoint"
MODELS_ENV = "FIFO_STREAM_MODELS"  # directories (os.pathsep-separated) searched for checkpoint file names
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "assets"  # the embedded model ships here


class CheckpointError(FifoStreamError):
    pass


def models_dirs() -> list[Path]:
    """Where a bare checkpoint file name is looked up: $FIFO_STREAM_MODELS, ./models, the package's own."""
    extra = [Path(d).expanduser() for d in os.environ.get(MODELS_ENV, "").split(os.pathsep) if d]
    return [*extra, Path("models"), SHIPPED_MODELS]


def find_checkpoint(name: str | os.PathLike) -> Path:
    """A checkpoint path as given (relative to the working directory), else a file of that name in :func:`models_dirs`."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    for directory in models_dirs():
        if (directory / path).exists():
            return directory / path
    searched = ", ".join(str(d) for d in models_dirs())
    raise CheckpointError(f"checkpoint not found: {name} (looked in {searched}; put it in one of them, set ${MODELS_ENV}, or pass --ckpt PATH)")


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Return the flat state dict of a checkpoint file, tensors in their stored dtypes.

    ``trust=True`` permits full unpickling (arbitrary code execution) for
    checkpoints that hold non-tensor Python objects; only use it on files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (put model.ckpt or a .safetensors file there, or pass --ckpt PATH)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory: {path} (pass the .ckpt or .safetensors file itself)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    obj = _torch_load(path, trust)
    return _unwrap(obj, path)


def _torch_load(path: Path, trust: bool):
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as fh:
        is_pickle = fh.read(1) == b"\x80"  # PROTO opcode that starts every legacy torch.save file
    if not (is_zip or is_pickle):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            # torch warns that a plain pickle's protocol "might not be supported", then refuses it
            # (or not) itself; the warning tells the user nothing that the outcome does not.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
        if not trust:
            raise CheckpointError(
                f"{path} holds Python objects besides tensors and was NOT unpickled (that could run code); "
                f"if you trust its source, re-run with {TRUST_FLAG}, or convert it once with "
                f"'fifo-stream convert {TRUST_FLAG} {path} model.safetensors'"
            ) from None
    except Exception as e:  # damaged input fails in the unpickler in many different ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any failure of a trusted full unpickle is still a bad file
        raise CheckpointError(f"{path} could not be loaded ({_first_line(e)})") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = {k.removeprefix(_LIGHTNING_PREFIX): v for k, v in obj["module"].items()}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors; is it a model checkpoint?")
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file (empty for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None


def extract(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def differences(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How ``state_dict`` fails to fit a module's ``own`` state: keys missing, keys unexpected, and
    shape mismatches (``"key (stored shape) vs (own shape)"``)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    return missing, unexpected, mismatched


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """Copy ``state_dict`` into ``module`` (cast to the module's dtypes).

    A module built on the meta device takes the tensors themselves (in their stored
    dtypes; cast the module afterwards), so full-size models load without first
    allocating random weights. With ``strict`` any missing, unexpected or mis-shaped
    key raises a one-line :class:`CheckpointError` with counts and the first few offenders.
    """
    own = module.state_dict()
    missing, unexpected, mismatched = differences(own, state_dict)
    if strict and (missing or unexpected or mismatched):
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if keys:
                more = ", ..." if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {name} ({', '.join(keys[:3])}{more})")
        raise CheckpointError(
            f"checkpoint does not fit the {what}: {'; '.join(parts)}; "
            "check that the checkpoint and --config describe the same model"
        )
    if mismatched:
        raise CheckpointError(f"checkpoint does not fit the {what}: {len(mismatched)} shape mismatches ({mismatched[0]})")
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=on_meta)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a flat state dict (and string ``metadata``) as safetensors, casting floating tensors to ``dtype`` if given."""
    from safetensors.torch import save

    from ..durable import atomic_write

    out = {}
    for k, v in state_dict.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    atomic_write(path, save(out, metadata=dict(metadata) if metadata else None))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
