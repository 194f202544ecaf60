"""tools/gpu_table.py: the GPU table of BENCHMARKS.md filled from tools/gpu_check.sh's JSON lines."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_table  # noqa: E402


def run(row, s, **extra):
    return {"row": row, "s_per_frame": s, "frames_per_s": 1 / s, "dtype": "bfloat16", "lookahead": True, "mfu": 0.41,
            "peak_cuda_mb": 20480.0, "gpu": "NVIDIA H200", **extra}


def test_the_shipped_page_has_the_block_and_every_run_becomes_a_row(tmp_path):
    runs = [
        run("reference vs batched bf16", 8.0, side="A", dtype="float32"),
        run("reference vs batched bf16", 0.8, side="B"),
        {"a": [], "b": [], "row": "reference vs batched bf16", "speedup_b": 10.0},
        run("fast path (bf16, compile, CUDA graphs)", 0.4),
        {"row": "fast path + channels_last", "skipped": "time budget spent"},
    ]
    jsonl, out = tmp_path / "bench.jsonl", tmp_path / "BENCHMARKS.md"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in runs) + "== a progress line\n")
    sys.argv = ["gpu_table", str(jsonl), str(ROOT / "BENCHMARKS.md"), str(out)]
    gpu_table.main()
    page = out.read_text()
    table = page.split(gpu_table.BEGIN)[1].split(gpu_table.END)[0].strip().splitlines()
    assert table[:2] == gpu_table.HEADER and len(table) == 2 + 4
    assert "| reference pattern" in table[2] and "| 8.000 |" in table[2]
    assert "| batched bf16 (bfloat16, lookahead on) | 0.800 |" in table[3] and "| 10.0 |" in table[3] and "20.0 GiB" in table[3]
    assert "| 20.0 (across runs) |" in table[4]
    assert "time budget spent" in table[5]
    original = (ROOT / "BENCHMARKS.md").read_text()
    assert page.split(gpu_table.BEGIN)[0] == original.split(gpu_table.BEGIN)[0]  # the rest of the page is kept
    assert page.split(gpu_table.END)[1] == original.split(gpu_table.END)[1]


def test_a_page_without_the_block_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="gpu-table"):
        gpu_table.fill("# Benchmarks\n", [run("x", 1.0)])
