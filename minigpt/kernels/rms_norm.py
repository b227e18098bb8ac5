"""RMSNorm as a Triton kernel: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight.

Same math as `minigpt.norm.RMSNorm` (and Hugging Face Llama): statistics in fp32, the normalised
row cast back to x's dtype, then multiplied by the weight. The same two kernels also run the
residual add in front of a pre-norm (s = x + delta, then y = rms_norm(s)) and its gradient, so
that add costs no kernel of its own (`add_rms_norm_forward`, used by `minigpt.ops`). Layers,
bottom up: `_rms_norm_fwd_kernel` / `_rms_norm_bwd_kernel` + `_rms_norm_dw_kernel` (Triton) -> `add_rms_norm_forward` /
`add_rms_norm_backward` and `rms_norm_forward` / `rms_norm_backward` (launchers: checks, block
sizes, grid) -> `RMSNormFunction` (autograd) -> `rms_norm` (the function a model calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, as_rows, check_tensors, device_capability, launcher, num_sms

DW_BLOCK_R, DW_BLOCK_C = 256, 16  # `_rms_norm_dw_kernel`'s tile: 16 columns a program, 256 partial rows a step


@triton.jit
def _rms_norm_fwd_kernel(
    X, DELTA, S, W, Y, RSTD,
    n_rows, n_cols, stride_x, stride_d, stride_s, stride_y, eps,
    HAS_DELTA: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalise BLOCK_M rows of X [n_rows, n_cols]; one tile holds whole rows.

    With HAS_DELTA the rows normalised are s = x + delta, written to S: the residual add in front
    of a pre-norm happens here, so s goes to HBM once (it is the residual stream) and is
    normalised from registers, where an add kernel would write it and the norm read it back.

    Memory traffic per element: read x once, write y once (2 + 2 bytes in bf16), plus read delta
    and write s with HAS_DELTA; the weight (n_cols elements) stays in cache and rstd is one fp32
    per row, so the kernel is bound by HBM bandwidth and its ideal time is those bytes / copy
    bandwidth.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + rows64 * stride_d + cols[None, :], mask=mask, other=0.0)
        x = (x.to(ACC) + d.to(ACC)).to(S.dtype.element_ty)  # rounded as torch rounds x + delta
        tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(ACC)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + tl.cast(eps, ACC))  # eps: fp64 when Inductor launches
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC)
    normed = (xf * rstd[:, None]).to(x.dtype).to(ACC)
    y = normed * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DDELTA, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_x, stride_ds, stride_dx, stride_dd, rows_per_program,
    HAS_DS: tl.constexpr, HAS_DDELTA: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """dx for a contiguous range of rows, plus this program's partial weight gradient.

    With n = x * rstd:  dx = rstd * (dy*w - n * mean(dy*w * n)),  dw = sum_rows dy * n.
    Each program walks `rows_per_program` rows in tiles of BLOCK_M and accumulates its dw in
    registers, then writes one fp32 row of DW_PARTIAL [n_programs, n_cols]; the launcher sums
    those few rows. No atomics, so no contention however many rows there are.

    For a fused residual add (X holds s = x + delta, which also went on down the residual
    stream) HAS_DS adds that path's gradient ds to dx here instead of in an add kernel; dx is then
    the gradient of both x and delta, written a second time to DDELTA (HAS_DDELTA) when delta
    has another dtype (bf16 under autocast, beside an fp32 residual stream).

    Memory traffic per element: read x and dy, write dx (6 bytes in bf16), plus read ds and
    write ddelta when fused; rstd is re-read (4 bytes per row) instead of recomputed.
    NUM_STAGES > 1 software-pipelines the row loop: the loads of the next tiles are issued before
    this tile's reductions and stores, so a program never waits on HBM with nothing in flight.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        normed = x.to(ACC) * rstd[:, None]
        dn = dy * w[None, :]
        mean_dn_n = tl.sum(dn * normed, axis=1) / n_cols
        dx = (dn - normed * mean_dn_n[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DDELTA:
            tl.store(DDELTA + rows64 * stride_dd + cols[None, :], dx.to(DDELTA.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * normed.to(x.dtype).to(ACC), axis=0)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


@triton.jit
def _rms_norm_dw_kernel(DW_PARTIAL, DW, n_partial, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """DW [n_cols] = the column sums of DW_PARTIAL [n_partial, n_cols], cast to DW's dtype. Grid (ceil(n_cols / BLOCK_C),).

    The backward's second step: each program owns BLOCK_C columns and adds the partial rows in a
    fixed order (deterministic), in the partials' dtype (fp32, fp64 for fp64 inputs), rounding once.
    One launch where `partial.sum(0).to(w.dtype)` takes two (with both changes the whole RMSNorm
    fwd+bwd at 16384 x 384 went from 38.2 to 27.7 us on the H200, `results/kernels.json`).
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=DW_PARTIAL.dtype.element_ty)
    for start in tl.range(0, n_partial, BLOCK_R, num_stages=2):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < n_partial)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(DW_PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=col_mask)


def _blocks(n_cols: int) -> tuple[int, int, int]:
    """Forward tiles (BLOCK_M, BLOCK_N, num_warps): whole rows, about 2048 elements a tile, 2 to 16 warps.

    Measured on the H200 (`scripts/gpu_kernel_sweep.py`, rows 16384): every configuration with at
    least ~2048 elements a tile and 16-32 of them a thread is within ~2% of the best at
    D = 384...8192; bigger tiles on few warps spill, and one 384-wide row per program idles the SM.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, 2048 // block_n)
    return block_m, block_n, min(16, max(2, block_m * block_n // 1024))


def _bwd_tiles(n_rows: int, n_cols: int, device: torch.device, elt: int = 2) -> tuple[int, int, int, int, int]:
    """Backward tiles (BLOCK_M, BLOCK_N, num_warps, rows_per_program, num_stages) for ``elt``-byte rows.

    Each program writes one fp32 row of partial dw, so n_programs * D * 8 bytes (written, then
    summed) ride on the 6 bytes per element of x, dy and dx: 32 rows a program keep that under 5%.
    Narrow rows (D < 4096) take the forward's small tiles and 32 rows a program; wide rows take
    tiles of 8192 elements (one row, if wider) on 16 warps and one program per SM. The row loop is pipelined 3 deep
    (sm_80+: asynchronous copies) when three stages of its loads (x, dy and the fused path's ds)
    fit in shared memory. Measured on the H200 (`scripts/gpu_kernel_sweep.py`,
    `results/kernel_sweep.json`, rows 16384, dw summed by `_rms_norm_dw_kernel` throughout): at
    D = 384, 16 rows a program unpipelined took 25.2 us, 32 rows pipelined 19.9; at D = 8192 the
    16384-element tiles unpipelined 243.6 us, 8192-element tiles pipelined 210.7.
    """
    block_n = triton.next_power_of_2(n_cols)
    if block_n >= 4096:
        block_m, num_warps = max(1, 8192 // block_n), 16
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, num_sms(device)), block_m) * block_m
    else:
        block_m, _, num_warps = _blocks(n_cols)
        rows_per_program = triton.cdiv(32, block_m) * block_m
    cap = device_capability(device)
    smem = 160 * 1024 if cap in ((8, 0), (9, 0)) else 64 * 1024  # A100/H100/H200 and the rest of sm_8x+
    stage_bytes = 3 * block_m * block_n * elt
    num_stages = 3 if cap is not None and cap >= (8, 0) and 3 * stage_bytes <= smem else 1
    return block_m, block_n, num_warps, rows_per_program, num_stages


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_tensors("rms_norm", x=x, weight=weight)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [D] = [{x.shape[-1]}] to match x's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be > 0 (it keeps rsqrt finite on zero rows), got {eps}")


def _check_delta(x: torch.Tensor, delta: torch.Tensor) -> None:
    check_tensors("add_rms_norm", x=x, delta=delta)
    if delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on x [N, D] (unit column stride): y [N, D] and rstd [N]."""
    _, y, rstd = add_rms_norm_forward(x, None, weight, eps)
    return y, rstd


def add_rms_norm_forward(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it in one kernel, on rows x, delta [N, D] (unit column stride).

    Returns s = x + delta [N, D] (None when delta is None: s is x), y = rms_norm(s) [N, D] in
    `out_dtype` (default: the dtype of ``s * weight``) and rstd [N].
    """
    n_rows, n_cols = x.shape
    s_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    s = None if delta is None else x.new_empty((n_rows, n_cols), dtype=s_dtype)
    y = x.new_empty((n_rows, n_cols), dtype=out_dtype or torch.promote_types(s_dtype, weight.dtype))
    acc = acc_dtype(x)
    rstd = torch.empty(n_rows, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=x.device)
    if n_rows == 0:
        return s, y, rstd
    d, out = (x, x) if delta is None or s is None else (delta, s)  # unread, unwritten without HAS_DELTA
    block_m, block_n, num_warps = _blocks(n_cols)
    launcher(_rms_norm_fwd_kernel, x)[(triton.cdiv(n_rows, block_m),)](
        x, d, out, weight, y, rstd, n_rows, n_cols, x.stride(0), d.stride(0), out.stride(0), y.stride(0), eps,
        HAS_DELTA=delta is not None, ACC=acc, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return s, y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: dx [N, D] in x's dtype, dweight [D] in weight's dtype."""
    dx, _, dw = add_rms_norm_backward(dy, None, x, weight, rstd)
    return dx, dw


def add_rms_norm_backward(
    dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    x_dtype: torch.dtype | None = None, delta_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Backward of `add_rms_norm_forward` on rows [N, D]: (dx, ddelta, dweight).

    dx = rms_norm's input gradient + ds (the gradient of s along the residual stream, when given),
    in `x_dtype` (default s's dtype); it is delta's gradient too, returned again as ddelta only
    when `delta_dtype` differs (None otherwise: use dx). dweight comes in weight's dtype.
    """
    n_rows, n_cols = s.shape
    dx = torch.empty((n_rows, n_cols), dtype=x_dtype or s.dtype, device=s.device)
    split = delta_dtype is not None and delta_dtype != dx.dtype
    ddelta = torch.empty((n_rows, n_cols), dtype=delta_dtype, device=s.device) if split else None
    if n_rows == 0:
        return dx, ddelta, torch.zeros_like(weight)
    block_m, block_n, num_warps, rows_per_program, num_stages = _bwd_tiles(n_rows, n_cols, s.device, s.element_size())
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((n_programs, n_cols), dtype=rstd.dtype, device=s.device)  # [n_programs, D]
    ds_, dd = (dx if ds is None else ds), (dx if ddelta is None else ddelta)  # unread, unwritten without the flags
    launcher(_rms_norm_bwd_kernel, s)[(n_programs,)](
        dy, s, weight, rstd, ds_, dx, dd, dw_partial,
        n_rows, n_cols, dy.stride(0), s.stride(0), ds_.stride(0), dx.stride(0), dd.stride(0), rows_per_program,
        HAS_DS=ds is not None, HAS_DDELTA=ddelta is not None,
        ACC=acc_dtype(s), BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=num_stages, num_warps=num_warps,
    )
    dw = torch.empty_like(weight)
    launcher(_rms_norm_dw_kernel, s)[(triton.cdiv(n_cols, DW_BLOCK_C),)](
        dw_partial, dw, n_programs, n_cols, BLOCK_R=DW_BLOCK_R, BLOCK_C=DW_BLOCK_C, num_warps=8,
    )
    return dx, ddelta, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and the per-row rstd; backward: one fused kernel for dx, one to sum dw."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = as_rows(x, x.shape[-1])
        y, rstd = rms_norm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(as_rows(dy, rows.shape[1]), rows, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., D] with weight [D]; returns [..., D].

    Any D (rows are masked to the next power of two). The output dtype is that of
    ``x * weight`` (x's dtype when the weight matches it), as in `minigpt.norm.RMSNorm`.
    """
    _check(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
