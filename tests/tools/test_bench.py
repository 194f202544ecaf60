"""tools/bench.py: what a run reports."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench  # noqa: E402


def test_a_run_counts_every_frame_evaluation_and_profiles_on_request(capsys):
    runs = {}
    for mode in ("batched", "sequential"):
        bench.main(["--frames", "2", "--warmup", "0", "--mode", mode, "--profile", "5"])
        out, err = capsys.readouterr()
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        assert "Self CPU" in err and "aten::" in err  # the profile's table, on stderr
    batched, sequential = runs["batched"], runs["sequential"]
    # Batched calls run both guidance branches of their windows: the same frame evaluations in fewer calls.
    assert batched["unet_frame_evals_per_frame"] == sequential["unet_frame_evals_per_frame"] > 0
    assert batched["unet_calls_per_frame"] < sequential["unet_calls_per_frame"]
    assert batched["unet_gflop_per_frame"] < sequential["unet_gflop_per_frame"]  # init_attn once per window


def test_op_times_add_up_to_part_of_the_timed_frames(capsys):
    bench.main(["--frames", "2", "--warmup", "0", "--op-times", "6"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    lines = err.strip().splitlines()
    total_ms = float(lines[0].split()[0])
    # the ops run inside the timed frames, and most of a frame is ops (the rest is the timing's own Python)
    assert 0.2 * result["s_per_frame"] * 1000 < total_ms < result["s_per_frame"] * 1000
    top = [float(line.split()[0]) for line in lines[1:7]]
    assert top == sorted(top, reverse=True) and any("aten.convolution" in line for line in lines[1:7])
