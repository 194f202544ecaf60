"""Scale-out with torch.distributed: real gloo process groups on 127.0.0.1, as torchrun starts them.

Ranks compute their share of a tick's windows with a smaller batch than one process does,
and float results depend slightly on the batch (GEMM kernels are chosen by shape), so
latents are compared with a relative tolerance and decoded frames to within one level.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from fifo_stream.runs import distributed
from fifo_stream.config import load_config
from fifo_stream.errors import FifoStreamError
from fifo_stream.models.loading import load_model
from fifo_stream.pipeline import FrameStream, check_world_size

TOLERANCE = 1e-5  # max |difference| of emitted latents, relative to their max |value|
BANK = ["consistency.refbank.enabled=true", "consistency.refbank.momentum=0.5", "consistency.qcache.enabled=true"]
ANCHOR = ["consistency.anchor.enabled=true", "consistency.shared_noise=0.5"]
TEMPLATE = ["consistency.anchor.enabled=true", "consistency.anchor.mode=template", "consistency.anchor.reference=start"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shares_are_contiguous_and_uneven_when_they_must_be():
    assert distributed.shares(7, 3) == [3, 2, 2]
    assert distributed.shares(2, 3) == [1, 1, 0]
    assert distributed.shares(8, 1) == [8]
    assert distributed.share(5) == slice(0, 5)  # one process: everything


def test_what_cannot_be_shared_out_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    check_world_size(load_config("tiny-random", ["consistency.qcache.enabled=true", "consistency.refbank.enabled=true"]))
    cfg = load_config("tiny-random", ["sampling.mode=sequential"])
    with pytest.raises(FifoStreamError, match="sampling.mode=batched"):
        FrameStream(load_model(cfg), cfg, "a red circle")


def run_stream(overrides, frames):
    """The emitted latents of ``frames`` frames, and the stream that made them."""
    cfg = load_config("tiny-random", overrides)
    stream = FrameStream(load_model(cfg), cfg, "a red circle", seed=1)
    return torch.stack([stream.next_latent() for _ in range(frames)]), stream


def rank_main(rank, world, port, overrides, frames, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.job():
        assert distributed.world_size() == world
        z, stream = run_stream(overrides, frames)
        if distributed.is_main():
            torch.save(z, out)
        if stream.refbank is not None:
            torch.save(stream.refbank.state_dict(), out.with_suffix(f".bank{rank}"))


@pytest.mark.parametrize(
    "world, overrides",
    [
        (2, ["sampling.lookahead=false", "sampling.partitions=3"]),  # 3 windows: shares 2 and 1
        (3, ["sampling.lookahead=false", "sampling.partitions=2"]),  # 2 windows: one rank has none
        # The bank, updated every tick: each rank records its own rows and the commit gathers them all, so
        # every rank holds one process's bank (with lookahead a window reads levels another rank records).
        (3, ["sampling.partitions=2", *BANK, "consistency.refbank.layers=all", "consistency.refbank.dtype=fp32"]),
        # Every rank holds the whole queue after the gather and makes the same update, anchor and shared noise included.
        (2, ["sampling.partitions=2", *ANCHOR]),
        # The template places the subject by an argmax: the ranks' rounding must not move it.
        (2, ["sampling.partitions=2", *TEMPLATE]),
    ],
    ids=["2-ranks-3-windows", "3-ranks-2-windows", "bank-3-ranks-4-windows", "anchor-shared-noise-2-ranks", "template-2-ranks"],
)
def test_ranks_emit_the_latents_of_one_process(tmp_path, world, overrides):
    frames = 3
    mp.spawn(rank_main, args=(world, free_port(), overrides, frames, tmp_path / "z.pt"), nprocs=world)
    shared = torch.load(tmp_path / "z.pt")
    torch.set_num_threads(1)
    alone, stream = run_stream(overrides, frames)
    assert (shared - alone).abs().max() <= TOLERANCE * alone.abs().max()
    assert not torch.equal(shared[0], shared[-1])
    if stream.engine.anchor is not None:  # the controls acted: the frames after the reference are not plain FIFO's
        plain, _ = run_stream([o for o in overrides if o not in ANCHOR + TEMPLATE], frames)
        assert stream.engine.anchor.references and not torch.allclose(alone[1:], plain[1:])
    if stream.refbank is not None:
        bank = stream.refbank.state_dict()
        assert bank["filled"].all() and set(bank["keys"]) == set(stream.refbank.layers)
        for r in range(world):
            theirs = torch.load(tmp_path / f"z.bank{r}")
            assert torch.equal(theirs["filled"], bank["filled"])
            for part in ("keys", "values"):
                for name, t in bank[part].items():
                    assert (theirs[part][name].float() - t.float()).abs().max() <= TOLERANCE * t.float().abs().max(), (r, part, name)


# -- the command line under torchrun ----------------------------------------------------------

ARGS = ["sampling.partitions=1", "sampling.lookahead=false"]  # one window per tick, no warm-up
FRAMES, EVERY = 6, 2
ENV = {"OMP_NUM_THREADS": "1"}


def fifo_stream(*args, ranks=1, env=None):
    launcher = [sys.executable, "-m", "fifo_stream"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "fifo_stream"]
    return subprocess.Popen([*launcher, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, **(env or {})})


def finish(proc, timeout=600):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def generate(tmp, name, frames=FRAMES, ranks=1, env=None, args=ARGS):
    return fifo_stream("generate", "a red circle", "--frames", str(frames), "--checkpoint-every", str(EVERY), "--out", str(tmp / name) + "/",
                       "--run-dir", str(tmp / f"{name}.run"), "--quiet", *args, ranks=ranks, env=env)


def manifest(tmp, name):
    return json.loads((tmp / f"{name}.run" / "manifest.json").read_text())


def frames_of(tmp, name):
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp / name).glob("*.png"))])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    rc, err = finish(generate(tmp, "ref"))
    assert rc == 0, err
    return frames_of(tmp, "ref")


def assert_same_frames(frames, reference):
    assert frames.shape == reference.shape
    assert np.abs(frames - reference).max() <= 1


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-ranks-then-1", "1-rank-then-2"])
def test_cli_resumes_with_another_world_size(tmp_path, reference, first, then):
    # Killed (SIGKILL of rank 0, after frame 3) between the checkpoints at frames 2 and 4.
    rc, err = finish(generate(tmp_path, "run", ranks=first, env={"FIFO_STREAM_FAULT": "frame:3"}))
    assert rc != 0, err
    assert manifest(tmp_path, "run")["frames_written"] == EVERY
    rc, err = finish(fifo_stream("resume", str(tmp_path / "run.run"), "--quiet", ranks=then))
    assert rc == 0, err
    done = manifest(tmp_path, "run")
    assert done["finished"] and len(done["frame_sha256"]) == FRAMES
    assert_same_frames(frames_of(tmp_path, "run"), reference)


def test_cli_with_the_bank_resumes_with_another_world_size(tmp_path):
    args = [*BANK, "sampling.partitions=2"]  # with lookahead: 4 windows, 2 per rank, each reading levels the other records
    rc, err = finish(generate(tmp_path, "ref", args=args))
    assert rc == 0, err
    rc, err = finish(generate(tmp_path, "run", ranks=2, env={"FIFO_STREAM_FAULT": "frame:3"}, args=args))
    assert rc != 0 and manifest(tmp_path, "run")["frames_written"] == EVERY, err
    rc, err = finish(fifo_stream("resume", str(tmp_path / "run.run"), "--quiet"))
    assert rc == 0, err
    assert manifest(tmp_path, "run")["finished"]
    assert_same_frames(frames_of(tmp_path, "run"), frames_of(tmp_path, "ref"))


def test_an_error_on_rank_0_stops_every_rank_with_one_line(tmp_path):
    (tmp_path / "taken.run").mkdir()
    (tmp_path / "taken.run" / "run.json").write_text("{}")
    rc, err = finish(generate(tmp_path, "taken", ranks=2))
    ours = [line for line in err.splitlines() if line.startswith("fifo-stream:")]
    assert rc != 0 and len(ours) == 1 and "already holds a run" in ours[0], err
    assert not (tmp_path / "taken").exists()


def test_sigterm_under_torchrun_checkpoints_and_every_rank_exits(tmp_path, reference):
    proc = generate(tmp_path, "run", frames=200, ranks=2)
    state = tmp_path / "run.run" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    rc, err = finish(proc, timeout=120)
    assert rc != 0
    assert "stopped by SIGTERM" in err and "resume" in err, err
    stopped = manifest(tmp_path, "run")
    assert EVERY <= stopped["frames_written"] < 200 and not stopped["finished"]
    assert len(stopped["frame_sha256"]) == stopped["frames_written"]
    written = frames_of(tmp_path, "run")
    assert len(written) == stopped["frames_written"]
    n = min(len(written), FRAMES)
    assert_same_frames(written[:n], reference[:n])
