"""Time the layer forms the CPU path chose against the plain forms, at the U-Net's shapes.

    python tools/bench_ops.py                 # fp32 and bf16, one JSON object per case
    python tools/bench_ops.py --dtype bf16

Each case is the best of ``--repeats`` runs of each form (so drift between forms is small:
they run back to back). The shapes are configs/bench-anchor.yaml's tick at batch 64 (8 samples
x 8 frames): temporal attention over 8 frames at 16x16 (2 heads) and in ``init_attn`` (8 heads),
spatial self-attention over 256 tokens, cross-attention over 77 text tokens, the GEGLU of the
32-channel blocks and a ResBlock's GroupNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream.models.attention import attend  # noqa: E402
from fifo_stream.models.unet_blocks import GEGLU, GroupNorm32  # noqa: E402

ATTENTION = {  # name: (sequences, queries, heads, head dim, keys)
    "temporal, init_attn (8 heads)": (2048, 8, 8, 16, 8),
    "temporal (2 heads)": (2048, 8, 2, 16, 8),
    "spatial self (256 tokens)": (64, 256, 2, 16, 256),
    "cross (77 text tokens)": (64, 256, 2, 16, 77),
}


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def heads_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, heads*d) -> (b, heads, n, d) as a view, as the U-Net's layers make them."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def cases(dtype: torch.dtype, repeats: int):
    g = torch.Generator().manual_seed(0)
    for name, (b, n, h, d, m) in ATTENTION.items():
        q = heads_of(torch.randn(b, n, h * d, generator=g).to(dtype), h)
        k, v = (heads_of(torch.randn(b, m, h * d, generator=g).to(dtype), h) for _ in range(2))
        yield f"attention: {name}", best_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats), best_ms(lambda: attend(q, k, v), repeats)
    geglu = GEGLU(32, 128).to(dtype)
    x = torch.randn(16384, 32, generator=g).to(dtype)

    def chunked():
        a, gate = geglu.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)

    with torch.no_grad():
        yield "GEGLU 32 -> 2x128 (16384 rows)", best_ms(chunked, repeats), best_ms(lambda: geglu(x), repeats)
        norm = GroupNorm32(32, 64).to(dtype)
        x = torch.randn(64, 64, 16, 16, generator=g).to(dtype)
        upcast = lambda: F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps).type(x.dtype)  # noqa: E731
        yield "ResBlock GroupNorm (64x64x16x16)", best_ms(upcast, repeats), best_ms(lambda: norm(x), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    for dtype in dtypes:
        with torch.no_grad():
            for name, plain, ours in cases(dtype, args.repeats):
                print(json.dumps({"case": name, "dtype": str(dtype).removeprefix("torch."), "plain_ms": round(plain, 3),
                                  "ours_ms": round(ours, 3), "speedup": round(plain / ours, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
