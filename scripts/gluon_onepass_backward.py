"""The Gluon backward in one pass (cuDNN's and FlashAttention-2/3's design), for `gpu_flash_attention.py
--gluon-one-pass` to time beside the library's two kernels (`minigpt.kernels.gluon_attention`).

The library's backward recomputes P twice: its dK/dV kernel does four matmuls a tile (S^T, dP^T, dV, dK) and
its dQ kernel three (S, dP, dQ). This kernel is the dK/dV kernel with a fifth, dQ_i += dS_ij K_j, added into
an fp32 accumulator [B, H, T, D]: five matmuls a tile instead of seven, for the adds.

    S^T = K Q^T,  dP^T = V dO^T                (issued together)
    P^T = exp2(S^T * scale log2 e - LSE log2 e),  dS^T = P^T (dP^T - Delta)     (registers)
    dV += P^T dO,  dK += dS^T Q                 (A from registers, B the ring slot)
    dS^T -> shared memory;  dQ_part = dS K       (A: dS^T's tile read transposed, B: K's tile)
    DQ[the step's queries] += dQ_part           (TMA bulk reduction, or atomic adds)

The adds are the price. A step of BLOCK_N keys and BLOCK_M queries does 5 * 2 * BLOCK_N * BLOCK_M * D FLOPs
and adds 4 * BLOCK_M * D bytes: 2.5 * BLOCK_N FLOPs a byte, so at 450 TFLOP/s with 64 keys a program about
2.8 TB/s of fp32 adds land in L2. `reduce_rate` measures how fast they can. The bulk reduction
(PTX cp.reduce.async.bulk.tensor, one per [BLOCK_M, D] partial) reads it from a shared-memory tile, one of
DQ_BUFFERS so that a step need not wait for the last one's; Triton 3.6 builds that op but its Gluon has no
function for it (`_tma_reduce_add`). With 8 warps a program of 128 keys halves the adds a FLOP: each warpgroup holds 64
keys, and the dQ matmul's columns are split between the two, each reading all 128 keys of dS^T.

`_ws_onepass_kernel` is the 64-key kernel warp-specialised, FlashAttention-3's split: a load warp streams Q
and dO, one compute warpgroup runs the five matmuls, and a reduction warp hands each step's dQ tile to the
TMA unit, so that the compute warps neither issue copies nor wait for a reduction (heads of 64: at 128 its
registers spill).

On the H200 none of them beat the library's two kernels reliably: level at D=64 from 4096 keys, slower at
1024 keys and at D=128 (`gpu_flash_attention.py --gluon-one-pass`, chapter 11, "One pass, written out").

Limits: those of `gluon_attention.gluon_attention_dkdv`; the accumulator is the caller's, zeroed
(`flash_attention_backward(atomic_dq=True, dkdv_kernel=...)` zeroes it, then scales and casts it).
"""

from __future__ import annotations

import math

import torch
import triton
from gluon_ws_backward import _ws_dkdv_load
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from minigpt.kernels import gluon_attention as ga
from minigpt.kernels._launch import LOG2E

REDUCTIONS = ("atomic", "tma")


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """TMA bulk reduction: add the shared-memory tile src into the global block of tensor_desc at coord (PTX
    cp.reduce.async.bulk.tensor .add; waited for by `tma.store_wait`, as a TMA store). Triton 3.6 builds the op
    (`create_async_tma_reduce`, which its descriptor atomics lower to) but its Gluon exposes no function for it:
    this is `tma.async_copy_shared_to_global` with the reduction in place of the copy."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@triton.constexpr_function
def _dq_layout(num_warps, head_dim):
    """The dQ partial's accumulator [BLOCK_M, D]: each warpgroup a column block of D / (num_warps / 4)."""
    groups = num_warps // 4
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, groups], instr_shape=[16, head_dim // groups, 16])


@gluon.jit
def _onepass_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, DQ, LSE, DELTA, qk_scale, sm_scale,
                    seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    TMA_REDUCE: gl.constexpr, DQ_BUFFERS: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of BLOCK_N keys of one (batch, kv head), and their share of dQ added into DQ [B, H, T, D]
    fp32 (zeroed): by atomic adds through pointers, or (TMA_REDUCE) DQ is a descriptor of its [B * H * T, D]
    matrix in [BLOCK_M, D] blocks, and each step's partial goes through one of DQ_BUFFERS shared-memory tiles as
    a TMA bulk reduction. Grid (T / BLOCK_N, B * Hkv). The other arguments as `ga._gluon_attn_bwd_dkdv_kernel`'s."""
    b, h0, start_n, kv_at, q_at, do_at, m0, n_q, n_steps = ga._key_block(
        seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc, BLOCK_M, BLOCK_N)
    n_masked = (BLOCK_N + BLOCK_M - 1) // BLOCK_M

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], q_desc.dtype))
    if TMA_REDUCE:
        dq_tiles = gl.allocate_shared_memory(gl.float32, [DQ_BUFFERS, BLOCK_M, HEAD_DIM], DQ.layout)
    kv_bar, ready = ga._barriers(1, 1), ga._barriers(STAGES, 1)
    mbarrier.expect(kv_bar.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_at[0], kv_at[1]], kv_bar.index(0), k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_at[0], kv_at[1]], kv_bar.index(0), v_smem)
    for i in gl.static_range(STAGES):
        ga._load_q_do_block(q_desc, do_desc, ready, q_ring, do_ring, i, n_steps, n_q, m0, q_at, do_at, BLOCK_M, STAGES)

    s_layout: gl.constexpr = ga._mma_layout(num_warps, BLOCK_M)    # S^T, dP^T [BLOCK_N, BLOCK_M]
    acc_layout: gl.constexpr = ga._mma_layout(num_warps, HEAD_DIM)  # dK, dV [BLOCK_N, D]
    dq_layout: gl.constexpr = _dq_layout(num_warps, HEAD_DIM)       # a step's dQ [BLOCK_M, D]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
    dq_at = (gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))[:, None] * HEAD_DIM
             + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))[None, :])
    dk = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout))
    mbarrier.wait(kv_bar.index(0), 0)
    for step in range(n_steps):
        slot, j, rows, lse, delta = ga._step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0,
                                                     BLOCK_M, STAGES, s_layout)
        head_row = (b * n_heads + h0 + step // n_q) * seq_len
        dk, dv, ds_t = ga._dkdv_issue(k_smem, v_smem, q_ring.index(slot), do_ring.index(slot), dk, dv, s_zero, keys,
                                      rows, lse, delta, qk_scale, j < n_masked, a_layout)
        ds_smem.store(ds_t)
        fence_async_shared()
        ga._cta_barrier()                                           # every warpgroup's keys of dS^T are in
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
        if TMA_REDUCE:
            # the tile this step fills was last read by the reduction of step - DQ_BUFFERS: the issuing thread
            # waited for it at the end of the step before, ahead of that step's closing barrier
            dq_tile = dq_tiles.index(step % DQ_BUFFERS)
            dq_tile.store(dq)
            fence_async_shared()
            ga._cta_barrier()
            _tma_reduce_add(DQ, [head_row + (m0 + j) * BLOCK_M, 0], dq_tile)
            tma.store_wait(DQ_BUFFERS - 1)
        else:
            gl.atomic_add(DQ + (head_row + (m0 + j) * BLOCK_M).to(gl.int64) * HEAD_DIM + dq_at, dq, sem="relaxed")
        dk, dv = warpgroup_mma_init(dk), warpgroup_mma_init(dv)
        ga._cta_barrier()                                           # every warp is done with this slot and dS^T
        ga._load_q_do_block(q_desc, do_desc, ready, q_ring, do_ring, step + STAGES, n_steps, n_q, m0, q_at, do_at,
                            BLOCK_M, STAGES)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    if TMA_REDUCE:
        tma.store_wait(0)
    ga._cta_barrier()
    ga._store_dk_dv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, kv_at, sm_scale)


@gluon.jit
def _ws_consumer(k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE, DELTA, qk_scale,
                 sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, HEAD_DIM: gl.constexpr,
                 BLOCK_M: gl.constexpr, STAGES: gl.constexpr, DQ_BUFFERS: gl.constexpr, CONSUMER: gl.constexpr,
                 CONSUMERS: gl.constexpr):
    """A compute warpgroup of `_ws_onepass_kernel`, keys CONSUMER * 64 ... of the program's: `_onepass_kernel`'s
    step over the load warp's ring, the slot handed back (`empty`) once the step's matmuls are done. Its dS^T
    goes to this step's half of ds_smem (`ds_full` once every consumer's is in); the consumer whose turn it is
    (step % CONSUMERS) runs the step's dQ matmul over all of them, releases the half (`ds_free`) and leaves the
    partial in a tile for the reduction warp (`dq_full`) once that has released the tile (`dq_free`). Its
    barriers are mbarriers and two over its own 128 threads a step."""
    kv_bar, ready, empty, ds_full, ds_free, dq_full, dq_free = bars
    s_layout: gl.constexpr = ga._mma_layout(4, BLOCK_M)
    acc_layout: gl.constexpr = ga._mma_layout(4, HEAD_DIM)
    dq_layout: gl.constexpr = _dq_layout(4, HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    k_t, v_t = k_smem.index(CONSUMER), v_smem.index(CONSUMER)
    keys = start_n + CONSUMER * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=s_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
    dk = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    dv = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    n_masked = (64 * CONSUMERS + BLOCK_M - 1) // BLOCK_M
    mbarrier.wait(kv_bar.index(0), 0)
    for step in range(n_steps):
        slot, j, rows, lse, delta = ga._step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0,
                                                     BLOCK_M, STAGES, s_layout)
        dk, dv, ds_t = ga._dkdv_issue(k_t, v_t, q_ring.index(slot), do_ring.index(slot), dk, dv, s_zero, keys, rows,
                                      lse, delta, qk_scale, j < n_masked, a_layout)
        half = step % 2                                             # dS^T's buffer: the step before's may be in use
        mbarrier.wait(ds_free.index(half), ((step // 2) & 1) ^ 1)  # step - 2's dQ matmul has read it (first pass: free)
        ds_smem.index(half * CONSUMERS + CONSUMER).store(ds_t)
        fence_async_shared()
        ga._cta_barrier()                                           # this warpgroup's threads (a named barrier)
        mbarrier.arrive(ds_full.index(half), count=1)
        if step % CONSUMERS == CONSUMER:
            mbarrier.wait(ds_full.index(half), (step // 2) & 1)    # every consumer's keys of dS^T are in
            dq = warpgroup_mma(ds_smem.index(half * CONSUMERS).permute((1, 0)), k_smem.index(0), dq_zero,
                               use_acc=False, is_async=True)
            for c in gl.static_range(1, CONSUMERS):                 # dQ_part = sum over consumers of dS_c K_c
                dq = warpgroup_mma(ds_smem.index(half * CONSUMERS + c).permute((1, 0)), k_smem.index(c), dq,
                                   is_async=True)
            dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
            dk, dv = warpgroup_mma_init(dk), warpgroup_mma_init(dv)
            mbarrier.arrive(ds_free.index(half), count=1)
            mbarrier.arrive(empty.index(slot), count=1)
            tile = step % DQ_BUFFERS
            mbarrier.wait(dq_free.index(tile), ((step // DQ_BUFFERS) & 1) ^ 1)  # the first pass finds every tile free
            dq_tiles.index(tile).store(dq)
            fence_async_shared()
            ga._cta_barrier()
            mbarrier.arrive(dq_full.index(tile), count=1)
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            dk, dv = warpgroup_mma_init(dk), warpgroup_mma_init(dv)
            mbarrier.arrive(empty.index(slot), count=1)
    for step in range(gl.maximum(n_steps - 2, 0), n_steps):       # the last dQ matmuls (another consumer's too) read K
        mbarrier.wait(ds_free.index(step % 2), (step // 2) & 1)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    ga._store_dk_dv(dk, dv, k_t, v_t, dk_desc, dv_desc, (kv_at[0] + CONSUMER * 64, kv_at[1]), sm_scale)


@gluon.jit
def _ws_reducer(DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0, BLOCK_M: gl.constexpr,
                DQ_BUFFERS: gl.constexpr):
    """The reduction warp of `_ws_onepass_kernel`: each step's dQ tile, once a compute warpgroup has filled it,
    added into DQ by a TMA bulk reduction; a tile is released when its reduction has read it, with up to
    DQ_BUFFERS - 1 reductions in flight."""
    for step in range(n_steps):
        tile = step % DQ_BUFFERS
        mbarrier.wait(dq_full.index(tile), (step // DQ_BUFFERS) & 1)
        _tma_reduce_add(DQ, [(b * n_heads + h0 + step // n_q) * seq_len + (m0 + step % n_q) * BLOCK_M, 0],
                        dq_tiles.index(tile))
        tma.store_wait(DQ_BUFFERS - 1)                              # the reduction of step - DQ_BUFFERS + 1 has read its tile
        if step >= DQ_BUFFERS - 1:
            mbarrier.arrive(dq_free.index((step - DQ_BUFFERS + 1) % DQ_BUFFERS), count=1)
    tma.store_wait(0)


@gluon.jit
def _ws_onepass_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, DQ, LSE, DELTA, qk_scale, sm_scale,
                       seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                       DQ_BUFFERS: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       num_warps: gl.constexpr):
    """`_onepass_kernel` (TMA reductions) warp-specialised, FlashAttention-3's split: a load warp streams Q and dO
    (`gluon_ws_backward._ws_dkdv_load`), CONSUMERS compute warpgroups of 64 keys each run the five matmuls, and a
    reduction warp hands each step's dQ tile to the TMA unit, so that the compute warps neither issue copies nor
    wait for a reduction. A program has 64 * CONSUMERS keys: with two, each step's dQ partial sums 128 keys'
    dS K (the adds a FLOP halved), the two taking turns to compute it (`_ws_consumer`). Arguments as
    `_onepass_kernel`'s, DQ a descriptor; k_desc, v_desc, dk_desc, dv_desc in [64, D] blocks."""
    b, h0, start_n, kv_at, q_at, do_at, m0, n_q, n_steps = ga._key_block(
        seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc, BLOCK_M,
        64 * CONSUMERS)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [CONSUMERS, 64, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [CONSUMERS, 64, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * CONSUMERS, 64, BLOCK_M],   # [half, consumer] tiles
                                        gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], q_desc.dtype))
    dq_tiles = gl.allocate_shared_memory(gl.float32, [DQ_BUFFERS, BLOCK_M, HEAD_DIM], DQ.layout)
    kv_bar, ready, empty = ga._barriers(1, 1), ga._barriers(STAGES, 1), ga._barriers(STAGES, CONSUMERS)
    dq_full, dq_free = ga._barriers(DQ_BUFFERS, 1), ga._barriers(DQ_BUFFERS, 1)
    bars = (kv_bar, ready, empty, ga._barriers(2, CONSUMERS), ga._barriers(2, 1), dq_full, dq_free)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_ws_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE, DELTA,
                            qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, HEAD_DIM,
                            BLOCK_M, STAGES, DQ_BUFFERS, 0, 1)),
            (_ws_dkdv_load, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty,
                             kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M, STAGES, CONSUMERS)),
            (_ws_reducer, (DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0, BLOCK_M,
                           DQ_BUFFERS)),
        ], [1, 1], [24, 24])
    else:
        gl.warp_specialize([
            (_ws_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE, DELTA,
                            qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, HEAD_DIM,
                            BLOCK_M, STAGES, DQ_BUFFERS, 0, 2)),
            (_ws_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE, DELTA,
                            qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, HEAD_DIM,
                            BLOCK_M, STAGES, DQ_BUFFERS, 1, 2)),
            (_ws_dkdv_load, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty,
                             kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M, STAGES, CONSUMERS)),
            (_ws_reducer, (DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0, BLOCK_M,
                           DQ_BUFFERS)),
        ], [4, 1, 1], [CONSUMER_REGS, 24, 24])


ONE_PASS_TILE = ga.GluonTile(64, 64, 4, 2)  # 64 queries a step, 64 keys a program: the fastest (--gluon-one-pass)
def _ws_launch(tile: ga.GluonTile, buffers: int) -> tuple[dict, dict]:
    """`_ws_onepass_kernel`'s constexprs and launch options for `tile` (block_n / 64 compute warpgroups). One:
    128 registers a thread over its 8 warps (the compute warpgroup; the load and reduction warps padded to a
    warpgroup), so that two programs share an SM, the 1-warp partitions keeping 24 each and the compute
    warpgroup the rest (232). Two: the most one program of 12 warps a SM can have (64K / 384 -> 168), 240 for
    each compute warpgroup."""
    consumers = tile.block_n // 64
    maxnreg = 128 if consumers == 1 else 65536 // (32 * 12) // 8 * 8
    consumer_regs = (maxnreg * 32 * 12 - 24 * 128) // (32 * 8) // 8 * 8 if consumers == 2 else 0
    constants = {"BLOCK_M": tile.block_m, "STAGES": tile.stages, "DQ_BUFFERS": buffers, "CONSUMERS": consumers,
                 "CONSUMER_REGS": consumer_regs, "num_warps": 4}
    return constants, {"num_warps": 4, "maxnreg": maxnreg}


def onepass_dkdv_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                    delta: torch.Tensor, dq_acc: torch.Tensor, tile: ga.GluonTile = ONE_PASS_TILE,
                    reduction: str = "tma", buffers: int = 2, scale: float | None = None,
                    warp_specialised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV as `gluon_attention.gluon_attention_dkdv` returns them, and dS K (unscaled) added into dq_acc
    (fp32, contiguous, as many elements as q; zeroed by the caller) by `_onepass_kernel` at `tile` (block_m
    queries a step, block_n keys a program, block_n / 16 warps), by TMA bulk reductions through `buffers`
    shared-memory tiles or by atomic adds (`reduction`); or, warp_specialised, by `_ws_onepass_kernel` (TMA
    reductions, a compute warpgroup per 64 keys). scale as `gluon_attention_dkdv`'s. The signature `flash_attention_backward`
    calls a dkdv_kernel with under atomic_dq."""
    if reduction not in REDUCTIONS or buffers not in (1, 2, 3):
        raise ValueError(f"reduction {reduction!r}, buffers {buffers!r}: one of {REDUCTIONS}, and 1 to 3 tiles")
    if warp_specialised and (reduction != "tma" or tile.block_n not in (64, 128) or q.shape[-1] != 64):
        raise ValueError(f"the warp-specialised kernel runs heads of 64 (at 128 its registers spill), 64 or 128 keys "
                         f"a program (a compute warpgroup each 64) and TMA reductions; got D={q.shape[-1]}, {tile}, "
                         f"{reduction!r}")
    if dq_acc.numel() != q.numel() or dq_acc.dtype != torch.float32 or not dq_acc.is_contiguous():
        raise ValueError(f"dq_acc must be a contiguous fp32 tensor of q's {q.numel()} elements; got {dq_acc.dtype} "
                         f"{tuple(dq_acc.shape)}")
    do = ga._backward_operand(do, q, ga._unsupported_backward(q, k, v, tile))
    b, h, t, d = q.shape
    dk, dv = ga.output_like(k), ga.output_like(k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kv_rows = 64 if warp_specialised else tile.block_n  # the warp-specialised kernel's K, V tiles: a warpgroup's keys
    args = (ga._descriptor(ga._matrix(q), tile.block_m, d), ga._descriptor(ga._matrix(k), kv_rows, d),
            ga._descriptor(ga._matrix(v), kv_rows, d), ga._descriptor(ga._matrix(do), tile.block_m, d),
            ga._descriptor(ga._matrix(dk), kv_rows, d), ga._descriptor(ga._matrix(dv), kv_rows, d),
            _dq_descriptor(dq_acc, tile.block_m) if reduction == "tma" else dq_acc, lse, delta, LOG2E * scale, scale,
            t, h, h // k.shape[1], *ga._rows_at(q), *ga._rows_at(do), *ga._rows_at(k))
    grid = (t // tile.block_n, b * k.shape[1])
    if warp_specialised:
        constants, options = _ws_launch(tile, buffers)
        _ws_onepass_kernel[grid](*args, HEAD_DIM=d, **constants | options)
    else:
        _onepass_kernel[grid](*args, HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages,
                              TMA_REDUCE=reduction == "tma", DQ_BUFFERS=buffers, num_warps=tile.num_warps)
    return dk, dv


def _dq_descriptor(dq_acc: torch.Tensor, block_m: int):
    """Host TMA descriptor of dq_acc [B, H, T, D] fp32 as its [B * H * T, D] matrix in [block_m, D] blocks."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    d = dq_acc.shape[-1]
    return TensorDescriptor.from_tensor(dq_acc.view(-1, d), [block_m, d],
                                        gl.NVMMASharedLayout.get_default_for([block_m, d], gl.float32))


def compile_for_sm90(head_dim: int, tile: ga.GluonTile = ONE_PASS_TILE, reduction: str = "tma", buffers: int = 2,
                     warp_specialised: bool = False):
    """`_onepass_kernel` (or `_ws_onepass_kernel`) compiled for sm_90a without a GPU, as for a bf16 launch
    (`ga.ptxas_warnings` reads it)."""
    from triton.runtime.jit import mangle_type

    kv_ty = ga._mangled_descriptor(head_dim, 64 if warp_specialised else tile.block_n)
    dq_ty = mangle_type(_dq_descriptor(torch.zeros(1, 1, 512, head_dim), tile.block_m)) if reduction == "tma" else "*fp32"
    outputs = {"dk_desc": kv_ty, "dv_desc": kv_ty, "DQ": dq_ty}
    if warp_specialised:
        signature = ga.backward_signature(head_dim, tile.block_m, 64, outputs)
        constants, options = _ws_launch(tile, buffers)
        return ga.compile_sm90(_ws_onepass_kernel, signature, {"HEAD_DIM": head_dim} | constants, options)
    signature = ga.backward_signature(head_dim, tile.block_m, tile.block_n, outputs)
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
                 "TMA_REDUCE": reduction == "tma", "DQ_BUFFERS": buffers, "num_warps": tile.num_warps}
    return ga.compile_sm90(_onepass_kernel, signature, constants, {"num_warps": tile.num_warps})


@gluon.jit
def _reduce_rate_kernel(DQ, n_blocks, STEPS: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                        TMA_REDUCE: gl.constexpr, num_warps: gl.constexpr):
    """The one-pass kernel's adds alone: each program adds a [BLOCK_M, D] fp32 tile of ones into STEPS blocks of
    DQ's matrix, block (pid + s * programs) % n_blocks at step s, by TMA bulk reductions (at most four in
    flight) or atomic adds, as `_onepass_kernel` does with its partials."""
    layout: gl.constexpr = _dq_layout(num_warps, HEAD_DIM)
    ones = gl.full([BLOCK_M, HEAD_DIM], 1.0, gl.float32, layout=layout)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    if TMA_REDUCE:
        tile = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], DQ.layout)
        tile.store(ones)
        fence_async_shared()
        ga._cta_barrier()
        for s in range(STEPS):
            _tma_reduce_add(DQ, [((pid + s * programs) % n_blocks) * BLOCK_M, 0], tile)
            tma.store_wait(4)
        tma.store_wait(0)
    else:
        at = (gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))[:, None] * HEAD_DIM
              + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))[None, :])
        for s in range(STEPS):
            block = ((pid + s * programs) % n_blocks).to(gl.int64)
            gl.atomic_add(DQ + block * BLOCK_M * HEAD_DIM + at, ones, sem="relaxed")


def reduce_rate(rows: int, head_dim: int = 64, block_m: int = 64, steps: int = 256,
                reduction: str = "tma") -> tuple[float, bool]:
    """TB/s of fp32 adds into an accumulator [rows, head_dim] (sized to stay in L2 or not) by two programs of 4
    warps an SM (as the one-pass kernel runs at D=64), each adding `steps` tiles of ones [block_m, head_dim];
    and whether every element of each block holds the number of tiles added into that block."""
    from minigpt import measure
    from minigpt.kernels._launch import num_sms

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} unknown: one of {REDUCTIONS}")
    programs, blocks = 2 * num_sms(torch.device("cuda")), rows // block_m
    acc = torch.zeros(rows, head_dim, device="cuda", dtype=torch.float32)
    target = _dq_descriptor(acc, block_m) if reduction == "tma" else acc

    def run():
        _reduce_rate_kernel[(programs,)](target, blocks, STEPS=steps, BLOCK_M=block_m, HEAD_DIM=head_dim,
                                         TMA_REDUCE=reduction == "tma", num_warps=4)

    run()
    torch.cuda.synchronize()
    added = acc.view(blocks, -1)
    counts = torch.bincount(torch.arange(programs * steps, device="cuda") % blocks, minlength=blocks).float()
    right = bool(torch.equal(added, counts[:, None].expand_as(added)))
    return programs * steps * block_m * head_dim * 4 / (measure.time_graph(run) * 1e-3) / 1e12, right
