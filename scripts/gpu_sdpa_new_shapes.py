"""What a *new* sequence length costs each SDPA backend: the first call at a shape against the next.

A server prefills prompts of lengths it has not seen before. A backend that builds something per
shape (cuDNN's SDPA builds and caches an execution plan per problem size) pays that on every new
length; FlashAttention's kernels take the length as an argument. For each backend this script
calls causal SDPA on q, k, v [1, H, L, D] (the `small` preset's heads, bf16) at lengths L never used
before in the process, and times the first call and the second (wall ms, synchronised), median
over the lengths.

    python scripts/gpu_sdpa_new_shapes.py --out $OUT/sdpa_new_shapes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minigpt.config import ModelConfig
from minigpt.measure import provenance

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def first_and_second_ms(backend: SDPBackend, length: int, heads: int, head_dim: int) -> tuple[float, float]:
    q, k, v = (torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--lengths", type=int, default=12, help="new lengths per backend")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    cfg = ModelConfig.preset("small")
    first_and_second_ms(SDPBackend.FLASH_ATTENTION, 64, cfg.n_heads, cfg.head_dim)  # CUDA context, library loads
    rows = {}
    for i, (name, backend) in enumerate(BACKENDS.items()):
        lengths = [301 + 7 * (j * len(BACKENDS) + i) for j in range(args.lengths)]  # disjoint, never seen before
        times = [first_and_second_ms(backend, L, cfg.n_heads, cfg.head_dim) for L in lengths]
        rows[name] = {"lengths": lengths, "first_ms": statistics.median(t[0] for t in times),
                      "second_ms": statistics.median(t[1] for t in times)}
        print(f"{name:>6}: first call at a new length {rows[name]['first_ms']:.2f} ms, "
              f"second {rows[name]['second_ms']:.3f} ms (median of {len(lengths)} lengths)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance(), "heads": cfg.n_heads, "head_dim": cfg.head_dim,
                                    "backends": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
