"""The Gluon dK/dV kernel warp-specialised, for `gpu_flash_attention.py --gluon-backward` to time beside the
library's (`minigpt.kernels.gluon_attention._gluon_attn_bwd_dkdv_kernel`).

The forward caught cuDNN's when one program got two consumer warpgroups fed by a load warp (appendix 11c,
"Written out"). This is that layout for the dK/dV kernel: a program owns a block of 128 keys,
each of two consumer warpgroups keeps 64 of them (their K and V in shared memory, their dK and dV
accumulators in registers), and a load warp streams the Q and dO tiles, which both consumers need, through
a ring of STAGES slots. A slot is `ready` when its two TMA copies land and `empty` when both consumers have
arrived on it. Each consumer's step is the library kernel's:

    S^T = K Q^T,  dP^T = V dO^T                (issued together)
    P^T = exp2(S^T * scale log2 e - LSE log2 e),  dS^T = P^T (dP^T - Delta)     (registers)
    dV += P^T dO,  dK += dS^T Q                 (A from registers, B the ring slot)

Against the library kernel's 64-key programs (two to an SM at D=128, three at D=64 with a register cap) it
reads each Q and dO tile once for 128 keys instead of once for 64, and it issues no copy from the compute
warps. The launch takes 168 registers a thread over 12 warps (one program a SM): 240 for each consumer, 24
for the load warp. Limits: T a multiple of 128, and what `gluon_attention_dkdv` checks.
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
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from minigpt.kernels import gluon_attention as ga
from minigpt.kernels._launch import LOG2E

BLOCK_N = 128  # keys a program: 64 a consumer
WARPS = 12  # the default consumer (4), the second consumer (4), the load warp padded to a warpgroup (4)
LOAD_REGS = gl.constexpr(24)  # registers a thread of the load warp (`ga.consumer_registers` counts on 24)


@gluon.jit
def _ws_dkdv_consumer(dk_desc, dv_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty, LSE, DELTA, qk_scale,
                      sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, n_masked,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER: gl.constexpr):
    """Consumer CONSUMER's 64 keys of the block: the library kernel's step over the ring's tiles, then dK and
    dV written through its own half of K's and V's shared memory (no barrier across the program). The step is
    the library kernel's (`gluon_attention._dkdv_step`)."""
    s_layout: gl.constexpr = ga._mma_layout(4, BLOCK_M)
    acc_layout: gl.constexpr = ga._mma_layout(4, HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    k_t = k_smem.index(CONSUMER)
    v_t = v_smem.index(CONSUMER)
    keys = start_n + CONSUMER * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=s_layout)
    dk = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    dv = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    mbarrier.wait(kv_bar.index(0), 0)
    for step in range(n_steps):
        slot, j, rows, lse, delta = ga._step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0,
                                                     BLOCK_M, STAGES, s_layout)
        dk, dv = ga._dkdv_step(k_t, v_t, q_ring.index(slot), do_ring.index(slot), dk, dv, s_zero, keys, rows, lse,
                               delta, qk_scale, j < n_masked, a_layout)
        mbarrier.arrive(empty.index(slot), count=1)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    k_t.store((dk * sm_scale).to(k_t.dtype))
    v_t.store(dv.to(v_t.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [kv_at[0] + CONSUMER * 64, kv_at[1]], k_t)
    tma.async_copy_shared_to_global(dv_desc, [kv_at[0] + CONSUMER * 64, kv_at[1]], v_t)
    tma.store_wait(0)


@gluon.jit
def _ws_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, qk_scale, sm_scale,
                    seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of 128 keys of one (batch, kv head); grid (T / 128, B * Hkv). Arguments as the library
    kernel's (`_gluon_attn_bwd_dkdv_kernel`), k_desc, v_desc, dk_desc, dv_desc in [64, D] blocks."""
    b, h0, start_n, kv_at, q_at, do_at, m0, n_q, n_steps = ga._key_block(
        seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc, BLOCK_M, 128)
    n_masked = (128 + BLOCK_M - 1) // BLOCK_M
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, 64, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, 64, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    kv_bar, ready, empty = ga._barriers(1, 1), ga._barriers(STAGES, 1), ga._barriers(STAGES, 2)
    gl.warp_specialize([
        (_ws_dkdv_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty, LSE, DELTA,
                             qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, n_masked,
                             HEAD_DIM, BLOCK_M, STAGES, 0)),
        (_ws_dkdv_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty, LSE, DELTA,
                             qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0, n_masked,
                             HEAD_DIM, BLOCK_M, STAGES, 1)),
        (ga._bwd_load_partition, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready,
                                  empty, kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def _registers() -> tuple[int, int]:
    """(maxnreg, a consumer's registers): `ga.consumer_registers` of WARPS warps, two consumers of 4 (168, 240)."""
    return ga.consumer_registers(WARPS, 8)


def ws_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
            delta: torch.Tensor, block_m: int = 64, stages: int = 2,
            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV as `gluon_attention.gluon_attention_dkdv` returns them, by `_ws_dkdv_kernel`: block_m queries a
    step, `stages` ring slots, 128 keys a program."""
    do = ga._backward_operand(do, q, ga._unsupported_backward(q, k, v, ga.GluonTile(block_m, BLOCK_N, 8, stages)))
    b, h, t, d = q.shape
    dk, dv = ga.output_like(k), ga.output_like(k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    maxnreg, consumer_regs = _registers()
    _ws_dkdv_kernel[(t // BLOCK_N, b * k.shape[1])](
        ga._descriptor(ga._matrix(q), block_m, d), ga._descriptor(ga._matrix(k), 64, d),
        ga._descriptor(ga._matrix(v), 64, d), ga._descriptor(ga._matrix(do), block_m, d),
        ga._descriptor(ga._matrix(dk), 64, d), ga._descriptor(ga._matrix(dv), 64, d),
        lse, delta, LOG2E * scale, scale, t, h, h // k.shape[1], *ga._rows_at(q), *ga._rows_at(do), *ga._rows_at(k),
        HEAD_DIM=d, BLOCK_M=block_m, STAGES=stages, CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=maxnreg)
    return dk, dv


def compile_for_sm90(head_dim: int, block_m: int = 64, stages: int = 2):
    """`_ws_dkdv_kernel` compiled for sm_90a without a GPU, as for a bf16 launch (`ga.ptxas_warnings` reads it)."""
    kv_ty = ga._mangled_descriptor(head_dim, 64)
    maxnreg, consumer_regs = _registers()
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "STAGES": stages, "CONSUMER_REGS": consumer_regs, "num_warps": 4}
    return ga.compile_sm90(_ws_dkdv_kernel, ga.backward_signature(head_dim, block_m, 64, {"dk_desc": kv_ty, "dv_desc": kv_ty}),
                           constants, {"num_warps": 4, "maxnreg": maxnreg})
