"""The Gluon backward in one pass (cuDNN's and FlashAttention-2/3's design) in the variants the library does not
run, for `gpu_flash_attention.py --gluon-one-pass` to time beside the library's kernels
(`minigpt.kernels.gluon_attention`, whose `backward_plan` runs the one pass warp-specialised on two compute
warpgroups at heads of 64 from 4,096 keys, `_gluon_attn_bwd_onepass_kernel`, and its dK/dV and dQ kernels
elsewhere).

The two-kernel backward recomputes P twice: the dK/dV kernel does four matmuls a tile (S^T, dP^T, dV, dK) and
the dQ kernel three (S, dP, dQ). `_onepass_kernel` is the dK/dV kernel with a fifth, dQ_i += dS_ij K_j, added
into an fp32 accumulator [B, H, T, D]: five matmuls a tile instead of seven, for the adds.

    S^T = K Q^T,  dP^T = V dO^T                (issued together)
    P^T = exp2(S^T * scale log2 e - LSE log2 e),  dS^T = P^T (dP^T - Delta)     (registers)
    dV += P^T dO,  dK += dS^T Q                 (A from registers, B the ring slot)
    dS^T -> shared memory;  dQ_part = dS K       (A: dS^T's tile read transposed, B: K's tile)
    DQ[the step's queries] += dQ_part           (TMA bulk reduction, or atomic adds)

The adds are the price. A step of BLOCK_N keys and BLOCK_M queries does 5 * 2 * BLOCK_N * BLOCK_M * D FLOPs
and adds 4 * BLOCK_M * D bytes: 2.5 * BLOCK_N FLOPs a byte, so at 450 TFLOP/s with 64 keys a program about
2.8 TB/s of fp32 adds land in L2. `reduce_rate` measures how fast they can. The bulk reduction
(PTX cp.reduce.async.bulk.tensor, one per [BLOCK_M, D] partial, `gluon_attention._tma_reduce_add`) reads it
from a shared-memory tile, one of DQ_BUFFERS so that a step need not wait for the last one's. With 8 warps a
program of 128 keys halves the adds a FLOP: each warpgroup holds 64 keys, and the dQ matmul's columns are
split between the two, each reading all 128 keys of dS^T; every warp waits at barriers across the program.

`onepass_dkdv_dq` runs these and, warp_specialised, the library's kernel, with one compute warpgroup (64 keys
a program, two programs an SM) or two (128).

Limits: those of `gluon_attention.gluon_attention_dkdv`; the accumulator is the caller's, zeroed
(`flash_attention_backward(atomic_dq=True, dkdv_kernel=...)` zeroes it, then scales and casts it).
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
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
    dq_layout: gl.constexpr = ga._dq_layout(num_warps, HEAD_DIM)       # a step's dQ [BLOCK_M, D]
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
            ga._tma_reduce_add(DQ, [head_row + (m0 + j) * BLOCK_M, 0], dq_tile)
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


PLAIN_TILE = ga.GluonTile(64, 64, 4, 2)  # `_onepass_kernel`: 64 queries a step, 64 keys a program (its fastest)


def onepass_dkdv_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                    delta: torch.Tensor, dq_acc: torch.Tensor, tile: ga.GluonTile = PLAIN_TILE,
                    reduction: str = "tma", buffers: int = 2, scale: float | None = None,
                    warp_specialised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV as `gluon_attention.gluon_attention_dkdv` returns them, and dS K (unscaled) added into dq_acc
    (fp32, contiguous, as many elements as q; zeroed by the caller) by `_onepass_kernel` at `tile` (block_m
    queries a step, block_n keys a program, block_n / 16 warps), by TMA bulk reductions through `buffers`
    shared-memory tiles or by atomic adds (`reduction`); or, warp_specialised, by the library's kernel
    (`gluon_attention.gluon_attention_dkdv_dq`: TMA reductions, a compute warpgroup per 64 keys). scale as
    `gluon_attention_dkdv`'s. The signature `flash_attention_backward` calls a dkdv_kernel with under atomic_dq."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} unknown: one of {REDUCTIONS}")
    if warp_specialised:
        if reduction != "tma":
            raise ValueError("the warp-specialised kernel adds dQ up by TMA reductions only: reduction='tma'")
        return ga.gluon_attention_dkdv_dq(q, k, v, do, lse, delta, dq_acc, tile, scale, buffers)
    problem = ga._unsupported_accumulator(q, dq_acc, buffers)
    if problem is not None:
        raise ValueError(problem)
    do = ga._backward_operand(do, q, ga._unsupported_backward(q, k, v, tile))
    b, h, t, d = q.shape
    dk, dv = ga.output_like(k), ga.output_like(k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _onepass_kernel[(t // tile.block_n, b * k.shape[1])](
        ga._descriptor(ga._matrix(q), tile.block_m, d), ga._descriptor(ga._matrix(k), tile.block_n, d),
        ga._descriptor(ga._matrix(v), tile.block_n, d), ga._descriptor(ga._matrix(do), tile.block_m, d),
        ga._descriptor(ga._matrix(dk), tile.block_n, d), ga._descriptor(ga._matrix(dv), tile.block_n, d),
        ga._dq_descriptor(dq_acc, tile.block_m) if reduction == "tma" else dq_acc, lse, delta, LOG2E * scale, scale,
        t, h, h // k.shape[1], *ga._rows_at(q), *ga._rows_at(do), *ga._rows_at(k),
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages, TMA_REDUCE=reduction == "tma",
        DQ_BUFFERS=buffers, num_warps=tile.num_warps)
    return dk, dv


def compile_for_sm90(head_dim: int, tile: ga.GluonTile = PLAIN_TILE, reduction: str = "tma", buffers: int = 2,
                     warp_specialised: bool = False):
    """`_onepass_kernel` (or, warp_specialised, the library's one-pass kernel with two dQ tiles) compiled for
    sm_90a without a GPU, as for a bf16 launch (`ga.ptxas_warnings` reads it)."""
    if warp_specialised:
        return ga.compile_backward_for_sm90(head_dim, tile, "one-pass")
    kv_ty = ga._mangled_descriptor(head_dim, tile.block_n)
    dq_ty = ga._mangled_dq_descriptor(head_dim, tile.block_m) if reduction == "tma" else "*fp32"
    signature = ga.backward_signature(head_dim, tile.block_m, tile.block_n, {"dk_desc": kv_ty, "dv_desc": kv_ty, "DQ": dq_ty})
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
                 "TMA_REDUCE": reduction == "tma", "DQ_BUFFERS": buffers, "num_warps": tile.num_warps}
    return ga.compile_sm90(_onepass_kernel, signature, constants, {"num_warps": tile.num_warps})


@gluon.jit
def _reduce_rate_kernel(DQ, n_blocks, STEPS: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                        TMA_REDUCE: gl.constexpr, num_warps: gl.constexpr):
    """The one-pass kernel's adds alone: each program adds a [BLOCK_M, D] fp32 tile of ones into STEPS blocks of
    DQ's matrix, block (pid + s * programs) % n_blocks at step s, by TMA bulk reductions (at most four in
    flight) or atomic adds, as `_onepass_kernel` does with its partials."""
    layout: gl.constexpr = ga._dq_layout(num_warps, HEAD_DIM)
    ones = gl.full([BLOCK_M, HEAD_DIM], 1.0, gl.float32, layout=layout)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    if TMA_REDUCE:
        tile = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], DQ.layout)
        tile.store(ones)
        fence_async_shared()
        ga._cta_barrier()
        for s in range(STEPS):
            ga._tma_reduce_add(DQ, [((pid + s * programs) % n_blocks) * BLOCK_M, 0], tile)
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
    target = ga._dq_descriptor(acc, block_m) if reduction == "tma" else acc

    def run():
        _reduce_rate_kernel[(programs,)](target, blocks, STEPS=steps, BLOCK_M=block_m, HEAD_DIM=head_dim,
                                         TMA_REDUCE=reduction == "tma", num_warps=4)

    run()
    torch.cuda.synchronize()
    added = acc.view(blocks, -1)
    counts = torch.bincount(torch.arange(programs * steps, device="cuda") % blocks, minlength=blocks).float()
    right = bool(torch.equal(added, counts[:, None].expand_as(added)))
    return programs * steps * block_m * head_dim * 4 / (measure.time_graph(run) * 1e-3) / 1e12, right
