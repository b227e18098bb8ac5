"""Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy, fused linear CE) vs float64 references.

On CPU the kernels run in Triton's interpreter at small odd sizes in fp32/fp16 (the interpreter's
bf16 arithmetic is wrong) plus gradcheck in fp64. With CUDA the same tests also run at real sizes
in bf16/fp16. Errors are measured as max |got - ref| relative to max |ref|.
"""

import pytest
import torch
import torch.nn.functional as F
import triton

from minigpt.kernels import _launch
from minigpt.kernels import rms_norm as rms_kernels
from minigpt.kernels.cross_entropy import MAX_BLOCK, cross_entropy
from minigpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from minigpt.kernels.rms_norm import rms_norm
from minigpt.kernels.rope import apply_rope, apply_rope_qk
from minigpt.kernels.swiglu import swiglu
from minigpt.norm import rms_norm_reference
from minigpt.rope import apply_rope as apply_rope_reference
from minigpt.rope import rope_cache

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def sizes(cpu: list, gpu: list) -> list:
    """Small odd sizes everywhere; real ones added when a GPU is present."""
    return cpu + (gpu if CUDA else [])


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = (got.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item() + 1e-12, f"max error {err:.3e} vs scale {ref.abs().max().item():.3e}"


def grads_of(fn, inputs, dy):
    """(output, grads) of fn on detached copies of inputs, backpropagating dy."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out, [x.grad for x in leaves]


# ----------------------------------------------------------------------------------- RMSNorm
def rms_norm_f64(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sizes([(7, 100), (3, 5, 33), (2, 3)], [(4096, 4096), (4099, 3000), (64, 8192)]))
def test_rms_norm_matches_float64(shape, dtype):
    x, w, dy = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype, seed=1) + 1, rand(*shape, dtype=dtype, seed=2)
    y, (dx, dw) = grads_of(lambda a, b: rms_norm(a, b, 1e-6), (x, w), dy)
    y_ref, (dx_ref, dw_ref) = grads_of(lambda a, b: rms_norm_f64(a, b, 1e-6), (x.double(), w.double()), dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    assert_close(dw, dw_ref, dtype)


def test_rms_norm_equals_library_reference():
    """Same rounding order as minigpt.norm (normalise, cast to x.dtype, then scale by weight)."""
    x, w = rand(5, 48, dtype=torch.float16, scale=3), rand(48, dtype=torch.float16, seed=1)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), atol=2e-3, rtol=2e-3)


def test_rms_norm_mixed_dtype_weight_promotes_like_torch():
    x, w = rand(4, 40, dtype=torch.float16), rand(40, seed=1)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_many_rows_weight_gradient():
    """More rows than backward programs: partial dw rows must all be summed."""
    x, w, dy = rand(300, 24), rand(24, seed=1), rand(300, 24, seed=2)
    _, (_, dw) = grads_of(rms_norm, (x, w), dy)
    _, (_, dw_ref) = grads_of(lambda a, b: rms_norm_f64(a, b, 1e-6), (x.double(), w.double()), dy.double())
    assert_close(dw, dw_ref, torch.float32)


@pytest.mark.parametrize("n_partial, n_cols, out_dtype", [(600, 37, torch.float32), (257, 16, torch.float16), (3, 5, torch.float64)])
def test_rms_norm_dw_kernel_sums_every_partial_row(n_partial, n_cols, out_dtype):
    """The backward's dw step alone: more partial rows than one BLOCK_R step, columns not a multiple
    of BLOCK_C, summed in the partials' dtype and rounded once to the weight's."""
    part = rand(n_partial, n_cols, dtype=torch.float64 if out_dtype == torch.float64 else torch.float32)
    dw = torch.full((n_cols,), float("nan"), dtype=out_dtype, device=DEVICE)
    grid = (triton.cdiv(n_cols, rms_kernels.DW_BLOCK_C),)
    rms_kernels._rms_norm_dw_kernel[grid](part, dw, n_partial, n_cols,
                                          BLOCK_R=rms_kernels.DW_BLOCK_R, BLOCK_C=rms_kernels.DW_BLOCK_C)
    torch.testing.assert_close(dw, part.double().sum(0).to(out_dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_rms_norm_gradcheck():
    x, w = rand(3, 2, 13, dtype=torch.float64), rand(13, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x.requires_grad_(), w.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs, match",
    [
        ((4, 8), (7,), {}, "weight must have shape"),
        ((4, 8), (8, 1), {}, "weight must have shape"),
        ((4, 8), (8,), {"eps": 0.0}, "eps must be > 0"),
        ((4, 0), (0,), {}, "D >= 1"),
    ],
)
def test_rms_norm_bad_input(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(rand(*x_shape), rand(*w_shape), **kwargs)


def test_rms_norm_rejects_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        rms_norm(torch.ones(2, 4, dtype=torch.int64, device=DEVICE), rand(4))


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.ones(2, 4), torch.ones(4))


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.8.0+git1a2b", "2.5.0", False),
])
def test_interpreter_problem_names_the_version_pair(triton_version, numpy_version, broken):
    """Triton < 3.7 with NumPy >= 2.4 fails inside every interpreted kernel loop with a run-time bound
    (triton-lang/triton#9171, reproduced with Triton 3.6.0's wheel): say so and name the fix."""
    problem = _launch.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and "triton>=3.7" in problem and "9171" in problem


def test_interpreter_problem_stops_the_launch_with_one_line(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", True)
    monkeypatch.setattr(_launch, "interpreter_problem", lambda: "Triton 3.6.0's interpreter cannot run kernels")
    with pytest.raises(RuntimeError, match=r"^_rms_norm_fwd_kernel: Triton 3\.6\.0's interpreter"):
        rms_kernels.rms_norm_forward(torch.ones(2, 4), torch.ones(4), 1e-6)


# ------------------------------------------------------------------- residual add + RMSNorm
def add_rms_norm_triton(x, delta, w, out_dtype=None):
    from minigpt import ops

    return ops._add_rms_norm_triton(x, delta, w, 1e-6, out_dtype or torch.promote_types(
        x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype), w.dtype))


def residual_grads(fn, x, delta, w, ds, dy):
    """(s, y) of fn and the gradients of x, delta and w for upstream gradients ds (None: s unused) and dy."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, delta, w)]
    s, y = fn(*leaves)
    outs, grads = ((y,), (dy,)) if ds is None else ((s, y), (ds, dy))
    return s, y, torch.autograd.grad(outs, leaves, grads)


@pytest.mark.parametrize("x_dtype, delta_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                                  (torch.float16, torch.float16)]
                         + ([(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)] if CUDA else []))
@pytest.mark.parametrize("s_used", [True, False], ids=["s-used", "s-unused"])
@pytest.mark.parametrize("shape", sizes([(7, 100), (2, 3, 33)], [(4099, 3000), (16384, 640)]))
def test_add_rms_norm_matches_float64(shape, x_dtype, delta_dtype, s_used):
    """s = x + delta and rms_norm(s) from one kernel; backward adds the residual path's ds (s used
    downstream) and writes delta's gradient in delta's own dtype when it differs from x's."""
    x, delta = rand(*shape, dtype=x_dtype), rand(*shape, dtype=delta_dtype, seed=1)
    w = rand(shape[-1], seed=2) + 1
    ds, dy = (rand(*shape, dtype=x_dtype, seed=3) if s_used else None), rand(*shape, seed=4)
    s, y, (dx, dd, dw) = residual_grads(add_rms_norm_triton, x, delta, w, ds, dy)
    ref = lambda a, b, c: (a + b, rms_norm_f64(a + b, c, 1e-6))
    s_ref, y_ref, (dx_ref, dd_ref, dw_ref) = residual_grads(
        ref, x.double(), delta.double(), w.double(), None if ds is None else ds.double(), dy.double())
    low = delta_dtype if delta_dtype != torch.float32 else x_dtype
    assert (s.dtype, y.dtype, dx.dtype, dd.dtype, dw.dtype) == (
        torch.promote_types(x_dtype, delta_dtype), torch.float32, x_dtype, delta_dtype, torch.float32)
    for got, want in ((s, s_ref), (y, y_ref), (dx, dx_ref), (dd, dd_ref), (dw, dw_ref)):
        assert_close(got, want, low)


def test_add_rms_norm_without_delta_is_rms_norm_and_returns_x():
    x, w, dy, ds = rand(5, 40), rand(40, seed=1), rand(5, 40, seed=2), rand(5, 40, seed=3)
    leaf = x.clone().requires_grad_()
    s, y = add_rms_norm_triton(leaf, None, w)
    assert s is leaf
    (dx,) = torch.autograd.grad((s, y), (leaf,), (ds, dy))
    _, (dx_ref, _) = grads_of(lambda a, b: rms_norm_f64(a, b, 1e-6), (x.double(), w.double()), dy.double())
    assert_close(y, rms_norm_f64(x, w, 1e-6), torch.float32)
    assert_close(dx, dx_ref + ds.double(), torch.float32)


def test_add_rms_norm_stores_y_in_the_autocast_dtype():
    """Ops.add_rms_norm under autocast: y comes in the autocast dtype, the value the matmul after
    it would have cast (so both paths agree); s keeps the residual stream's dtype."""
    from minigpt.ops import Ops

    amp = torch.bfloat16 if CUDA else torch.float16
    x, delta, w = rand(6, 72), rand(6, 72, dtype=amp, seed=1), rand(72, seed=2)
    with torch.autocast(DEVICE, dtype=amp):
        s, y = Ops("triton").add_rms_norm(x, delta, w, 1e-6)
        s_ref, y_ref = Ops("torch").add_rms_norm(x, delta, w, 1e-6)
    assert (s.dtype, y.dtype, y_ref.dtype) == (torch.float32, amp, amp)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=TOL[amp])


def test_add_rms_norm_bad_input():
    with pytest.raises(ValueError, match="delta must have x's shape"):
        add_rms_norm_triton(rand(4, 8), rand(4, 7), rand(8))
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rms_norm_triton(rand(4, 8), rand(4, 8), rand(7))


# ---------------------------------------------------------------------------------------- RoPE
def rope_f64(x, cos, sin):
    x, cos, sin = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sizes([(2, 5, 3, 16), (1, 7, 5, 10)], [(4, 2048, 32, 128), (2, 77, 12, 64)]))
def test_rope_matches_float64(shape, dtype):
    _, t, _, d = shape
    cos, sin = rope_cache(t, d, device=DEVICE)
    x, dy = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    y, (dx,) = grads_of(lambda a: apply_rope(a, cos, sin), (x,), dy)
    y_ref, (dx_ref,) = grads_of(lambda a: rope_f64(a, cos, sin), (x.double(),), dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


def test_rope_equals_library_reference_on_strided_views():
    """q and k sliced out of one fused qkv projection: strided in T, contiguous along D."""
    b, t, h, d = 2, 6, 3, 8
    qkv = rand(b, t, 3 * h * d)
    q, k, _ = (z.view(b, t, h, d) if z.is_contiguous() else z.unflatten(-1, (h, d)) for z in qkv.split(h * d, -1))
    cos, sin = rope_cache(t, d, device=DEVICE)
    assert not k.is_contiguous()
    for z in (q, k):
        torch.testing.assert_close(apply_rope(z, cos, sin), apply_rope_reference(z, cos, sin), atol=1e-6, rtol=1e-5)


def test_rope_reads_tables_sliced_from_a_wider_one_in_place():
    """cos/sin as the first half of full-width [T, D] tables (Liger's format, row stride D): the kernel reads them
    where they are, forward and backward, and gets the result of contiguous tables; sin with another stride than
    cos is copied (the kernel has one table stride)."""
    b, t, h, d = 2, 5, 3, 8
    cos, sin = rope_cache(t, d, device=DEVICE)
    wide_cos, wide_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q, k = rand(b, t, h, d).requires_grad_(), rand(b, t, 1, d, seed=2).requires_grad_()
    out = apply_rope_qk(q, k, wide_cos[:, : d // 2], wide_sin[:, : d // 2])
    ref = apply_rope_qk(q, k, cos, sin)
    for got, want in zip(out + torch.autograd.grad(out, (q, k), out), ref + torch.autograd.grad(ref, (q, k), ref), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(apply_rope_qk(q, k, wide_cos[:, : d // 2], sin)[0], ref[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sizes([(2, 5, 6, 3, 16), (1, 7, 5, 5, 10)], [(4, 2048, 32, 8, 128), (2, 77, 12, 3, 64)]))
def test_rope_qk_one_launch_matches_float64(shape, dtype):
    """q and k with different head counts (GQA) rotated together, forward and backward."""
    b, t, h, hkv, d = shape
    cos, sin = rope_cache(t, d, device=DEVICE)
    q, k = rand(b, t, h, d, dtype=dtype), rand(b, t, hkv, d, dtype=dtype, seed=2)
    dq, dk = rand(b, t, h, d, dtype=dtype, seed=3), rand(b, t, hkv, d, dtype=dtype, seed=4)
    q = q.requires_grad_()
    k = k.requires_grad_()
    qo, ko = apply_rope_qk(q, k, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    for got, ref in ((qo, rope_f64(q.detach(), cos, sin)), (ko, rope_f64(k.detach(), cos, sin)),
                     (gq, rope_f64(dq, cos, -sin)), (gk, rope_f64(dk, cos, -sin))):
        assert got.dtype == dtype
        assert_close(got, ref, dtype)


def test_rope_qk_bad_input():
    cos, sin = rope_cache(5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must agree on B, T and D"):
        apply_rope_qk(rand(2, 5, 3, 16), rand(1, 5, 3, 16), cos, sin)
    with pytest.raises(ValueError, match="share dtype"):
        apply_rope_qk(rand(2, 5, 3, 16), rand(2, 5, 3, 16, dtype=torch.float16), cos, sin)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_rope_qk_gradcheck():
    cos, sin = rope_cache(3, 6, dtype=torch.float64)
    q = rand(2, 3, 2, 6, dtype=torch.float64).requires_grad_()
    k = rand(2, 3, 1, 6, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: apply_rope_qk(a, b, cos, sin), (q, k), fast_mode=True)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_rope_gradcheck():
    cos, sin = rope_cache(3, 6, dtype=torch.float64)
    x = rand(2, 3, 2, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rope(a, cos, sin), (x,), fast_mode=True)


@pytest.mark.parametrize(
    "x_shape, cs_shape, match",
    [
        ((2, 5, 3), (5, 8), r"\[B, T, H, D\]"),
        ((2, 5, 3, 15), (5, 7), "must be even"),
        ((2, 5, 3, 16), (6, 8), r"cos must be \[T, D/2\]"),
        ((2, 5, 3, 16), (5, 16), r"cos must be \[T, D/2\]"),
    ],
)
def test_rope_bad_input(x_shape, cs_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(rand(*x_shape), rand(*cs_shape), rand(*cs_shape))


def test_rope_rejects_strided_head_dim():
    x = rand(2, 5, 3, 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        apply_rope(x, rand(5, 8), rand(5, 8))


# -------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sizes([(7, 100), (2, 3, 37)], [(4096, 11008), (4097, 2816)]))
def test_swiglu_matches_float64(shape, dtype):
    g, u, dy = rand(*shape, dtype=dtype, scale=3), rand(*shape, dtype=dtype, seed=1), rand(*shape, dtype=dtype, seed=2)
    y, (dg, du) = grads_of(swiglu, (g, u), dy)
    y_ref, (dg_ref, du_ref) = grads_of(lambda a, b: F.silu(a) * b, (g.double(), u.double()), dy.double())
    assert y.dtype == dtype
    for got, ref in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        assert_close(got, ref, dtype)


def test_swiglu_on_halves_of_a_fused_projection():
    h = rand(3, 4, 2 * 19).requires_grad_()
    dy = rand(3, 4, 19, seed=1)
    gate, up = h.chunk(2, dim=-1)
    swiglu(gate, up).backward(dy)
    h_ref = h.detach().double().requires_grad_()
    g_ref, u_ref = h_ref.chunk(2, dim=-1)
    (F.silu(g_ref) * u_ref).backward(dy.double())
    assert_close(h.grad, h_ref.grad, torch.float32)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_swiglu_gradcheck():
    g, u = rand(3, 11, dtype=torch.float64, scale=2), rand(3, 11, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(swiglu, (g.requires_grad_(), u.requires_grad_()), fast_mode=True)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(rand(4, 8), rand(4, 9))
    with pytest.raises(ValueError, match="same dtype"):
        swiglu(rand(4, 8), rand(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="floating-point"):
        swiglu(torch.ones(4, dtype=torch.int32, device=DEVICE), torch.ones(4, dtype=torch.int32, device=DEVICE))


# ------------------------------------------------------------------------------- Cross-entropy
def targets_for(shape, vocab, seed=0, ignored=0.25):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = torch.randint(0, vocab, shape, device=DEVICE, generator=gen)
    t[torch.rand(shape, device=DEVICE, generator=gen) < ignored] = -100
    return t


def cross_entropy_and_float64(logits, targets, grad_out=1.0):
    """(loss, dlogits) of our kernel and of F.cross_entropy in float64, backpropagating grad_out."""
    g = torch.tensor(grad_out, device=DEVICE)
    loss, (dx,) = grads_of(lambda x: cross_entropy(x, targets), (logits,), g)
    ref = lambda x: F.cross_entropy(x.flatten(0, -2), targets.flatten())
    loss_ref, (dx_ref,) = grads_of(ref, (logits.double(),), g.double())
    return loss, dx, loss_ref, dx_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sizes([(7, 1000), (2, 3, 37), (5, 9001)], [(4096, 32000), (1024, 128256)]))
def test_cross_entropy_matches_float64(shape, dtype):
    logits = rand(*shape, dtype=dtype, scale=4)
    targets = targets_for(shape[:-1], shape[-1])
    loss, dx, loss_ref, dx_ref = cross_entropy_and_float64(logits, targets, grad_out=2.5)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_running_max_moves_between_chunks(dtype):
    """Rows whose max lies in the last chunk of BLOCK columns (a rising ramp), in the first (a falling
    one) and in the middle: the running sum must be rescaled each time the running max moves."""
    v = 2 * MAX_BLOCK + 37
    ramp = torch.linspace(-12.0, 12.0, v, device=DEVICE)
    logits = (torch.stack([ramp, ramp.flip(0), -ramp.abs()]) + rand(3, v, scale=0.5)).to(dtype)
    targets = torch.tensor([v - 1, 3, v // 2], device=DEVICE)
    loss, dx, loss_ref, dx_ref = cross_entropy_and_float64(logits, targets)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * max(loss_ref.item(), 1.0)
    assert_close(dx, dx_ref, dtype)


def test_cross_entropy_masked_logits_in_a_whole_chunk():
    """A row whose first chunk of BLOCK logits is all -inf (a masked vocabulary): loss and gradient
    stay finite, and the masked logits get zero gradient."""
    v = MAX_BLOCK + 50
    logits = rand(2, v, scale=2.0)
    logits[0, :MAX_BLOCK] = float("-inf")
    targets = torch.tensor([MAX_BLOCK + 3, 5], device=DEVICE)
    loss, dx, loss_ref, dx_ref = cross_entropy_and_float64(logits, targets)
    assert torch.isfinite(loss) and abs(loss.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()
    assert torch.equal(dx[0, :MAX_BLOCK], torch.zeros_like(dx[0, :MAX_BLOCK]))
    assert_close(dx, dx_ref, torch.float32)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = rand(4, 50).requires_grad_()
    loss = cross_entropy(logits, torch.full((4,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_cross_entropy_custom_ignore_index_and_no_grad():
    logits, targets = rand(6, 30), targets_for((6,), 30)
    targets[targets == -100] = 7
    with torch.no_grad():
        loss = cross_entropy(logits, targets, ignore_index=7)
    ref = F.cross_entropy(logits.double(), targets, ignore_index=7)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_cross_entropy_inplace_grad_overwrites_logits():
    base = rand(5, 40)
    targets = targets_for((5,), 40)
    x = base.clone().requires_grad_()
    logits = x * 1.0
    cross_entropy(logits, targets, inplace_grad=True).backward()
    x_ref = base.double().requires_grad_()
    F.cross_entropy(x_ref, targets).backward()
    assert_close(x.grad, x_ref.grad, torch.float32)
    assert_close(logits.detach(), x_ref.grad, torch.float32)


@pytest.mark.skipif(not CUDA, reason="needs a batch big enough to underflow fp16 (too slow in the interpreter)")
def test_cross_entropy_fp16_gradient_survives_loss_scaling():
    """softmax / n_valid = 1/512/65536 underflows fp16; a GradScaler-style upstream 65536 must restore it."""
    n, v = 65536, 512
    x = torch.zeros(n, v, device=DEVICE, dtype=torch.float16, requires_grad=True)
    targets = torch.zeros(n, dtype=torch.long, device=DEVICE)
    cross_entropy(x, targets).backward(torch.tensor(65536.0, device=DEVICE))
    torch.testing.assert_close(x.grad[:, 1:].float(), torch.full((n, v - 1), 1 / v, device=DEVICE), rtol=1e-3, atol=0)
    torch.testing.assert_close(x.grad[:, 0].float(), torch.full((n,), 1 / v - 1, device=DEVICE), rtol=1e-3, atol=0)


def test_cross_entropy_out_of_range_target_gives_nan():
    loss = cross_entropy(rand(3, 20), torch.tensor([1, 25, 2], device=DEVICE))
    assert torch.isnan(loss)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_cross_entropy_gradcheck():
    x = rand(2, 3, 17, dtype=torch.float64).requires_grad_()
    t = targets_for((2, 3), 17, ignored=0.3)
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t), (x,), fast_mode=True)


def test_cross_entropy_bad_input():
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        cross_entropy(rand(10), torch.zeros((), dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="int64"):
        cross_entropy(rand(4, 10), rand(4))
    with pytest.raises(ValueError, match="targets must have shape"):
        cross_entropy(rand(4, 10), torch.zeros(5, dtype=torch.long, device=DEVICE))


# --------------------------------------------------------------------- Fused linear + CE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, dim, vocab", sizes([(13, 16, 100), (40, 8, 33)], [(4096, 1024, 32000)]))
def test_fused_linear_cross_entropy_matches_float64(n, dim, vocab, dtype):
    h, w = rand(n, dim, dtype=dtype), rand(vocab, dim, dtype=dtype, seed=1, scale=dim**-0.5)
    targets = targets_for((n,), vocab)
    grad_out = torch.tensor(0.5, device=DEVICE)
    loss, (dh, dw) = grads_of(lambda a, b: fused_linear_cross_entropy(a, b, targets), (h, w), grad_out)
    ref = lambda a, b: F.cross_entropy(a @ b.t(), targets)
    loss_ref, (dh_ref, dw_ref) = grads_of(ref, (h.double(), w.double()), grad_out.double())
    assert dh.dtype == dtype and dw.dtype == dtype
    assert abs(loss.item() - loss_ref.item()) <= 10 * TOL[dtype] * loss_ref.item()
    assert_close(dh, dh_ref, dtype)
    assert_close(dw, dw_ref, dtype)


@pytest.mark.skipif(CUDA, reason="fp64 gradcheck runs in the CPU interpreter")
def test_fused_linear_cross_entropy_gradcheck():
    h, w = rand(2, 3, 4, dtype=torch.float64), rand(9, 4, dtype=torch.float64, seed=1)
    t = targets_for((2, 3), 9, ignored=0.3)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_cross_entropy(a, b, t), (h.requires_grad_(), w.requires_grad_()), fast_mode=True
    )


def test_fused_linear_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(rand(4, 8), rand(10, 9), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(rand(4, 8), rand(10, 8, dtype=torch.float16), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_linear_cross_entropy(rand(4, 8), rand(10, 8), torch.zeros(3, dtype=torch.long, device=DEVICE))
