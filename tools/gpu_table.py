"""Fill BENCHMARKS.md's GPU table from the JSON lines of tools/gpu_check.sh.

    python tools/gpu_table.py runs/gpu-check/bench.jsonl BENCHMARKS.md runs/gpu-check/BENCHMARKS.md

The table is the text between the ``<!-- gpu-table -->`` and ``<!-- /gpu-table -->`` lines; a
row per run (a comparison's two sides are two rows), with the row's arguments, its numbers and
the speedup over the reference pattern where the run measured one. Skipped or failed rows say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- gpu-table -->", "<!-- /gpu-table -->"
HEADER = [
    "| run | s/frame | frames/s | MFU | peak GPU memory | speedup over the reference pattern | GPU |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]


def label(run: dict) -> str:
    if run.get("side") == "A":
        return "reference pattern (sequential, fp32, eager, decode inline)"
    name = run["row"].split(" vs ")[-1] if run.get("side") == "B" else run["row"]
    return f"{name} ({run['dtype']}, lookahead {'on' if run['lookahead'] else 'off'})"


def rows(runs: list[dict]) -> list[str]:
    speedups = {r["row"]: r["speedup_b"] for r in runs if "speedup_b" in r}
    reference = next((r["s_per_frame"] for r in runs if r.get("side") == "A"), None)
    lines = []
    for r in runs:
        if "skipped" in r or "failed" in r:
            lines.append(f"| {r['row']} | {r.get('skipped') or 'failed: ' + r['failed']} | | | | | |")
        elif "s_per_frame" in r:
            if r.get("side") == "A":
                speedup = "1"
            elif r.get("side") == "B":
                speedup = f"{speedups.get(r['row'], '')}"
            else:
                speedup = f"{reference / r['s_per_frame']:.1f} (across runs)" if reference else ""
            memory = f"{r['peak_cuda_mb'] / 1024:.1f} GiB" if "peak_cuda_mb" in r else ""
            lines.append(f"| {label(r)} | {r['s_per_frame']:.3f} | {r['frames_per_s']:.2f} | {r.get('mfu', '')} | {memory} | {speedup} | {r.get('gpu', '')} |")
    return lines


def fill(markdown: str, runs: list[dict]) -> str:
    if BEGIN not in markdown or END not in markdown:
        raise SystemExit(f"gpu_table: the page has no {BEGIN} ... {END} block to fill")
    head, rest = markdown.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return "\n".join([head + BEGIN, *HEADER, *rows(runs), END]) + tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path)
    p.add_argument("page", type=Path, help="BENCHMARKS.md")
    p.add_argument("out", type=Path, help="where to write the filled page (may be the page itself)")
    args = p.parse_args()
    runs = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.startswith("{")]
    if not runs:
        sys.exit(f"gpu_table: {args.jsonl} holds no runs")
    args.out.write_text(fill(args.page.read_text(), runs))


if __name__ == "__main__":
    main()
