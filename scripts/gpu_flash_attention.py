"""Time the Triton FlashAttention kernel against PyTorch SDPA's flash backend on a CUDA GPU.

    python scripts/gpu_flash_attention.py                  # table: causal, D 64/128, T 1k-8k
    python scripts/gpu_flash_attention.py --sweep          # first try tile configs at T=4096
    python scripts/gpu_flash_attention.py --sweep --sweep-dims 128 --sweep-kernels dkdv dq
    python scripts/gpu_flash_attention.py --out results/   # write flash_attention.json there
    python scripts/gpu_flash_attention.py --dims 40 64 --name flash_attention_d40 --out results/
                                                           # a head of 40 (in a 64-wide tile) next to 64
    python scripts/gpu_flash_attention.py --narrow --out results/   # medium's heads of 40: masked tile vs copies
    python scripts/gpu_flash_attention.py --backward --out results/ # the backward: dQ kernel vs one-pass (TMA dQ) vs cuDNN
    python scripts/gpu_flash_attention.py --forward --out results/  # the forward's tiles at the same shapes
    python scripts/gpu_flash_attention.py --tma --out results/      # sm_90: the forward through TMA descriptors,
                                                                    # with and without warp specialisation
    python scripts/gpu_flash_attention.py --persistent --out results/   # the forward on a persistent grid
    python scripts/gpu_flash_attention.py --exp2-poly --out results/    # half the forward's exp2 as a polynomial
    python scripts/gpu_flash_attention.py --gemms-only --out results/   # the matmuls without the softmax, fwd and bwd
    python scripts/gpu_flash_attention.py --flex --out results/         # FlexAttention, default tiles and autotuned
    python scripts/gpu_flash_attention.py --gluon --out results/        # sm_90: the forward in Gluon (FA3's overlap,
                                                                        # sequential, warp-specialised, cooperative, ping-pong)
    python scripts/gpu_flash_attention.py --gluon-backward --out results/  # sm_90: the Gluon backward kernels
    python scripts/gpu_flash_attention.py --gluon-one-pass --out results/  # sm_90: the Gluon backward in one pass
    python scripts/gpu_flash_attention.py --gluon-one-pass --dims 128 --variants "warp-specialised, 128 keys" --out results/
                                        # its two-warpgroup kernel at heads of 128 only: ..._one_pass_d128.json

Shapes keep B*T = 16k tokens and H*D = 2048 (q is 64 MiB in bf16, larger than the L2 cache,
so no input rotation is needed). Ratios are SDPA time / our time: above 1 means faster than
SDPA. The table and --sweep time the call (medians of triton.testing.do_bench, host included),
--narrow both ways, every other mode CUDA-graph replays (`measure.time_graph`: the GPU's work
alone). One process, one card.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

import minigpt.kernels.flash_attention as fa
from minigpt import measure, runtime
from minigpt.kernels._launch import LN2, LOG2E, num_sms
from minigpt.kernels.flash_attention import (
    BlockConfig,
    FlashConfig,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    flash_config,
    padded_head_dim,
)

TOKENS, MODEL_DIM = 16384, 2048


def make(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype):
    """Random q, k, v (requiring grad) and an output gradient, [B, H, T, D]."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def sdpa(q, k, v, backend: SDPBackend, causal: bool = True) -> torch.Tensor:
    """PyTorch's SDPA with one named backend (cuDNN, FA2, ...); GQA when k, v have fewer heads than q."""
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def pass_ms(fn: Callable[[], torch.Tensor], do: torch.Tensor, leaves: list[torch.Tensor]) -> dict:
    """CUDA-graph ms of ``fn``'s forward (no autograd) and of its forward+backward with output gradient ``do``
    (``leaves``' gradients reset before each replay): {"fwd_ms", "fwd_bwd_ms"}; the backward alone is the difference."""
    with torch.no_grad():
        fwd = measure.time_graph(fn)
    return {"fwd_ms": fwd, "fwd_bwd_ms": measure.time_graph(lambda: fn().backward(do), grad_to_none=leaves)}


def time_pair(q, k, v, do, causal, config: FlashConfig | None) -> dict:
    """Median ms of forward and forward+backward, ours (with `config`) and SDPA flash."""
    def ours_fwd():
        return flash_attention_forward(q, k, v, causal=causal, config=config)[0]

    def ours_fwd_bwd():
        if config is None:  # the public autograd path, as the model calls it
            flash_attention(q, k, v, causal=causal).backward(do)
        else:
            o, lse = flash_attention_forward(q, k, v, causal=causal, config=config)
            flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=config)

    def sdpa_fwd_bwd():
        sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, causal).backward(do)

    with torch.no_grad():
        res = {"ours_fwd_ms": do_bench(ours_fwd), "sdpa_fwd_ms": do_bench(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, causal))}
    res["ours_fwd_bwd_ms"] = do_bench(ours_fwd_bwd, grad_to_none=[q, k, v])
    res["sdpa_fwd_bwd_ms"] = do_bench(sdpa_fwd_bwd, grad_to_none=[q, k, v])
    res["fwd_ratio"] = res["sdpa_fwd_ms"] / res["ours_fwd_ms"]
    res["fwd_bwd_ratio"] = res["sdpa_fwd_bwd_ms"] / res["ours_fwd_bwd_ms"]
    return res


def projection_views(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype):
    """q [B, H, T, D], k/v [B, Hkv, T, D] (requiring grad) as the model passes them: views of one
    [B, T, H + 2 Hkv, D] projection; the output gradient do [B, H, T, D] a view of [B, T, H, D]."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq_len, heads + 2 * kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    q, k, v = (x.transpose(1, 2).detach().requires_grad_() for x in qkv.split([heads, kv_heads, kv_heads], dim=2))
    do = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    return q, k, v, do


PASS_SHAPES = {  # name: (B, H, Hkv, T, D, as the model lays them out)
    "medium": (16, 16, 4, 1024, 40, True), "small": (16, 12, 3, 1024, 32, True),
    **{f"D{d} T{t}": (TOKENS // t, MODEL_DIM // d, MODEL_DIM // d, t, d, False) for d in (64, 128) for t in (1024, 4096, 8192, 16384)},
}
ONE_PASS_TILES = {  # dK/dV tiles (BLOCK_M, BLOCK_N, warps, stages) of the one-pass backward timed by --backward
    32: [BlockConfig(*t) for t in ((32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2))],
    64: [BlockConfig(*t) for t in ((32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2),
                                   (64, 128, 8, 3))],
    128: [BlockConfig(*t) for t in ((32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
                                    (128, 64, 8, 2))],
}
BWD_ROUNDS = 5
FWD_TILES = [BlockConfig(*t) for t in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                                       (64, 32, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 64, 8, 3))]


def forward_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name] with each tile of FWD_TILES (the default
    first among them), beside cuDNN's forward; each tile's output checked against the default's."""
    b, h, hkv, t, d, model_layout = PASS_SHAPES[name]
    q, k, v, _ = projection_views(b, h, hkv, t, d, dtype) if model_layout else make(b, h, t, d, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    cfg = fa._default_config(q, t)  # the tiles the launchers take at this shape
    want = flash_attention_forward(q, k, v)[0].float()
    row: dict = {"shape": name, "batch": b, "heads": h, "kv_heads": hkv, "seq_len": t, "head_dim": d,
                 "default": tuple(cfg.fwd), "fwd_ms": {}}
    for tile in FWD_TILES:
        tiled = cfg._replace(fwd=tile)
        try:
            err = (flash_attention_forward(q, k, v, config=tiled)[0].float() - want).abs().max().item()
        except OutOfResources:  # tiles too large for this card's shared memory
            continue
        if err > 1e-2 * want.abs().max().item():
            raise RuntimeError(f"{name}: forward tile {tuple(tile)} disagrees with the default by {err:.3g}")
        row["fwd_ms"][str(tuple(tile))] = measure.time_graph(partial(flash_attention_forward, q, k, v, config=tiled))
    row["cudnn_fwd_ms"] = measure.time_graph(partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION))
    return row


def backward_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal backward alone at PASS_SHAPES[name]: the two-pass backward (the library's
    default: dK/dV kernel + dQ kernel) and the one-pass backward (`atomic_dq=True`: dQ added up by the dK/dV
    kernel, by TMA reductions on sm_90+) at each dK/dV tile of ONE_PASS_TILES, every variant's gradients
    checked against the two-pass ones; beside them our forward and cuDNN's and FA2's forward and
    forward+backward (their backward alone is the difference). Then the two-pass backward, the fastest
    one-pass tile and cuDNN's forward and forward+backward again in BWD_ROUNDS interleaved rounds
    (one timing of cuDNN moves by 10-16% between calls): row["rounds"]."""
    b, h, hkv, t, d, model_layout = PASS_SHAPES[name]
    q, k, v, do = projection_views(b, h, hkv, t, d, dtype) if model_layout else make(b, h, t, d, dtype)
    with torch.no_grad():
        o, lse = flash_attention_forward(q, k, v)
    cfg = fa._default_config(q, t)  # the tiles the launchers take at this shape
    variants: dict[str, dict] = {"two-pass": {}}
    for tile in ONE_PASS_TILES[padded_head_dim(d)]:
        variants[f"one-pass {tuple(tile)}"] = {"atomic_dq": True, "config": cfg._replace(dkdv=tile)}

    def backward(kwargs: dict) -> tuple:
        return flash_attention_backward(do, q, k, v, o, lse, **kwargs)

    want = [g.float() for g in backward(variants["two-pass"])]
    row = {"shape": name, "batch": b, "heads": h, "kv_heads": hkv, "seq_len": t, "head_dim": d,
           "config": {kernel: tuple(c) for kernel, c in cfg._asdict().items()}, "fwd_ms": measure.time_graph(lambda: flash_attention_forward(q, k, v)),
           "bwd_ms": {}, "bwd_err": {}}
    for label, kw in variants.items():
        try:
            row["bwd_err"][label] = max(agreement(g, w, label) for g, w in zip(backward(kw), want, strict=True))
            row["bwd_ms"][label] = measure.time_graph(partial(backward, kw))
        except (OutOfResources, RuntimeError) as err:
            row["bwd_ms"][label] = float("nan")
            row["bwd_err"][label] = str(err).splitlines()[0][:200]
    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "fa2")):
        try:
            row |= {f"{label}_{key}": ms for key, ms in pass_ms(partial(sdpa, q, k, v, backend), do, [q, k, v]).items()}
        except RuntimeError as err:
            row[f"{label}_error"] = str(err).splitlines()[0][:200]
    one_pass = {label: ms for label, ms in row["bwd_ms"].items() if label.startswith("one-pass") and ms == ms}
    if one_pass and "cudnn_fwd_ms" in row:
        fastest = min(one_pass, key=one_pass.get)
        row["fastest_one_pass"] = fastest
        rounds: dict[str, list[float]] = {"two-pass": [], fastest: [], "cudnn": []}
        for _ in range(BWD_ROUNDS):
            for label in ("two-pass", fastest):
                rounds[label].append(measure.time_graph(partial(backward, variants[label])))
            cudnn = pass_ms(partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION), do, [q, k, v])
            rounds["cudnn"].append(cudnn["fwd_bwd_ms"] - cudnn["fwd_ms"])
        row["rounds"] = rounds
    return row


@triton.jit
def _tma_key_block(q, k_desc, v_desc, b, kv_h, start_n, offs_m, m_i, l_i, acc, qk_scale,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax: k, v [BLOCK_N, BLOCK_D] loaded by the TMA unit, the running
    max m_i, sum l_i [BLOCK_M] and output acc [BLOCK_M, BLOCK_D] updated; MASKED drops keys after the query."""
    k = k_desc.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] <= offs_m[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = v_desc.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    return m_new, l_i * alpha + tl.sum(p, 1), tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _tma_forward_kernel(Q, K, V, O, LSE, batch, n_heads, n_kv_heads, seq_len, sm_scale,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WARP_SPECIALIZE: tl.constexpr):
    """The library's causal forward (online softmax, exp2, the diagonal block masked in a loop of its own) with
    every tile moved by the TMA unit through device-side tensor descriptors, and optionally Triton's automatic
    warp specialisation of the off-diagonal loop (producer warps load, consumer warps compute). Grid
    (query blocks, B * H), the longest rows first. Out-of-range rows and the columns past HEAD_DIM (a head of 40
    in a 64-wide tile) are zero-filled on load and clipped on store by the descriptors, so no masks."""
    q_desc = tl.make_tensor_descriptor(Q, [batch, n_heads, seq_len, HEAD_DIM],
                                       [sqb, sqh, sqt, 1], [1, 1, BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K, [batch, n_kv_heads, seq_len, HEAD_DIM],
                                       [skb, skh, skt, 1], [1, 1, BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V, [batch, n_kv_heads, seq_len, HEAD_DIM],
                                       [svb, svh, svt, 1], [1, 1, BLOCK_N, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(O, [batch, n_heads, seq_len, HEAD_DIM],
                                       [sob, soh, sot, 1], [1, 1, BLOCK_M, BLOCK_D])
    start_m = tl.cdiv(seq_len, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    kv_h = h // (n_heads // n_kv_heads)
    q = q_desc.load([b, h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    diagonal = start_m * BLOCK_M // BLOCK_N * BLOCK_N  # first key block that reaches the diagonal
    for start_n in tl.range(0, diagonal, BLOCK_N, warp_specialize=WARP_SPECIALIZE):  # fully below it
        m_i, l_i, acc = _tma_key_block(q, k_desc, v_desc, b, kv_h, start_n, offs_m, m_i, l_i, acc, qk_scale,
                                       BLOCK_N, BLOCK_D, MASKED=False)
    for start_n in tl.range(diagonal, tl.minimum((start_m + 1) * BLOCK_M, seq_len), BLOCK_N):  # on it: masked
        m_i, l_i, acc = _tma_key_block(q, k_desc, v_desc, b, kv_h, start_n, offs_m, m_i, l_i, acc, qk_scale,
                                       BLOCK_N, BLOCK_D, MASKED=True)
    tl.store(LSE + bh * seq_len + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < seq_len)
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_desc.store([b, h, start_m * BLOCK_M, 0], o.reshape(1, 1, BLOCK_M, BLOCK_D))


def tma_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: BlockConfig, warp_specialize: bool) -> torch.Tensor:
    """Causal attention of q [B, H, T, D], k/v [B, Hkv, T, D] (any strides with unit stride along D) by
    `_tma_forward_kernel`; returns o [B, H, T, D]."""
    b, h, t, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    _tma_forward_kernel[(triton.cdiv(t, tile.block_m), b * h)](
        q, k, v, o, lse, b, h, k.shape[1], t, d ** -0.5, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *o.stride()[:3], HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        WARP_SPECIALIZE=warp_specialize, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return o


@contextmanager
def _captured_stderr() -> Iterator[io.BytesIO]:
    """Capture what native code writes to file descriptor 2 (MLIR diagnostics); read it after the block."""
    sink = io.BytesIO()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.write(tmp.read())


@triton.jit
def _persistent_forward_kernel(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                               n_heads, group_size, seq_len, n_bh, sm_scale,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The library's causal forward on a persistent grid: a fixed number of programs (a multiple of the SM
    count) each stride over the (query block, batch * head) tiles, the longest query blocks first, calling
    the library's `_attn_fwd_block` for each. Removes the launch's tail of programs waiting for an SM, at the
    price of one program per SM slot for the whole launch."""
    sqb, sqh, sqt = fa._aligned(sqb, sqh, sqt, ALIGN)
    skb, skh, skt = fa._aligned(skb, skh, skt, ALIGN)
    svb, svh, svt = fa._aligned(svb, svh, svt, ALIGN)
    sob, soh, sot = fa._aligned(sob, soh, sot, ALIGN)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    num_m = tl.cdiv(seq_len, BLOCK_M)
    for tile in range(tl.program_id(0), num_m * n_bh, tl.num_programs(0)):
        fa._attn_fwd_block(num_m - 1 - tile // n_bh, (tile % n_bh).to(tl.int64), Q, K, V, O, LSE,
                           sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                           n_heads, group_size, seq_len, seq_len, qk_scale,
                           HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N, True, PRECISION)


def persistent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: BlockConfig, per_sm: int) -> torch.Tensor:
    """Causal attention of q [B, H, T, D], k/v [B, Hkv, T, D] by `_persistent_forward_kernel` with
    ``per_sm`` programs per SM (all tiles if fewer); returns o [B, H, T, D]."""
    b, h, t, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    grid = (min(triton.cdiv(t, tile.block_m) * b * h, num_sms(q.device) * per_sm),)
    _persistent_forward_kernel[grid](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        h, h // k.shape[1], t, b * h, d ** -0.5, **fa._head_args(d, q, k, v, o),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, PRECISION=fa._precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return o


def forward_baseline(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The causal forward's inputs q, k, v at PASS_SHAPES[name] (no grad), our output (fp32) to check a
    variant against, and the row a variant's timings join: the shape, our default tile, and CUDA-graph ms
    of ours and of cuDNN's."""
    b, h, hkv, t, d, model_layout = PASS_SHAPES[name]
    q, k, v, _ = projection_views(b, h, hkv, t, d, dtype) if model_layout else make(b, h, t, d, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    row = {"shape": name, "batch": b, "heads": h, "kv_heads": hkv, "seq_len": t, "head_dim": d,
           "default": tuple(fa._default_config(q, t).fwd),
           "ours_ms": measure.time_graph(lambda: flash_attention_forward(q, k, v)),
           "cudnn_ms": measure.time_graph(partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION))}
    return q, k, v, flash_attention_forward(q, k, v)[0].float(), row


def agreement(got: torch.Tensor, want: torch.Tensor, variant: str) -> float:
    """A forward variant's largest error relative to the largest value of ours (`want`, fp32); RuntimeError
    naming `variant` beyond 1e-2, where a variant is wrong rather than rounded differently."""
    err = (got.float() - want).abs().max().item() / want.abs().max().item()
    if err > 1e-2:
        raise RuntimeError(f"{variant} disagrees with ours by {err:.3g}")
    return err


@triton.jit
def _query_program(Q, sqb, sqh, sqt, n_heads, group_size, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What one program of the script's causal self-attention kernels works on (grid (query blocks, B * H), the
    longest query blocks first): its query block start_m, (batch, head) index bh (int64), batch b, head h and
    key/value head kv_h, the offsets offs_m [BLOCK_M], offs_n [BLOCK_N] (from 0), offs_d [BLOCK_D], the masks
    d_ok and row_ok, and its query tile q [BLOCK_M, BLOCK_D] (zero past the rows and HEAD_DIM). Strides aligned."""
    start_m = tl.cdiv(seq_len, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_m, offs_n, offs_d = start_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    d_ok, row_ok = offs_d < HEAD_DIM, offs_m < seq_len
    q = fa._load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    return start_m, bh, b, h, h // group_size, offs_m, offs_n, offs_d, d_ok, row_ok, q


@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA and integer pipes instead of the MUFU unit (FlashAttention-4's trick):
    n = round(x) by adding 1.5 * 2^23 (no float-to-int conversion, itself a MUFU-rate instruction),
    2^(x - n) by a degree-3 polynomial on [-1/2, 1/2] (least squares, relative error 8e-5, far below
    bf16's 4e-3), and 2^n added to the result's exponent bits. x is clamped at -125 so the exponent
    stays a normal float's; 2^-125 adds nothing to a softmax sum."""
    x = tl.maximum(x, -125.0)
    shifted = x + 12582912.0                       # 1.5 * 2^23: the low mantissa bits now hold round(x)
    f = x - (shifted - 12582912.0)                 # x - round(x), in [-1/2, 1/2]
    p = ((0.05508876703270122 * f + 0.2426046559080518) * f + 0.6932762833317916) * f + 0.9999289048197653
    n = shifted.to(tl.int32, bitcast=True) - 0x4B400000  # round(x) as an integer, from the bits
    return (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _poly_forward_kernel(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                         n_heads, group_size, seq_len, sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The library's causal forward (self-attention, grid (query blocks, B * H), longest first) with the
    exponentials of every unmasked key block split in two: every other column by the MUFU unit's exp2,
    the rest by `_exp2_poly`, so the two pipes share the work. The diagonal blocks run the library's loop."""
    sqb, sqh, sqt = fa._aligned(sqb, sqh, sqt, ALIGN)
    skb, skh, skt = fa._aligned(skb, skh, skt, ALIGN)
    svb, svh, svt = fa._aligned(svb, svh, svt, ALIGN)
    sob, soh, sot = fa._aligned(sob, soh, sot, ALIGN)
    start_m, bh, b, h, kv_h, offs_m, offs_n, offs_d, d_ok, row_ok, q = _query_program(
        Q, sqb, sqh, sqt, n_heads, group_size, seq_len, HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N)
    k_base, v_base = K + b * skb + kv_h * skh, V + b * svb + kv_h * svh
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi_full, hi = fa._key_range(start_m, seq_len, 0, BLOCK_M, BLOCK_N, True)
    for start_n in range(0, hi_full, BLOCK_N):
        kv_offs = (start_n + offs_n)[:, None] * skt + offs_d[None, :]   # [BLOCK_N, BLOCK_D]; v shares k's strides
        k = fa._load_tile(k_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        on_mufu, on_fma = tl.split(tl.reshape(s - m_new[:, None], (BLOCK_M, BLOCK_N // 2, 2)))  # even, odd columns
        p = tl.reshape(tl.join(tl.exp2(on_mufu), _exp2_poly(on_fma)), (BLOCK_M, BLOCK_N))
        l_i = l_i * alpha + tl.sum(p, 1)
        v = fa._load_tile(v_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    acc, l_i, m_i = fa._attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, offs_m, offs_n, offs_d, d_ok,
                                       hi_full, hi, seq_len, 0, qk_scale, BLOCK_N, True, True, PRECISION, EVEN_D)
    tl.store(LSE + bh * seq_len + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    fa._store_tile(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o, row_ok, d_ok, EVEN_D)


def poly_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: BlockConfig) -> torch.Tensor:
    """Causal self-attention of q [B, H, T, D], k/v [B, Hkv, T, D] (k and v with equal strides) by
    `_poly_forward_kernel`; returns o [B, H, T, D]."""
    b, h, t, d = q.shape
    if k.stride() != v.stride():
        raise ValueError(f"poly_forward: k and v need equal strides, got {k.stride()} and {v.stride()}")
    o = torch.empty_like(q)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    _poly_forward_kernel[(triton.cdiv(t, tile.block_m), b * h)](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        h, h // k.shape[1], t, d ** -0.5, **fa._head_args(d, q, k, v, o),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, PRECISION=fa._precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return o



@triton.jit
def _gemms_forward_kernel(Q, K, V, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, n_heads, group_size,
                          seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                          ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The library's causal forward with the softmax taken out: per key block S = Q K^T, masked to 0 above
    the diagonal, cast to the input dtype and multiplied into O += S V. The same grid (query blocks, B * H,
    longest first), loads, masks and two `tl.dot`s per block as ours, and nothing else: its time is what
    a `tl.dot` loop of this tile takes for attention's matmuls alone. Not attention (no scale, no softmax)."""
    sqb, sqh, sqt = fa._aligned(sqb, sqh, sqt, ALIGN)
    skb, skh, skt = fa._aligned(skb, skh, skt, ALIGN)
    svb, svh, svt = fa._aligned(svb, svh, svt, ALIGN)
    sob, soh, sot = fa._aligned(sob, soh, sot, ALIGN)
    start_m, _, b, h, kv_h, offs_m, offs_n, offs_d, d_ok, row_ok, q = _query_program(
        Q, sqb, sqh, sqt, n_heads, group_size, seq_len, HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N)
    k_base, v_base = K + b * skb + kv_h * skh, V + b * svb + kv_h * svh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi_full, hi = fa._key_range(start_m, seq_len, 0, BLOCK_M, BLOCK_N, True)
    for start_n in range(0, hi_full, BLOCK_N):     # blocks below the diagonal: no masks, as in ours
        kv_offs = (start_n + offs_n)[:, None] * skt + offs_d[None, :]   # [BLOCK_N, BLOCK_D]; v shares k's strides
        k = fa._load_tile(k_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)           # [BLOCK_M, BLOCK_N]
        v = fa._load_tile(v_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        acc = tl.dot(s.to(v.dtype), v, acc, input_precision=PRECISION)
    for start_n in range(hi_full, hi, BLOCK_N):    # the diagonal block(s) and the ragged end: masked
        cols = start_n + offs_n
        kv_offs = cols[:, None] * skt + offs_d[None, :]
        k = fa._load_tile(k_base + kv_offs, cols < seq_len, d_ok, True, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where((cols[None, :] < seq_len) & (cols[None, :] <= offs_m[:, None]), s, 0.0)
        v = fa._load_tile(v_base + kv_offs, cols < seq_len, d_ok, True, EVEN_D)
        acc = tl.dot(s.to(v.dtype), v, acc, input_precision=PRECISION)
    fa._store_tile(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                   row_ok, d_ok, EVEN_D)


def gemms_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: BlockConfig) -> torch.Tensor:
    """tril(q k^T) v by `_gemms_forward_kernel` (the scores rounded to q's dtype before the second product):
    q [B, H, T, D], k/v [B, Hkv, T, D] with equal strides -> o [B, H, T, D]. Attention's two matmuls and
    causal tiling without its softmax, to time what they cost alone."""
    b, h, t, d = q.shape
    if k.stride() != v.stride():
        raise ValueError(f"gemms_forward: k and v need equal strides, got {k.stride()} and {v.stride()}")
    o = torch.empty_like(q)
    _gemms_forward_kernel[(triton.cdiv(t, tile.block_m), b * h)](
        q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], h, h // k.shape[1], t,
        **fa._head_args(d, q, k, v, o), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        PRECISION=fa._precision(q.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return o



@triton.jit
def _gemms_dkdv_inner(dk, dv, k, v, q_base, do_base, sqt, sdot, offs_n, offs_d, d_ok, lo, hi, seq_len,
                      BLOCK_M: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Query blocks [lo, hi) past one key block: dV += tril(S)^T dO, dK += tril(dP)^T Q (transposed tiles, keys
    along rows, as in the library's `_attn_bwd_dkdv_inner`), without the recomputed softmax or dS."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        row_ok = rows < seq_len
        q = fa._load_tile(q_base + rows[:, None] * sqt + offs_d[None, :], row_ok, d_ok, MASK, EVEN_D)
        do = fa._load_tile(do_base + rows[:, None] * sdot + offs_d[None, :], row_ok, d_ok, MASK, EVEN_D)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)      # [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)    # [BLOCK_N, BLOCK_M]
        if MASK:
            keep = (rows[None, :] < seq_len) & (rows[None, :] >= offs_n[:, None])
            s_t = tl.where(keep, s_t, 0.0)
            dp_t = tl.where(keep, dp_t, 0.0)
        dv = tl.dot(s_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dk = tl.dot(dp_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _gemms_dkdv_kernel(Q, K, V, DO, DK, DV, sqb, sqh, sqt, skb, skh, skt, sdob, sdoh, sdot, sdkb, sdkh, sdkt,
                       n_kv_heads, group_size, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       EVEN_D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    """The library's dK/dV kernel (causal self-attention) with the softmax's backward taken out: the same grid
    (key blocks, B * Hkv), loop over the group's query heads, loads, masks and four `tl.dot`s per tile, and
    nothing else. V shares K's strides and dV dK's."""
    sqb, sqh, sqt = fa._aligned(sqb, sqh, sqt, ALIGN)
    skb, skh, skt = fa._aligned(skb, skh, skt, ALIGN)
    sdob, sdoh, sdot = fa._aligned(sdob, sdoh, sdot, ALIGN)
    sdkb, sdkh, sdkt = fa._aligned(sdkb, sdkh, sdkt, ALIGN)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1).to(tl.int64)
    b, kv_head = bkv // n_kv_heads, bkv % n_kv_heads
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    d_ok, col_ok = offs_d < HEAD_DIM, offs_n < seq_len
    kv_offs = b * skb + kv_head * skh + offs_n[:, None] * skt + offs_d[None, :]    # [BLOCK_N, BLOCK_D]
    k = fa._load_tile(K + kv_offs, col_ok, d_ok, True, EVEN_D)
    v = fa._load_tile(V + kv_offs, col_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # queries [diag_lo, lo) straddle the diagonal (masked), [lo, tail) are whole blocks below it, [tail, T) ragged
    diag_lo = (start_n // BLOCK_M) * BLOCK_M
    lo = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seq_len)
    tail = tl.maximum(lo, (seq_len // BLOCK_M) * BLOCK_M)
    for g in range(group_size):
        head = kv_head * group_size + g
        q_base, do_base = Q + b * sqb + head * sqh, DO + b * sdob + head * sdoh
        dk, dv = _gemms_dkdv_inner(dk, dv, k, v, q_base, do_base, sqt, sdot, offs_n, offs_d, d_ok, diag_lo, lo,
                                   seq_len, BLOCK_M, True, EVEN_D, PRECISION)
        dk, dv = _gemms_dkdv_inner(dk, dv, k, v, q_base, do_base, sqt, sdot, offs_n, offs_d, d_ok, lo, tail,
                                   seq_len, BLOCK_M, False, EVEN_D, PRECISION)
        dk, dv = _gemms_dkdv_inner(dk, dv, k, v, q_base, do_base, sqt, sdot, offs_n, offs_d, d_ok, tail, seq_len,
                                   seq_len, BLOCK_M, True, EVEN_D, PRECISION)
    out_offs = b * sdkb + kv_head * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
    fa._store_tile(DK + out_offs, dk.to(DK.dtype.element_ty), col_ok, d_ok, EVEN_D)
    fa._store_tile(DV + out_offs, dv.to(DV.dtype.element_ty), col_ok, d_ok, EVEN_D)


@triton.jit
def _gemms_dq_kernel(Q, K, V, DO, DQ, sqb, sqh, sqt, skb, skh, skt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, n_heads,
                     group_size, seq_len,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The library's dQ kernel (causal self-attention) with the softmax's backward taken out: per key block
    dQ += tril(S + dP) K, S = Q K^T and dP = dO V^T (the sum keeps both matmuls, for one add where ours
    computes dS = P (dP - D)). Same grid, loads, masks and three `tl.dot`s per tile. V shares K's strides."""
    sqb, sqh, sqt = fa._aligned(sqb, sqh, sqt, ALIGN)
    skb, skh, skt = fa._aligned(skb, skh, skt, ALIGN)
    sdob, sdoh, sdot = fa._aligned(sdob, sdoh, sdot, ALIGN)
    sdqb, sdqh, sdqt = fa._aligned(sdqb, sdqh, sdqt, ALIGN)
    start_m, _, b, h, kv_h, offs_m, offs_n, offs_d, d_ok, row_ok, q = _query_program(
        Q, sqb, sqh, sqt, n_heads, group_size, seq_len, HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N)
    k_base, v_base = K + b * skb + kv_h * skh, V + b * skb + kv_h * skh
    do = fa._load_tile(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi_full, hi = fa._key_range(start_m, seq_len, 0, BLOCK_M, BLOCK_N, True)
    for start_n in range(0, hi_full, BLOCK_N):     # below the diagonal: no masks
        kv_offs = (start_n + offs_n)[:, None] * skt + offs_d[None, :]
        k = fa._load_tile(k_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        v = fa._load_tile(v_base + kv_offs, offs_n < BLOCK_N, d_ok, False, EVEN_D)
        ds = tl.dot(q, tl.trans(k), input_precision=PRECISION) + tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    for start_n in range(hi_full, hi, BLOCK_N):    # the diagonal block(s) and the ragged end
        cols = start_n + offs_n
        kv_offs = cols[:, None] * skt + offs_d[None, :]
        k = fa._load_tile(k_base + kv_offs, cols < seq_len, d_ok, True, EVEN_D)
        v = fa._load_tile(v_base + kv_offs, cols < seq_len, d_ok, True, EVEN_D)
        ds = tl.dot(q, tl.trans(k), input_precision=PRECISION) + tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where((cols[None, :] < seq_len) & (cols[None, :] <= offs_m[:, None]), ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    fa._store_tile(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                   row_ok, d_ok, EVEN_D)


def gemms_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                   config: FlashConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's seven matmuls per tile without its softmax, by `_gemms_dkdv_kernel` and `_gemms_dq_kernel`
    at ``config``'s dkdv and dq tiles: q, do [B, H, T, D], k, v [B, Hkv, T, D] (k and v with equal strides)
    -> dq = tril(S + dP) K, dk = sum over the group's heads of tril(dP)^T Q, dv = the same of tril(S)^T dO, with
    S = q k^T and dP = do v^T rounded to q's dtype."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    if k.stride() != v.stride():
        raise ValueError(f"gemms_backward: k and v need equal strides, got {k.stride()} and {v.stride()}")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
    head = fa._head_args(d, q, k, v, do, dq, dk)
    dkdv, dq_tile = config.dkdv, config.dq
    _gemms_dkdv_kernel[(triton.cdiv(t, dkdv.block_n), b * hkv)](
        q, k, v, do, dk, dv, *q.stride()[:3], *k.stride()[:3], *do.stride()[:3], *dk.stride()[:3], hkv, h // hkv, t,
        **head, BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, PRECISION=fa._precision(q.dtype),
        num_warps=dkdv.num_warps, num_stages=dkdv.num_stages)
    _gemms_dq_kernel[(triton.cdiv(t, dq_tile.block_m), b * h)](
        q, k, v, do, dq, *q.stride()[:3], *k.stride()[:3], *do.stride()[:3], *dq.stride()[:3], h, h // hkv, t,
        **head, BLOCK_M=dq_tile.block_m, BLOCK_N=dq_tile.block_n, PRECISION=fa._precision(q.dtype),
        num_warps=dq_tile.num_warps, num_stages=dq_tile.num_stages)
    return dq, dk, dv


TMA_SHAPES = ("medium", "D64 T4096", "D128 T1024", "D128 T4096", "D128 T16384")
TMA_TILES = [BlockConfig(*t) for t in ((64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3),
                                       (128, 64, 8, 3), (128, 128, 8, 2))]


def tma_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name]: ours (default tiles, pointer loads), cuDNN's, and
    `tma_forward` at every tile of TMA_TILES with and without warp specialisation, each checked against ours (a
    variant the compiler rejects is recorded with the first line of its error)."""
    q, k, v, want, row = forward_baseline(name, dtype)
    row["tma"] = []
    for warp_specialize in (False, True):
        for tile in TMA_TILES:
            entry: dict = {"tile": tuple(tile), "warp_specialize": warp_specialize}
            run = partial(tma_forward, q, k, v, tile, warp_specialize)
            try:
                with _captured_stderr() as log:  # the compiler names a failing pass on fd 2, not in the error
                    got = run()
            except Exception as exc:  # a compiler failure is a result here, not a crash
                failed_pass = re.search(r"Pipeline failed while executing \[`(\w+)`", log.getvalue().decode(errors="replace"))
                entry["error"] = (str(exc).strip().splitlines() or [repr(exc)])[0][:200]
                entry["failed_pass"] = failed_pass.group(1) if failed_pass else None
                row["tma"].append(entry)
                continue
            err = agreement(got, want, f"{name}: TMA forward {tuple(tile)} ws={warp_specialize}")
            row["tma"].append(entry | {"ms": measure.time_graph(run), "max_rel_err": err})
    return row


PERSISTENT_TILES = [BlockConfig(*t) for t in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))]


def persistent_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name]: ours (default tiles, one program per query
    block), cuDNN's, and `persistent_forward` at every tile of PERSISTENT_TILES with 1, 2 and 4 programs per
    SM, each checked against ours; ours timed again last, to show the drift within the run."""
    q, k, v, want, row = forward_baseline(name, dtype)
    row["persistent"] = []
    for per_sm in (1, 2, 4):
        for tile in PERSISTENT_TILES:
            run = partial(persistent_forward, q, k, v, tile, per_sm)
            try:
                got = run()
            except OutOfResources:  # more stages than this card's shared memory holds
                continue
            err = agreement(got, want, f"{name}: persistent forward {tuple(tile)} x{per_sm}")
            row["persistent"].append({"tile": tuple(tile), "per_sm": per_sm, "ms": measure.time_graph(run), "max_rel_err": err})
    row["ours_ms_again"] = measure.time_graph(lambda: flash_attention_forward(q, k, v))
    return row


def poly_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name]: ours and `poly_forward` at each tile of
    PERSISTENT_TILES (ours with the same tile, so each pair differs only in the exponentials), beside
    cuDNN's; each `poly_forward` output checked against ours."""
    q, k, v, want, row = forward_baseline(name, dtype)
    cfg = fa._default_config(q, q.shape[2])
    row["tiles"] = []
    for tile in PERSISTENT_TILES:
        ours = partial(flash_attention_forward, q, k, v, config=cfg._replace(fwd=tile))
        poly = partial(poly_forward, q, k, v, tile)
        try:
            got = poly()
        except OutOfResources:  # more stages than this card's shared memory holds
            continue
        err = agreement(got, want, f"{name}: poly-exp2 forward {tuple(tile)}")
        row["tiles"].append({"tile": tuple(tile), "ours_ms": measure.time_graph(ours), "poly_ms": measure.time_graph(poly),
                             "max_rel_err": err})
    return row


GEMMS_SHAPES = ("medium", *(f"D{d} T{t}" for d in (64, 128) for t in (1024, 4096, 16384)))  # bench kernels' lengths and heads
GEMMS_TILES = [BlockConfig(*t) for t in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3))]


def gemms_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name]: ours (default tile), cuDNN's, and at every tile of
    GEMMS_TILES ours beside `gemms_forward` (the same loop without the softmax), so each pair's difference is
    what the softmax adds to attention's matmuls in that tile; then the backward alike (`gemms_backward_times`)."""
    q, k, v, _, row = forward_baseline(name, dtype)
    cfg = fa._default_config(q, q.shape[2])
    row["tiles"] = []
    for tile in GEMMS_TILES:
        ours = partial(flash_attention_forward, q, k, v, config=cfg._replace(fwd=tile))
        gemms = partial(gemms_forward, q, k, v, tile)
        try:
            ours(), gemms()
        except OutOfResources:  # more stages than this card's shared memory holds
            continue
        row["tiles"].append({"tile": tuple(tile), "ours_ms": measure.time_graph(ours), "gemms_ms": measure.time_graph(gemms)})
    row["tflop"] = measure.attention_flops(row["batch"], row["heads"], row["seq_len"], row["head_dim"]) / 1e12
    row["backward"] = gemms_backward_times(name, dtype)
    return row


def gemms_backward_times(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal backward alone at PASS_SHAPES[name] and the default tiles: ours (preprocess,
    dK/dV and dQ kernels), `gemms_backward` (the same two loops' matmuls alone), and cuDNN's (its forward+backward
    minus its forward)."""
    b, h, hkv, t, d, model_layout = PASS_SHAPES[name]
    q, k, v, do = projection_views(b, h, hkv, t, d, dtype) if model_layout else make(b, h, t, d, dtype)
    with torch.no_grad():
        o, lse = flash_attention_forward(q, k, v)
    cfg = fa._default_config(q, t)
    cudnn = pass_ms(partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION), do, [q, k, v])
    with torch.no_grad():
        return {"tiles": {"dkdv": tuple(cfg.dkdv), "dq": tuple(cfg.dq)},
                "ours_ms": measure.time_graph(lambda: flash_attention_backward(do, q, k, v, o, lse)),
                "gemms_ms": measure.time_graph(partial(gemms_backward, q, k, v, do, cfg)),
                "cudnn_ms": cudnn["fwd_bwd_ms"] - cudnn["fwd_ms"]}


GLUON_SHAPES = tuple(f"D{d} T{t}" for d in (64, 128) for t in (1024, 4096, 16384))  # gluon_attention's limits: D 64/128
GLUON_TILES = ((64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2))  # (block_m, block_n, warps, stages)
GLUON_WS = {64: ((64, 64, 4, 2), 80), 128: ((64, 64, 4, 2), 128)}  # warp-specialised: tile, maxnreg (3 and 2 programs/SM)
GLUON_PINGPONG = ((128, 128, 8, 2), (128, 64, 8, 2))  # two consumer warpgroups of 64 rows; 240 registers a thread each
# (the cooperative schedule, the same two without turns, at the first tile)


# At long sequences one timing of the same kernel moves from one call to the next, cuDNN's most (its forward
# at D=128, T=16384: 1.772-2.060 ms over the rounds of results/flash_attention_gluon.json): verdicts take the
# median of interleaved rounds.
GLUON_ROUNDS = 7
GLUON_ROUND_VARIANTS = 3
GLUON_BWD_TILES = {  # the Gluon dK/dV kernel's tiles --gluon-backward times: (block_m, block_n, warps, stages)
    d: ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2)) for d in (64, 128)}  # the 3 fastest of 6: gluon_dkdv_tiles.json
GLUON_DQ_TILES = {d: ((64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2)) for d in (64, 128)}  # dQ
# the dK/dV kernel at its first tile with a register cap: at D=64 it takes 192 registers uncapped (two programs a
# SM), 168 lets three share one for 92 spilled bytes (ptxas, triton 3.6); at D=128 it already needs 255
GLUON_BWD_MAXNREG = {64: (168,), 128: ()}
GLUON_BWD_ROUNDS = 5


def gluon_variants(head_dim: int) -> list[tuple[str, tuple, int | None]]:
    """(schedule, tile, maxnreg) of every Gluon forward the --gluon mode times (schedules: gluon_attention's)."""
    plain = [(schedule, t, None) for schedule in ("overlap", "sequential") for t in GLUON_TILES]
    tile, maxnreg = GLUON_WS[head_dim]
    return [*plain, ("warp-specialised", tile, maxnreg), ("cooperative", GLUON_PINGPONG[0], None),
            *(("ping-pong", t, None) for t in GLUON_PINGPONG)]


def gluon_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward at PASS_SHAPES[name]: ours, cuDNN's, and the Gluon forward
    (`gluon_attention.py`) in every variant of `gluon_variants`, each checked against ours; then ours, cuDNN's
    and the GLUON_ROUND_VARIANTS fastest variants' again in GLUON_ROUNDS interleaved rounds ("rounds"), and
    forward+backward (ours, cuDNN's, and the forward of the variant with the fastest median followed by our
    backward)."""
    from minigpt.kernels.gluon_attention import GluonTile, gluon_attention_forward  # Triton >= 3.6; only this mode needs it

    q, k, v, want, row = forward_baseline(name, dtype)
    row["tflop"] = measure.attention_flops(row["batch"], row["heads"], row["seq_len"], row["head_dim"]) / 1e12
    row["gluon"] = []
    for schedule, tile, maxnreg in gluon_variants(row["head_dim"]):
        run = partial(gluon_attention_forward, q, k, v, GluonTile(*tile), schedule, maxnreg)
        err = agreement(run()[0], want, f"{name}: Gluon forward {schedule} {tile}")
        row["gluon"].append({"schedule": schedule, "tile": tile, "maxnreg": maxnreg, "ms": measure.time_graph(run),
                             "max_rel_err": err})
    # The sweep's fastest few, with ours and cuDNN, again in interleaved rounds: a variant is chosen by the
    # median of its rounds, not by one timing that may have been lucky.
    candidates = sorted(row["gluon"], key=lambda e: e["ms"])[:GLUON_ROUND_VARIANTS]
    runs = {"ours": partial(flash_attention_forward, q, k, v), "cudnn": partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION)}
    runs |= {i: partial(gluon_attention_forward, q, k, v, GluonTile(*e["tile"]), e["schedule"], e["maxnreg"])
             for i, e in enumerate(candidates)}
    rounds = {peer: [] for peer in runs}
    for _ in range(GLUON_ROUNDS):
        for peer, fn in runs.items():
            rounds[peer].append(measure.time_graph(fn))
    row["rounds"] = {"ours_ms": rounds["ours"], "cudnn_ms": rounds["cudnn"],
                     "gluon": [{key: e[key] for key in ("schedule", "tile", "maxnreg")} | {"ms": rounds[i]}
                               for i, e in enumerate(candidates)]}
    fastest = min(row["rounds"]["gluon"], key=lambda e: statistics.median(e["ms"]))
    row["fastest"] = {key: fastest[key] for key in ("schedule", "tile", "maxnreg")}
    gluon_forward = runs[row["rounds"]["gluon"].index(fastest)]
    do = torch.randn_like(q)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def gluon_then_our_backward():
        return flash_attention_backward(do, q, k, v, *gluon_forward())

    with torch.no_grad():
        row["fwd_bwd_ms"] = {"ours": measure.time_graph(lambda: flash_attention_backward(do, q, k, v, *flash_attention_forward(q, k, v))),
                             "gluon + ours": measure.time_graph(gluon_then_our_backward)}
    row["fwd_bwd_ms"]["cudnn"] = pass_ms(partial(sdpa, *leaves, SDPBackend.CUDNN_ATTENTION), do, leaves)["fwd_bwd_ms"]
    return row


def gluon_backward_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal backward at PASS_SHAPES[name] (contiguous inputs; o and lse from the Gluon
    forward at `default_plan`): ours, then ours with the Gluon dK/dV kernel in place of its own at each tile of
    GLUON_BWD_TILES (our dQ kernel), at the first of them under each cap of GLUON_BWD_MAXNREG, and warp-specialised
    (`gluon_ws_backward.py`), with the Gluon dQ kernel at each of GLUON_DQ_TILES (our dK/dV kernel), and
    with both at the fastest of each, every variant checked against ours. Then in GLUON_BWD_ROUNDS interleaved
    rounds: the backward alone, ours, the fastest variant's and cuDNN's (its forward+backward minus its
    forward), and forward+backward, the Gluon forward with ours or with the fastest variant, against cuDNN's."""
    from gluon_ws_backward import ws_dkdv

    from minigpt.kernels.gluon_attention import (
        GluonTile,
        default_plan,
        gluon_attention_dkdv,
        gluon_attention_dq,
        gluon_attention_forward,
    )

    b, h, _, t, d, _ = PASS_SHAPES[name]
    q, k, v, do = make(b, h, t, d, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    forward = partial(gluon_attention_forward, q, k, v, *default_plan(d, t))
    o, lse = forward()
    ours = (None, None)  # a plan: (dK/dV launcher, dQ launcher), None for our kernel

    def backward(plan: tuple, o: torch.Tensor, lse: torch.Tensor) -> tuple:
        return flash_attention_backward(do, q, k, v, o, lse, dkdv_kernel=plan[0], dq_kernel=plan[1])

    want = [g.float() for g in backward(ours, o, lse)]
    row: dict = {"shape": name, "batch": b, "heads": h, "seq_len": t, "head_dim": d,
                 "tflop_bwd": 2.5 * measure.attention_flops(b, h, t, d) / 1e12, "bwd_ms": {}, "bwd_err": {}}
    plans: dict[str, tuple] = {}  # label -> plan

    def time_plan(label: str, dkdv, dq) -> None:
        plans[label] = (dkdv, dq)
        run = partial(backward, plans[label], o, lse)
        row["bwd_err"][label] = max(agreement(g, w, label) for g, w in zip(run(), want, strict=True))
        row["bwd_ms"][label] = measure.time_graph(run)

    for tile in GLUON_BWD_TILES[d]:
        time_plan(f"dkdv {tile}", partial(gluon_attention_dkdv, tile=GluonTile(*tile)), None)
    for maxnreg in GLUON_BWD_MAXNREG[d]:
        tile = GLUON_BWD_TILES[d][0]
        time_plan(f"dkdv {tile} maxnreg {maxnreg}", partial(gluon_attention_dkdv, tile=GluonTile(*tile), maxnreg=maxnreg), None)
    time_plan("dkdv warp-specialised (64, 128)", ws_dkdv, None)
    for tile in GLUON_DQ_TILES[d]:
        time_plan(f"dq {tile}", None, partial(gluon_attention_dq, tile=GluonTile(*tile)))
    best = [min((lb for lb in plans if lb.startswith(kind)), key=row["bwd_ms"].get) for kind in ("dkdv", "dq")]
    time_plan(f"{best[0]} + {best[1]}", plans[best[0]][0], plans[best[1]][1])
    row["bwd_ms"]["ours"] = measure.time_graph(partial(backward, ours, o, lse))
    fastest = min(plans, key=row["bwd_ms"].get)
    row["fastest"] = fastest
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    cudnn = partial(sdpa, *leaves, SDPBackend.CUDNN_ATTENTION)
    rounds: dict[str, list[float]] = {key: [] for key in ("ours", fastest, "cudnn", "cudnn fwd", "gluon fwd + ours",
                                                          "gluon fwd + gluon bwd", "cudnn fwd+bwd")}
    for _ in range(GLUON_BWD_ROUNDS):
        rounds["ours"].append(measure.time_graph(partial(backward, ours, o, lse)))
        rounds[fastest].append(measure.time_graph(partial(backward, plans[fastest], o, lse)))
        both = pass_ms(cudnn, do, leaves)
        rounds["cudnn"].append(both["fwd_bwd_ms"] - both["fwd_ms"])
        rounds["cudnn fwd"].append(both["fwd_ms"])
        rounds["cudnn fwd+bwd"].append(both["fwd_bwd_ms"])
        rounds["gluon fwd + ours"].append(measure.time_graph(lambda: backward(ours, *forward())))
        rounds["gluon fwd + gluon bwd"].append(measure.time_graph(lambda: backward(plans[fastest], *forward())))
    row["rounds"] = rounds
    return row


def _gluon_backward_line(r: dict) -> str:
    rounds, fastest = r["rounds"], r["fastest"]

    def ratio(peer: str, ours: str) -> float:
        return measure.paired_ratio(rounds[peer], rounds[ours])

    return (f"{r['shape']:<12} ours {statistics.median(rounds['ours']):6.3f}  {fastest:<40} "
            f"{statistics.median(rounds[fastest]):6.3f}  cuDNN {statistics.median(rounds['cudnn']):6.3f} | bwd x cuDNN: "
            f"ours {ratio('cudnn', 'ours'):.3f} gluon {ratio('cudnn', fastest):.3f} | fwd+bwd x cuDNN: gluon+ours "
            f"{ratio('cudnn fwd+bwd', 'gluon fwd + ours'):.3f} gluon+gluon {ratio('cudnn fwd+bwd', 'gluon fwd + gluon bwd'):.3f}")


# The one-pass backward in Gluon (gluon_onepass_backward.py): (label, tile, reduction, dQ tiles in flight,
# warp-specialised: at heads of 128 on two warpgroups only)
GLUON_ONE_PASS = (("TMA, 2 tiles", (64, 64, 4, 2), "tma", 2, False), ("TMA, 3 tiles", (64, 64, 4, 2), "tma", 3, False),
                  ("TMA, 128 keys", (64, 128, 8, 2), "tma", 2, False), ("atomics", (64, 64, 4, 2), "atomic", 2, False),
                  ("warp-specialised", (64, 64, 4, 2), "tma", 2, True),
                  ("warp-specialised, 128 keys", (64, 128, 8, 2), "tma", 2, True))


def one_pass_variants(head_dim: int, variants: tuple = GLUON_ONE_PASS) -> tuple:
    """The ``variants`` (of GLUON_ONE_PASS) that run at this head size: at heads of 128 a warp-specialised one only
    on two compute warpgroups (128 keys a program; on one its registers run out, `_unsupported_one_pass`)."""
    return tuple(v for v in variants if not (v[4] and head_dim != 64 and v[1][1] != 128))


REDUCE_HEADS = (2, 32)  # --gluon-one-pass's add-rate probe: an accumulator of 2 heads (8 MiB, in L2) and of 32


def dq_reduce_bytes(batch: int, n_kv_heads: int, group_size: int, seq_len: int, head_dim: int, block_m: int,
                    block_n: int) -> int:
    """Bytes of fp32 dQ partials the one-pass kernel adds: one [block_m, D] tile per step, a step per query block
    from each key block's diagonal to the end, for each of the group's query heads."""
    blocks = seq_len // block_m
    steps = sum(blocks - start // block_m for start in range(0, seq_len, block_n))
    return batch * n_kv_heads * group_size * steps * block_m * head_dim * 4


def gluon_one_pass_row(name: str, dtype: torch.dtype, variants: tuple = GLUON_ONE_PASS) -> dict:
    """CUDA-graph ms of the causal backward at PASS_SHAPES[name] (contiguous inputs, o and lse from the Gluon
    forward at `default_plan`) in GLUON_BWD_ROUNDS interleaved rounds: the library's two kernels (`backward_plan`
    without the one pass, under the key "library"), the one-pass kernel in each of ``variants`` (of
    GLUON_ONE_PASS) that takes the head size (`flash_attention_backward(atomic_dq=True)`: the portable
    preprocess zeroes the fp32 accumulator, a last kernel scales and casts it), each checked against the
    library's, and cuDNN's (its forward+backward minus its forward); with each variant's dQ adds in bytes."""
    from gluon_onepass_backward import onepass_dkdv_dq

    from minigpt.kernels.gluon_attention import GluonTile, backward_plan, default_plan, gluon_attention_backward, gluon_attention_forward

    b, h, _, t, d, _ = PASS_SHAPES[name]
    q, k, v, do = make(b, h, t, d, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = gluon_attention_forward(q, k, v, *default_plan(d, t))
    runs = {"library": partial(gluon_attention_backward, do, q, k, v, o, lse, *backward_plan(d, t, one_pass=False))}
    row: dict = {"shape": name, "batch": b, "heads": h, "seq_len": t, "head_dim": d,
                 "tflop_bwd": 2.5 * measure.attention_flops(b, h, t, d) / 1e12, "err": {}, "reduce_bytes": {}}
    want = [g.float() for g in runs["library"]()]
    for label, tile, reduction, buffers, ws in one_pass_variants(d, variants):
        kernel = partial(onepass_dkdv_dq, tile=GluonTile(*tile), reduction=reduction, buffers=buffers, warp_specialised=ws)
        runs[label] = partial(flash_attention_backward, do, q, k, v, o, lse, atomic_dq=True, dkdv_kernel=kernel)
        row["err"][label] = max(agreement(g, w, f"{name}: one pass, {label}") for g, w in zip(runs[label](), want, strict=True))
        row["reduce_bytes"][label] = dq_reduce_bytes(b, h, 1, t, d, tile[0], tile[1])
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    cudnn = partial(sdpa, *leaves, SDPBackend.CUDNN_ATTENTION)
    rounds: dict[str, list[float]] = {label: [] for label in [*runs, "cudnn"]}
    for _ in range(GLUON_BWD_ROUNDS):
        for label, run in runs.items():
            rounds[label].append(measure.time_graph(run))
        both = pass_ms(cudnn, do, leaves)
        rounds["cudnn"].append(both["fwd_bwd_ms"] - both["fwd_ms"])
    row["rounds"] = rounds
    row["fastest"] = min(row["err"], key=lambda label: statistics.median(rounds[label]))
    return row


def reduce_rates() -> dict:
    """TB/s of the one-pass kernel's dQ adds alone (`gluon_onepass_backward.reduce_rate`: two programs of 4 warps
    an SM adding [64, 64] fp32 tiles), by TMA bulk reductions and by atomic adds, into an accumulator of each of
    REDUCE_HEADS heads of 16,384 x 64; each checked (every element gets the adds it should)."""
    from gluon_onepass_backward import reduce_rate

    rates = {}
    for reduction in ("tma", "atomic"):
        for heads in REDUCE_HEADS:
            tbps, right = reduce_rate(heads * 16384, reduction=reduction)
            if not right:
                raise RuntimeError(f"reduce_rate {reduction}, {heads} heads: some element got the wrong number of adds")
            rates[f"{reduction}, {heads} heads"] = tbps
    return rates


def _gluon_one_pass_line(r: dict) -> str:
    if "shape" not in r:
        return "dQ adds alone, TB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["reduce_tbps"].items())
    rounds, fastest = r["rounds"], r["fastest"]
    ms = {label: statistics.median(x) for label, x in rounds.items()}
    return (f"{r['shape']:<12} library {ms['library']:6.3f}  cuDNN {ms['cudnn']:6.3f}  one pass: "
            + " ".join(f"{label} {ms[label]:6.3f}" for label in r["err"])
            + f" | {fastest} x library {measure.paired_ratio(rounds['library'], rounds[fastest]):.3f}, x cuDNN "
            f"{measure.paired_ratio(rounds['cudnn'], rounds[fastest]):.3f}; its adds "
            f"{r['reduce_bytes'][fastest] / (ms[fastest] * 1e-3) / 1e12:.2f} TB/s")


FLEX_MODES = ("default", "max-autotune-no-cudagraphs")  # Inductor's default tiles; tiles it times on this card (graphs: ours)


def flex_row(name: str, dtype: torch.dtype) -> dict:
    """CUDA-graph ms of the causal forward and forward+backward at PASS_SHAPES[name]: ours, cuDNN's, and
    FlexAttention's (`bench.causal_block_mask`) compiled in each of FLEX_MODES, whose output is checked
    against ours; with each mode's compile seconds (autotuning times candidate tiles while it compiles)."""
    from torch.nn.attention.flex_attention import flex_attention

    from minigpt.bench import causal_block_mask

    b, h, hkv, t, d, model_layout = PASS_SHAPES[name]
    q, k, v, do = projection_views(b, h, hkv, t, d, dtype) if model_layout else make(b, h, t, d, dtype)
    with torch.no_grad():
        want = flash_attention_forward(q, k, v)[0].float()
    row: dict = {"shape": name, "batch": b, "heads": h, "kv_heads": hkv, "seq_len": t, "head_dim": d, "flex": {}}
    timed = partial(pass_ms, do=do, leaves=[q, k, v])
    row["ours"] = timed(partial(flash_attention, q, k, v))
    row["cudnn"] = timed(partial(sdpa, q, k, v, SDPBackend.CUDNN_ATTENTION))
    for mode in FLEX_MODES:  # each compiled, checked and timed before the next is compiled
        torch._dynamo.reset()
        start = time.time()
        compiled = torch.compile(flex_attention, dynamic=False, mode=None if mode == "default" else mode)
        flex = partial(compiled, q, k, v, block_mask=causal_block_mask(t, "cuda"), enable_gqa=h != hkv)
        with torch.no_grad():
            err = agreement(flex(), want, f"{name}: FlexAttention ({mode})")
        flex().backward(do)  # compiles (and autotunes) the backward too, before the clock is read
        row["flex"][mode] = {"compile_s": round(time.time() - start, 1), "max_rel_err": err} | timed(flex)
    return row


def narrow_heads(dtype: torch.dtype) -> list[dict]:
    """Forward+backward of `medium`'s attention (B=16, H=16, Hkv=4, T=1024, causal, D=40: q, k, v as views of
    [B, T, H, D] projections, as the model passes them), CUDA-graph ms: our kernel running the 40-wide head in a
    64-wide tile with masked loads (with and without the ALIGN stride hint), the same kernel on copies zero-padded to
    64 (F.pad, then the output sliced: what `flash_attention` did before), and SDPA's cuDNN and FA2 backends."""
    b, h, hkv, t, d = 16, 16, 4, 1024, 40
    q, k, v, do = projection_views(b, h, hkv, t, d, dtype)

    def padded():
        qp, kp, vp = (F.pad(x, (0, 64 - d)) for x in (q, k, v))
        flash_attention(qp, kp, vp, scale=d ** -0.5)[..., :d].backward(do)

    def sdpa_fwd_bwd(backend):
        return lambda: sdpa(q, k, v, backend).backward(do)

    def masked():
        flash_attention(q, k, v).backward(do)

    no_hint = mock.patch.object(fa, "_stride_align", lambda head_dim, *tensors: 1)  # every stride claimed unaligned
    variants: dict[str, tuple[Callable[[], None], AbstractContextManager]] = {
        "masked 64-wide tile, ALIGN hint": (masked, nullcontext()), "masked 64-wide tile, no hint": (masked, no_hint),
        "zero-padded copies (F.pad)": (padded, nullcontext()), "SDPA cuDNN": (sdpa_fwd_bwd(SDPBackend.CUDNN_ATTENTION), nullcontext()),
        "SDPA FA2": (sdpa_fwd_bwd(SDPBackend.FLASH_ATTENTION), nullcontext())}
    rows: list[dict] = []
    for name, (fn, context) in variants.items():
        try:
            with context:
                rows.append({"variant": name, "fwd_bwd_graph_ms": measure.time_graph(fn, grad_to_none=[q, k, v]),
                             "fwd_bwd_call_ms": measure.time_call(fn, grad_to_none=[q, k, v])})
        except RuntimeError as err:
            rows.append({"variant": name, "error": str(err).splitlines()[0][:200]})
    fl = 3.5 * measure.attention_flops(b, h, t, d, causal=True)
    for r in rows:
        r |= {"batch": b, "heads": h, "kv_heads": hkv, "seq_len": t, "head_dim": d}
        if "fwd_bwd_graph_ms" in r:
            r["tflops"] = fl / r["fwd_bwd_graph_ms"] * 1e-9
    return rows


def check_close(q, k, v, do, causal, config: FlashConfig) -> float:
    """Largest error of output and grads vs SDPA flash, relative to each tensor's max magnitude."""
    o, lse = flash_attention_forward(q, k, v, causal=causal, config=config)
    grads = flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=config)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o_ref = sdpa(qr, kr, vr, SDPBackend.FLASH_ATTENTION, causal)
    o_ref.backward(do)
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for a, b in zip((o, *grads), (o_ref, qr.grad, kr.grad, vr.grad), strict=True)
    )


def sweep(head_dim: int, kernels: list[str], dtype: torch.dtype, deadline: float) -> tuple[FlashConfig, list[dict]]:
    """Try tile configs at T=4096 causal, one kernel at a time; return the fastest and the log.

    Starts from `flash_config`'s choice; configs that give wrong results or do not fit in
    shared memory are skipped, and so is everything after `deadline` (time.time()).
    """
    seq_len = 4096
    q, k, v, do = make(TOKENS // seq_len, MODEL_DIM // head_dim, seq_len, head_dim, dtype)
    best = flash_config(head_dim, torch.cuda.get_device_capability(), False)
    log = []

    def bench(cfg: FlashConfig, kernel: str) -> float:
        """ms of the forward (kernel 'fwd') or of the whole backward (kernels 'dkdv', 'dq')."""
        if time.time() > deadline:
            return float("inf")
        try:
            err = check_close(q, k, v, do, True, cfg)
        except OutOfResources as e:  # tiles too large for this card's shared memory
            print(f"  D={head_dim} {kernel:4s} {tuple(getattr(cfg, kernel))} skipped: {e}", flush=True)
            return float("inf")
        if kernel == "fwd":
            ms = do_bench(lambda: flash_attention_forward(q, k, v, causal=True, config=cfg))
        else:
            o, lse = flash_attention_forward(q, k, v, causal=True, config=cfg)
            ms = do_bench(lambda: flash_attention_backward(do, q, k, v, o, lse, causal=True, config=cfg))
        ok = err < 3e-2
        config = {name: c._asdict() for name, c in cfg._asdict().items()}
        log.append({"head_dim": head_dim, "kernel": kernel, "config": config, "ms": ms, "max_rel_err": err, "ok": ok})
        print(f"  D={head_dim} {kernel:4s} {tuple(getattr(cfg, kernel))} {ms:.3f} ms err={err:.1e}"
              f"{'' if ok else ' WRONG'}", flush=True)
        return ms if ok else float("inf")

    options = {
        "fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 3)],
        "dkdv": [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (32, 128, 4, 3), (32, 64, 4, 3)],
        "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3)],
    }
    for kernel in kernels:
        opts = options[kernel]
        timed = [(bench(cfg, kernel), cfg) for cfg in (best._replace(**{kernel: BlockConfig(*o)}) for o in opts)]
        fastest_ms, fastest = min(timed, key=lambda x: x[0])
        if fastest_ms < float("inf"):
            best = fastest
    return best, log


def write_rows(out: Path | None, name: str, rows: list[dict], dtype: torch.dtype) -> None:
    """Write ``{"provenance", "dtype", "rows"}`` to out/<name>.json (nothing without --out)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"provenance": measure.provenance(), "dtype": str(dtype), "rows": rows},
                                                     indent=1))


def report(out: Path | None, name: str, rows: list[dict], dtype: torch.dtype, title: str,
           line: Callable[[dict], str]) -> None:
    """`write_rows`, then the run's table: the card and ``title``, and ``line(row)`` for each row."""
    write_rows(out, name, rows, dtype)
    print(f"\n{runtime.describe()}  {title}")
    for r in rows:
        print(line(r))


def _narrow_line(r: dict) -> str:
    return f"{r['variant']:34s} " + (f"graph {r['fwd_bwd_graph_ms']:6.3f} ms, per call {r['fwd_bwd_call_ms']:6.3f} ms, "
                                     f"{r['tflops']:4.0f} TFLOP/s (D=40 FLOPs)" if "tflops" in r else r["error"])


def _backward_line(r: dict) -> str:
    sdpa_bwd = [r.get(f"{x}_fwd_bwd_ms", float("nan")) - r.get(f"{x}_fwd_ms", float("nan")) for x in ("cudnn", "fa2")]
    line = (f"{r['shape']:<11}{r['fwd_ms']:7.3f}{r.get('cudnn_fwd_ms', float('nan')):7.3f} | "
            f"two-pass {r['bwd_ms']['two-pass']:6.3f} cuDNN {sdpa_bwd[0]:6.3f} FA2 {sdpa_bwd[1]:6.3f}")
    if "rounds" in r:
        fastest, rounds = r["fastest_one_pass"], r["rounds"]
        ratio = [measure.paired_ratio(rounds["cudnn"], rounds[label]) for label in ("two-pass", fastest)]
        line += f" | rounds x cuDNN: two-pass {ratio[0]:.3f}, {fastest} {ratio[1]:.3f}"
    return line


def _forward_line(r: dict) -> str:
    best, best_ms = min(r["fwd_ms"].items(), key=lambda x: x[1])
    return (f"{r['shape']:<11} default {r['fwd_ms'][str(r['default'])]:6.3f}  best {best:16s} {best_ms:6.3f}"
            f"  cuDNN {r['cudnn_fwd_ms']:6.3f} ({r['cudnn_fwd_ms'] / best_ms:.2f}x)")


def _tma_line(r: dict) -> str:
    timed = [e for e in r["tma"] if "ms" in e]
    line = f"{r['shape']:<12} ours {r['ours_ms']:6.3f}  cuDNN {r['cudnn_ms']:6.3f}"
    for ws in (False, True):
        best = min((e for e in timed if e["warp_specialize"] == ws), key=lambda e: e["ms"], default=None)
        line += f"  | ws={ws!s:5} " + (f"{best['ms']:6.3f} {best['tile']}" if best else "no variant compiled")
    return line


def _persistent_line(r: dict) -> str:
    line = f"{r['shape']:<12} ours {r['ours_ms']:6.3f}/{r['ours_ms_again']:6.3f}  cuDNN {r['cudnn_ms']:6.3f}"
    for per_sm in (1, 2, 4):
        best = min((e for e in r["persistent"] if e["per_sm"] == per_sm), key=lambda e: e["ms"], default=None)
        line += f"  | x{per_sm} " + (f"{best['ms']:6.3f} {best['tile'][:2]}" if best else "none ran")
    return line


def _poly_line(r: dict) -> str:
    return f"{r['shape']:<12} cuDNN {r['cudnn_ms']:6.3f}  " + "  ".join(
        f"{e['tile'][:2]} {e['ours_ms']:6.3f} -> {e['poly_ms']:6.3f}" for e in r["tiles"])


def _gemms_line(r: dict) -> str:
    best, bwd = min(r["tiles"], key=lambda e: e["gemms_ms"]), r["backward"]
    return (f"{r['shape']:<12} fwd: ours {r['ours_ms']:6.3f}  cuDNN {r['cudnn_ms']:6.3f}  GEMMs alone {best['gemms_ms']:6.3f} "
            f"{best['tile'][:3]} ({r['tflop'] / best['gemms_ms'] * 1e3:4.0f} TFLOP/s, {r['cudnn_ms'] / best['gemms_ms']:.2f}x cuDNN)"
            f"  | bwd: ours {bwd['ours_ms']:6.3f}  cuDNN {bwd['cudnn_ms']:6.3f}  GEMMs alone {bwd['gemms_ms']:6.3f}")


def _gluon_line(r: dict) -> str:
    line = f"{r['shape']:<12} ours {r['ours_ms']:6.3f}  cuDNN {r['cudnn_ms']:6.3f}"
    for schedule in ("overlap", "sequential", "warp-specialised", "cooperative", "ping-pong"):
        best = min((e for e in r["gluon"] if e["schedule"] == schedule), key=lambda e: e["ms"])
        line += f"  | {schedule} {best['ms']:6.3f} {tuple(best['tile'][:2])} ({r['cudnn_ms'] / best['ms']:.3f}x cuDNN)"
    rounds = r["rounds"]
    fastest = next(e for e in rounds["gluon"] if all(e[key] == r["fastest"][key] for key in r["fastest"]))
    paired = measure.paired_ratio(rounds["cudnn_ms"], fastest["ms"])
    line += (f"  | {len(fastest['ms'])} rounds, medians: {fastest['schedule']} {tuple(fastest['tile'][:2])} "
             f"{statistics.median(fastest['ms']):6.3f} ours {statistics.median(rounds['ours_ms']):6.3f} "
             f"cuDNN {statistics.median(rounds['cudnn_ms']):6.3f} ({paired:.3f}x cuDNN, paired)")
    fb = r["fwd_bwd_ms"]
    return line + f"  | fwd+bwd: ours {fb['ours']:6.3f} Gluon+ours {fb['gluon + ours']:6.3f} cuDNN {fb['cudnn']:6.3f}"


def _flex_line(r: dict) -> str:
    ours, cudnn = r["ours"], r["cudnn"]
    return f"{r['shape']:<12}" + "".join(
        f"  {p}: ours {ours[k]:6.3f} cuDNN {cudnn[k]:6.3f} " + " ".join(f"{m[:8]} {f[k]:6.3f}" for m, f in r["flex"].items())
        for p, k in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="try tile configs at T=4096 first")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds allowed for the sweep")
    parser.add_argument("--sweep-dims", type=int, nargs="+", default=[64, 128], choices=[64, 128],
                        help="head dims to sweep")
    parser.add_argument("--sweep-kernels", nargs="+", default=["fwd", "dkdv", "dq"], choices=["fwd", "dkdv", "dq"],
                        help="kernels to sweep, in this order")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128],
                        help="head dims of the table (other than 32/64/128: run masked in the next tile width)")
    parser.add_argument("--narrow", action="store_true", help="only medium's heads of 40: masked tile vs padded copies vs SDPA")
    parser.add_argument("--backward", action="store_true",
                        help="only the backward: dQ kernel vs atomic dQ vs another dK/dV tile, beside cuDNN and FA2")
    parser.add_argument("--forward", action="store_true", help="only the forward: tiles FWD_TILES beside cuDNN")
    parser.add_argument("--tma", action="store_true",
                        help="only the forward through TMA descriptors (sm_90+), tiles TMA_TILES with and without "
                             "warp specialisation, beside ours and cuDNN")
    parser.add_argument("--persistent", action="store_true",
                        help="only the forward on a persistent grid (1, 2, 4 programs per SM), beside ours and cuDNN")
    parser.add_argument("--exp2-poly", action="store_true",
                        help="only the forward with half its exponentials on the FMA pipes (a polynomial), beside ours")
    parser.add_argument("--flex", action="store_true",
                        help="only FlexAttention, compiled with Inductor's default tiles and autotuned, beside ours and cuDNN")
    parser.add_argument("--gemms-only", action="store_true",
                        help="only the matmuls of the forward (per tile) and the backward without the softmax, beside ours and cuDNN")
    parser.add_argument("--gluon-backward", action="store_true",
                        help="only the backward with the Gluon dK/dV and dQ kernels (sm_90) per tile (the dK/dV kernel also "
                             "under a register cap and warp-specialised) and together, beside ours and cuDNN, and "
                             "forward+backward with the Gluon forward")
    parser.add_argument("--gluon-one-pass", action="store_true",
                        help="only the backward in one pass in Gluon (sm_90; dQ added up by TMA reductions or atomics) "
                             "beside the library's two kernels and cuDNN's, at the head sizes of --dims, and the rate "
                             "of its adds alone (with every variant)")
    parser.add_argument("--variants", nargs="+", default=None, choices=[v[0] for v in GLUON_ONE_PASS], metavar="LABEL",
                        help="--gluon-one-pass: only these variants (labels of GLUON_ONE_PASS), no add-rate probe")
    parser.add_argument("--gluon", action="store_true",
                        help="only the forward in Gluon (sm_90): FlashAttention-3's overlap and the sequential schedule "
                             "per tile, the warp-specialised kernel, two consumer warpgroups without and with ping-pong, and "
                             "forward+backward with our backward, beside ours and cuDNN")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results JSON")
    parser.add_argument("--name", default="flash_attention", help="stem of the results file (<name>.json)")
    args = parser.parse_args()
    if args.variants is not None and not args.gluon_one_pass:
        parser.error("--variants picks --gluon-one-pass's variants: add --gluon-one-pass")
    if args.gluon_one_pass and not set(args.dims) <= {64, 128}:
        parser.error(f"--gluon-one-pass runs at heads of 64 and 128 (the Gluon kernels'); got --dims {args.dims}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_flash_attention.py needs a CUDA GPU; on CPU run the tests instead")
    dtype = runtime.dtype()
    print(runtime.describe(), flush=True)
    if args.narrow:
        return report(args.out, "flash_attention_narrow", narrow_heads(dtype), dtype,
                      "medium's attention, B16 H16 Hkv4 T1024 D40 causal, forward+backward", _narrow_line)
    if args.backward:
        return report(args.out, "flash_attention_one_pass", [backward_row(name, dtype) for name in PASS_SHAPES], dtype,
                      "causal backward, CUDA-graph ms (SDPA's backward = its fwd+bwd - fwd)\n"
                      f"{'shape':<11}{'fwd':>7}{'cuDNN':>7} | backward alone; cuDNN/ours, median of the rounds' paired ratios",
                      _backward_line)
    if args.forward:
        return report(args.out, "flash_attention_forward", [forward_row(name, dtype) for name in PASS_SHAPES], dtype,
                      "causal forward, CUDA-graph ms; best tile and cuDNN / best", _forward_line)
    if args.tma:
        if torch.cuda.get_device_capability() < (9, 0):
            raise SystemExit("--tma needs TMA tensor descriptors: compute capability 9.0 or newer (Hopper)")
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        return report(args.out, "flash_attention_tma", [tma_row(name, dtype) for name in TMA_SHAPES], dtype,
                      "causal forward, CUDA-graph ms: ours, cuDNN, TMA descriptors (best tile)", _tma_line)
    if args.persistent:
        return report(args.out, "flash_attention_persistent", [persistent_row(name, dtype) for name in TMA_SHAPES], dtype,
                      "causal forward, CUDA-graph ms: ours (twice), cuDNN, persistent grid (best tile)", _persistent_line)
    if args.exp2_poly:
        return report(args.out, "flash_attention_exp2_poly", [poly_row(name, dtype) for name in TMA_SHAPES], dtype,
                      "causal forward, CUDA-graph ms per tile: ours vs half the exp2 as a polynomial", _poly_line)
    if args.flex:
        rows = []
        for name in TMA_SHAPES:  # written after every shape: autotuning takes about a minute for each
            rows.append(flex_row(name, dtype))
            write_rows(args.out, "flash_attention_flex", rows, dtype)
        return report(args.out, "flash_attention_flex", rows, dtype,
                      "causal forward and forward+backward, CUDA-graph ms: ours, cuDNN, FlexAttention per compile mode",
                      _flex_line)
    if (args.gluon or args.gluon_backward or args.gluon_one_pass) and torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("--gluon, --gluon-backward and --gluon-one-pass run Hopper-only kernels (wgmma, TMA): "
                         "compute capability 9.x")
    if args.gluon:
        return report(args.out, "flash_attention_gluon", [gluon_row(name, dtype) for name in GLUON_SHAPES], dtype,
                      "causal forward, CUDA-graph ms: ours, cuDNN, Gluon (best tile of each schedule); forward+backward",
                      _gluon_line)
    if args.gluon_backward:
        return report(args.out, "flash_attention_gluon_backward", [gluon_backward_row(n, dtype) for n in GLUON_SHAPES],
                      dtype, "causal backward, CUDA-graph ms, medians of the rounds: ours, the fastest variant with "
                      "Gluon kernels, cuDNN's; paired ratios", _gluon_backward_line)
    if args.gluon_one_pass:
        variants = tuple(v for v in GLUON_ONE_PASS if args.variants is None or v[0] in args.variants)
        rows = [gluon_one_pass_row(n, dtype, variants) for n in GLUON_SHAPES if PASS_SHAPES[n][4] in args.dims]
        rows += [{"reduce_tbps": reduce_rates()}] if args.variants is None else []
        stem = "flash_attention_gluon_one_pass" + ("".join(f"_d{d}" for d in args.dims) if sorted(args.dims) != [64, 128] else "")
        return report(args.out, stem, rows, dtype, "causal backward, CUDA-graph ms, medians "
                      "of the rounds: the library's, cuDNN's, the one-pass variants; the fastest's paired ratios",
                      _gluon_one_pass_line)
    if args.gemms_only:
        return report(args.out, "flash_attention_gemms", [gemms_row(name, dtype) for name in GEMMS_SHAPES], dtype,
                      "causal forward and backward, CUDA-graph ms: ours, cuDNN, and our loops' matmuls alone",
                      _gemms_line)

    configs: dict[int, FlashConfig | None] = {d: None for d in args.sweep_dims}
    sweep_log = []
    if args.sweep:
        deadline = time.time() + args.budget
        for head_dim in args.sweep_dims:
            configs[head_dim], log = sweep(head_dim, args.sweep_kernels, dtype, deadline)
            sweep_log += log
            print(f"best D={head_dim}: {configs[head_dim]}", flush=True)

    rows = []
    for head_dim in args.dims:
        for seq_len in (1024, 2048, 4096, 8192):
            batch, heads = TOKENS // seq_len, MODEL_DIM // head_dim
            q, k, v, do = make(batch, heads, seq_len, head_dim, dtype)
            res = time_pair(q, k, v, do, True, configs.get(head_dim))
            fl = measure.attention_flops(batch, heads, seq_len, head_dim, causal=True)
            res |= {"batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim, "causal": True,
                    "ours_fwd_tflops": fl / res["ours_fwd_ms"] * 1e-9,
                    "ours_fwd_bwd_tflops": 3.5 * fl / res["ours_fwd_bwd_ms"] * 1e-9}
            rows.append(res)
            del q, k, v, do

    # Correctness of the public autograd path at one real size, against SDPA flash.
    q, k, v, do = make(2, 16, 2048, 128, dtype)
    flash_attention(q, k, v).backward(do)
    autograd_err = check_close(q, k, v, do, True, flash_config(128, torch.cuda.get_device_capability(), False))

    result = {"provenance": measure.provenance(), "dtype": str(dtype), "rows": rows, "sweep": sweep_log,
              "configs": {d: (c or flash_config(d, torch.cuda.get_device_capability(), False))._asdict()
                          for d, c in configs.items()},
              "autograd_max_rel_err": autograd_err}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{runtime.describe()}  causal, B*T={TOKENS}, H*D={MODEL_DIM}; ratio = SDPA ms / ours ms")
    print(f"{'D':>4} {'T':>5} | {'fwd ms':>7} {'sdpa':>7} {'ratio':>5} | {'f+b ms':>7} {'sdpa':>7} {'ratio':>5} "
          "| TFLOP/s f, f+b")
    for r in rows:
        print(f"{r['head_dim']:>4} {r['seq_len']:>5} | {r['ours_fwd_ms']:7.3f} {r['sdpa_fwd_ms']:7.3f} "
              f"{r['fwd_ratio']:5.2f} | {r['ours_fwd_bwd_ms']:7.3f} {r['sdpa_fwd_bwd_ms']:7.3f} "
              f"{r['fwd_bwd_ratio']:5.2f} | {r['ours_fwd_tflops']:4.0f} {r['ours_fwd_bwd_tflops']:4.0f}")
    print(f"autograd path max rel err vs SDPA (B2 H16 T2048 D128): {autograd_err:.1e}")


if __name__ == "__main__":
    main()
