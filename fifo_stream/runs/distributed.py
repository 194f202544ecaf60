"""Scale-out under torchrun: one model replica per process, each tick's windows shared out.

``torchrun`` starts one process per GPU (or CPU slot) and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; :func:`init` joins the group (NCCL for CUDA
tensors, gloo for CPU tensors). Every rank keeps an identical FIFO queue: each computes
the noise predictions of its contiguous share of the tick's windows (:func:`share`),
and every rank gathers all of them (:func:`gather`), so the DDIM update, whose random
noise comes from identically seeded generators, is the same everywhere. Rank 0 alone
writes outputs, manifests and checkpoints; the others follow its decisions.

Without torchrun (WORLD_SIZE unset or 1) every function here is the one-process no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..errors import FifoStreamError, PeerExit

# How long a collective waits for a rank that stopped answering before failing the job.
# Long enough for every rank's first torch.compile (minutes) and for rank 0's checkpoints.
TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int | None:
    """This process's index on its node under a multi-process torchrun job, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def init() -> None:
    """Join the torchrun job described by the environment (nothing to do for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise FifoStreamError(f"cannot join the torchrun job: {str(e).splitlines()[0]}") from None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def job() -> Iterator[None]:
    """Run a command as one process of the torchrun job the environment describes (if any)."""
    init()
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:
            settle()
        shutdown()


def settle(timeout: timedelta = timedelta(minutes=2)) -> None:
    """Wait until every rank is done before the group is torn down: a rank that tears it down while
    another still talks to it can abort that one (gloo's threads end the process)."""
    if world_size() > 1:
        try:
            dist.monitored_barrier(timeout=timeout)
        except RuntimeError:  # a rank failed or is gone: its own error is the one reported
            pass


def shares(total: int, size: int) -> list[int]:
    """How many of ``total`` items each of ``size`` ranks takes: contiguous, the first ones one more."""
    return [total // size + (r < total % size) for r in range(size)]


def share(total: int) -> slice:
    """This rank's contiguous share of ``total`` items (possibly empty)."""
    counts = shares(total, world_size())
    start = sum(counts[: rank()])
    return slice(start, start + counts[rank()])


def gather(part: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's ``part`` (its :func:`share` of ``total`` rows) on every rank.

    all_gather needs equal sizes, so each part is padded to the largest share and trimmed after.
    """
    size = world_size()
    if size == 1:
        return part
    counts = shares(total, size)
    pad = part.new_zeros((max(counts) - part.shape[0], *part.shape[1:]))
    padded = torch.cat([part, pad]).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


MAX_DIMS = 7  # of a gather_uneven part
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]  # a gather_uneven part's


def gather_uneven(part: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Concatenate every rank's ``part`` in rank order, on every rank, whatever each holds.

    Parts are rows of one trailing shape and dtype (``None``: no rows); which ranks hold rows
    and how many is exchanged first. None when no rank holds any.
    """
    if world_size() == 1:
        return part
    meta = torch.zeros(MAX_DIMS + 1, dtype=torch.int64, device=device)  # rows, trailing shape, dtype code
    if part is not None:
        meta[: part.dim()] = torch.tensor(part.shape)
        meta[MAX_DIMS] = DTYPES.index(part.dtype) + 1
    metas = [torch.empty_like(meta) for _ in range(world_size())]
    dist.all_gather(metas, meta)
    metas = [m.tolist() for m in metas]
    full = next((m for m in metas if m[MAX_DIMS]), None)
    if full is None:
        return None
    dims = [d for d in full[1:MAX_DIMS] if d]  # trailing sizes are never 0 where a rank holds rows
    rows = [m[0] if m[MAX_DIMS] else 0 for m in metas]
    padded = torch.zeros((max(rows), *dims), dtype=DTYPES[full[MAX_DIMS] - 1], device=device)
    if part is not None:
        padded[: len(part)] = part
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` with rank 0's in place, on every rank."""
    if world_size() > 1:
        dist.broadcast(tensor, 0)
    return tensor


def agree(code: int) -> int:
    """The largest of every rank's ``code`` (0: carry on), on every rank; every rank must call it."""
    if world_size() == 1:
        return code
    t = torch.tensor([code], dtype=torch.int64)  # a CPU tensor: gloo, no GPU sync
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def from_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An error on rank 0 is raised there; the other ranks raise :class:`PeerExit` with its exit code.
    """
    if world_size() == 1:
        return fn()
    box: list = [(None, 0)]
    if is_main():
        try:
            box = [(fn(), 0)]
        except BaseException as e:
            dist.broadcast_object_list([(None, getattr(e, "exit_code", 1))], 0, device=torch.device("cpu"))
            raise
    dist.broadcast_object_list(box, 0, device=torch.device("cpu"))
    result, code = box[0]
    if code:
        raise PeerExit(code)
    return result


@contextmanager
def all_ranks() -> Iterator[None]:
    """A block every rank runs; if it fails on any rank every rank stops (the others with PeerExit)."""
    try:
        yield
    except BaseException as e:
        agree(getattr(e, "exit_code", 1))
        raise
    code = agree(0)
    if code:
        raise PeerExit(code)
