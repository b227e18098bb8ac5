"""FlashAttention kernel vs a float64 PyTorch reference: forward, LSE, dq/dk/dv, bad input.

On CPU the kernels run in Triton's interpreter in fp32 with tiny grids (odd T for masked tails,
MHA / GQA / MQA, causal and not). With CUDA the same file runs bf16 at real sizes and holds the
kernel to the accuracy of PyTorch's own bf16 SDPA against the same float64 reference.
"""

import math

import pytest
import torch

from minigpt import runtime
from minigpt.kernels import _launch
from minigpt.kernels import flash_attention as fa
from minigpt.kernels.flash_attention import (
    FlashConfig,
    flash_attention,
    flash_attention_forward,
    flash_config,
    padded_head_dim,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def reference(q, k, v, causal, scale=None):
    """Plain softmax attention in float64 with K/V repeated per query head: (o, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:  # query i sits at key position Tk - Tq + i (bottom-right aligned)
        tq, tk = q.shape[2], k.shape[2]
        above = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        s = s.masked_fill(above, float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def make_inputs(b, h, hkv, t, d, dtype, seed=0, tk=None):
    """q, do [b, h, t, d]; k, v [b, hkv, tk, d] (tk defaults to t)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    tk = t if tk is None else tk
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, tk, d, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, tk, d, device=DEVICE, dtype=dtype, generator=gen)
    do = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=gen)
    return q, k, v, do


def kernel_grads(q, k, v, do, causal, scale=None):
    """(o, dq, dk, dv) of the Triton kernel."""
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(qs, ks, vs, causal=causal, scale=scale)
    o.backward(do)
    return o, qs.grad, ks.grad, vs.grad


def reference_grads(q, k, v, do, causal, scale=None):
    """(o, dq, dk, dv) of the float64 reference."""
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, _ = reference(qr, kr, vr, causal, scale)
    o_ref.backward(do.double())
    return o_ref, qr.grad, kr.grad, vr.grad


def run_both(q, k, v, do, causal, scale=None):
    """(o, dq, dk, dv) of the kernel and of the float64 reference."""
    return kernel_grads(q, k, v, do, causal, scale), reference_grads(q, k, v, do, causal, scale)


# -- CPU interpreter (fp32, tiny grids) --------------------------------------------------------

# (B, H, Hkv, T, D): T=37 leaves ragged tails for every tile size; 64 is an exact multiple.
CPU_SHAPES = [
    (2, 4, 2, 37, 32),   # GQA
    (1, 4, 4, 37, 32),   # MHA
    (1, 4, 1, 37, 32),   # MQA
    (1, 2, 1, 64, 64),   # no tail
    (1, 2, 2, 21, 128),  # T shorter than one query block
    (1, 2, 1, 1, 32),    # single token
    (1, 4, 2, 37, 40),   # head dim 40 (the medium preset), in a 64-wide tile
    (1, 2, 1, 19, 24),   # head dim 24, in a 32-wide tile
    (1, 2, 2, 21, 80),   # head dim 80, in a 128-wide tile
]


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_fp32(shape, causal):
    got, ref = run_both(*make_inputs(*shape, torch.float32), causal=causal)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# (B, H, Hkv, Tq, Tk, D): queries after a cached prefix; offsets that are and are not tile multiples.
PREFIX_SHAPES = [
    (1, 2, 1, 21, 37, 32),   # GQA, ragged offset 16 and tails
    (1, 2, 2, 5, 64, 32),    # a short prompt after a long prefix
    (2, 4, 2, 1, 19, 64),    # one query (a decode step)
    (1, 2, 1, 33, 50, 40),   # a head narrower than its tile
]


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", PREFIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_queries_after_a_cached_prefix_fp32(shape, causal):
    """Tq < Tk, causal bottom-right aligned (as a prefill after a cached prefix), forward and backward."""
    b, h, hkv, tq, tk, d = shape
    got, ref = run_both(*make_inputs(b, h, hkv, tq, d, torch.float32, tk=tk), causal=causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def atomic_dq_grads(q, k, v, do, causal):
    """(o, dq, dk, dv) with the backward's dQ added up by atomics (`atomic_dq=True`)."""
    o, lse = flash_attention_forward(q, k, v, causal=causal)
    return (o, *fa.flash_attention_backward(do, q, k, v, o, lse, causal=causal, atomic_dq=True))


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 32), (1, 4, 2, 37, 40), (1, 2, 2, 21, 128), (1, 2, 1, 33, 50, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_atomic_dq_backward_fp32(shape, causal):
    """dQ from the dK/dV kernel's atomic adds (GQA, a narrow head, one query block, Tq < Tk) vs float64."""
    b, h, hkv, tq, *rest = shape
    d, tk = rest[-1], rest[0] if len(rest) == 2 else None
    q, k, v, do = make_inputs(b, h, hkv, tq, d, torch.float32, tk=tk)
    got = atomic_dq_grads(q, k, v, do, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, reference_grads(q, k, v, do, causal), strict=True):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_atomic_dq_launches_the_convert_kernel_not_the_dq_kernel():
    for atomic in (False, True):
        launched = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fa, "launcher", lambda kernel, probe, launched=launched: launched.append(kernel) or _launch.launcher(kernel, probe))
            q, k, v, do = make_inputs(1, 2, 1, 21, 32, torch.float32)
            o, lse = flash_attention_forward(q, k, v)
            fa.flash_attention_backward(do, q, k, v, o, lse, atomic_dq=atomic)
        assert (fa._attn_bwd_dq_convert_kernel in launched) == atomic
        assert (fa._attn_bwd_dq_kernel in launched) == (not atomic)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_backward_hands_its_kernels_to_the_ones_given():
    """`dkdv_kernel` / `dq_kernel` (how the Hopper backward plugs in its Gluon kernels) replace ours: each gets
    (q, k, v, do, lse, delta) with the preprocess's delta, its results are returned, and our kernel for that
    part is not launched, nor its gradient allocated; with both given only the preprocess runs; atomic_dq with
    either is an error."""
    q, k, v, do = make_inputs(1, 4, 2, 37, 32, torch.float32, seed=2)
    o, lse = flash_attention_forward(q, k, v)
    want = fa.flash_attention_backward(do, q, k, v, o, lse)
    delta = (o.double() * do.double()).sum(-1)
    empty_like = torch.empty_like
    for given in ("dkdv", "dq", "both"):
        seen, launched, allocated = [], [], []

        def dkdv(*args, seen=seen):
            seen.append(("dkdv", args))
            return want[1] + 1, want[2] + 2

        def dq(*args, seen=seen):
            seen.append(("dq", args))
            return want[0] + 3

        kernels = {"dkdv_kernel": dkdv if given != "dq" else None, "dq_kernel": dq if given != "dkdv" else None}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fa, "launcher", lambda kernel, probe, launched=launched: launched.append(kernel) or _launch.launcher(kernel, probe))
            mp.setattr(torch, "empty_like", lambda x, *a, allocated=allocated, **kw: allocated.append(x) or empty_like(x, *a, **kw))
            got = fa.flash_attention_backward(do, q, k, v, o, lse, **kernels)
        grads_like = [n for n, x in (("q", q), ("k", k), ("v", v)) for y in allocated if y is x]
        assert grads_like == {"dkdv": ["q"], "dq": ["k", "v"], "both": []}[given], (given, grads_like)
        assert [name for name, _ in seen] == [n for n in ("dkdv", "dq") if kernels[f"{n}_kernel"]]
        for _, args in seen:
            assert all(a is b for a, b in zip(args[:5], (q, k, v, do, lse), strict=True))
            torch.testing.assert_close(args[5].double(), delta, rtol=1e-5, atol=1e-5)  # fp32 sums
        assert (fa._attn_bwd_dkdv_kernel in launched) == (given == "dq")
        assert (fa._attn_bwd_dq_kernel in launched) == (given == "dkdv")
        offsets = (3 if given != "dkdv" else 0, 1 if given != "dq" else 0, 2 if given != "dq" else 0)
        for x, w, off in zip(got, want, offsets, strict=True):
            torch.testing.assert_close(x, w + off)
    with pytest.raises(ValueError, match="atomic_dq"):
        fa.flash_attention_backward(do, q, k, v, o, lse, atomic_dq=True, dq_kernel=lambda *a: a[0])


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_atomic_dq_hands_the_accumulator_to_the_dkdv_kernel_given():
    """With atomic_dq, a given dK/dV kernel (how the Gluon one-pass backward plugs in) also gets the fp32 dQ
    accumulator, zeroed by the preprocess, and adds dS K into it unscaled; the last kernel scales and casts it
    into dq. Neither of our dK/dV and dQ kernels is launched."""
    q, k, v, do = make_inputs(1, 4, 2, 40, 32, torch.float32, seed=3)
    o, lse = flash_attention_forward(q, k, v, scale=0.3)
    want = fa.flash_attention_backward(do, q, k, v, o, lse, scale=0.3)
    seen, launched = [], []

    def one_pass(*args):
        acc = args[6]
        seen.append((acc.dtype, acc.numel(), acc.is_contiguous(), acc.abs().max().item()))
        acc.view_as(q).add_(want[0] / 0.3)  # what the kernel adds: dS K, before the scale
        return want[1] + 1, want[2] + 2

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa, "launcher", lambda kernel, probe: launched.append(kernel) or _launch.launcher(kernel, probe))
        got = fa.flash_attention_backward(do, q, k, v, o, lse, scale=0.3, atomic_dq=True, dkdv_kernel=one_pass)
    assert seen == [(torch.float32, q.numel(), True, 0.0)]
    assert launched == [fa._attn_bwd_preprocess_kernel, fa._attn_bwd_dq_convert_kernel]
    for x, w, off in zip(got, want, (0, 1, 2), strict=True):
        torch.testing.assert_close(x, w + off)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_lse_and_custom_scale():
    q, k, v, do = make_inputs(1, 4, 2, 37, 32, torch.float32, seed=1)
    for causal in (True, False):
        o, lse = flash_attention_forward(q, k, v, causal=causal, scale=0.3)
        o_ref, lse_ref = reference(q, k, v, causal, scale=0.3)
        assert lse.dtype == torch.float32 and lse.shape == (1, 4, 37)
        torch.testing.assert_close(lse.double(), lse_ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    got, ref = run_both(q, k, v, do, causal=True, scale=0.3)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_strided_heads_layout():
    """q/k/v as strided views of one [B, T, H, D] projection; dO with a strided last dim."""
    b, t, h, hkv, d = 2, 37, 4, 2, 32
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(b, t, h + 2 * hkv, d, generator=gen)
    q, k, v = qkv.split([h, hkv, hkv], dim=2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    do = torch.randn(b, h, t, d, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    got, ref = run_both(q, k, v, do, causal=True)
    for a, b_ in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b_, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_outputs_and_gradients_come_in_the_projection_layout():
    """q, k, v as the model hands them over ([B, H, T, D] views of [B, T, H, D] memory): o, dq, dk, dv
    come in that layout too, so the model's reshapes back to [B, T, H * D] are views; dO arriving
    in it is read in place."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(2, 19, h, 40, generator=gen).transpose(1, 2) for h in (4, 2, 2, 4))
    got, ref = run_both(q, k, v, do, causal=True)
    for a, b_ in zip(got, ref, strict=True):
        assert a.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(a.double(), b_, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_fp16_forward():
    q, k, v, _ = make_inputs(1, 2, 1, 37, 32, torch.float16, seed=3)
    o = flash_attention(q, k, v, causal=True)
    assert o.dtype == torch.float16
    o_ref, _ = reference(q, k, v, causal=True)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-3, rtol=1e-2)


def test_tile_configs_fit_the_causal_loops():
    """Causal loop bounds need fwd/dq BLOCK_M and dkdv BLOCK_N to be multiples of the other tile."""
    caps = [None, (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0)]
    for d in (32, 64, 128):
        for cap, seq_k in ((c, t) for c in caps for t in (None, 1024, 4096, 16384)):
            cfg = flash_config(d, cap, interpret=cap is None, seq_k=seq_k)
            assert isinstance(cfg, FlashConfig)
            assert cfg.fwd.block_m % cfg.fwd.block_n == 0 and cfg.dq.block_m % cfg.dq.block_n == 0
            assert cfg.dkdv.block_n % cfg.dkdv.block_m == 0
            assert min(min(c.block_m, c.block_n) for c in cfg) >= 16, "tl.dot needs tiles of at least 16"
    t4, h100 = flash_config(128, (7, 5), False), flash_config(128, (9, 0), False)
    assert t4.fwd.block_m * t4.fwd.block_n < h100.fwd.block_m * h100.fwd.block_n
    assert t4.fwd.num_stages < h100.fwd.num_stages
    # consumer Blackwell (sm_120) has about 100 KB of shared memory, like sm_86: the 2-stage tiles
    assert flash_config(128, (12, 0), False) == flash_config(128, (8, 6), False) != h100
    # sm_90, heads up to 64: short sequences take 64-key dK/dV blocks, long ones 128
    assert flash_config(64, (9, 0), False, seq_k=1024).dkdv.block_n == 64
    assert flash_config(64, (9, 0), False, seq_k=4096).dkdv.block_n == flash_config(64, (9, 0), False).dkdv.block_n == 128
    # sm_90: the forward takes 128-query blocks on 8 warps from 16384 keys on
    assert flash_config(128, (9, 0), False, seq_k=16384).fwd == (128, 64, 8, 3)
    assert flash_config(128, (9, 0), False, seq_k=8192).fwd == flash_config(128, (9, 0), False).fwd == (64, 64, 4, 3)


def test_default_tiles_follow_the_number_of_keys(monkeypatch):
    """The launchers pick the tiles from k's length, not q's (a short prompt after a long prefix)."""
    seen = []
    monkeypatch.setattr(fa, "flash_config", lambda *args, **kw: seen.append(kw["seq_k"]) or flash_config(*args, **kw))
    q, k, v, do = make_inputs(1, 2, 1, 5, 32, torch.float32, tk=40)
    o, lse = flash_attention_forward(q, k, v)
    fa.flash_attention_backward(do, q, k, v, o, lse)
    assert seen == [40, 40]


# -- bad input ---------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize(
    "q, k, v, match",
    [
        (_t(2, 37, 32), _t(2, 37, 32), _t(2, 37, 32), r"shape \[B, H, T, D\]"),
        (_t(1, 4, 37, 32), _t(2, 2, 37, 32), _t(2, 2, 37, 32), "must agree on B and D"),
        (_t(1, 4, 37, 32), _t(1, 2, 36, 32), _t(1, 2, 36, 32), "causal attention needs Tq <= Tk"),
        (_t(1, 4, 37, 64), _t(1, 2, 37, 32), _t(1, 2, 37, 32), "must agree on B and D"),
        (_t(1, 4, 37, 32), _t(1, 2, 37, 32), _t(1, 1, 37, 32), "same shape"),
        (_t(1, 4, 37, 32), _t(1, 3, 37, 32), _t(1, 3, 37, 32), "multiple of key/value heads"),
        (_t(1, 4, 37, 160), _t(1, 2, 37, 160), _t(1, 2, 37, 160), "head dim 160 not supported"),
        (_t(1, 4, 37, 0), _t(1, 2, 37, 0), _t(1, 2, 37, 0), "head dim must be positive"),
        (_t(1, 4, 37, 32), _t(1, 2, 37, 32, dtype=torch.float16), _t(1, 2, 37, 32), "dtypes differ"),
        (_t(1, 4, 37, 32, dtype=torch.float64), _t(1, 2, 37, 32, dtype=torch.float64),
         _t(1, 2, 37, 32, dtype=torch.float64), "not supported; use float16"),
        (_t(1, 4, 32, 37).transpose(-1, -2), _t(1, 2, 37, 32), _t(1, 2, 37, 32), "last dim must be contiguous"),
        (_t(1, 4, 0, 32), _t(1, 2, 0, 32), _t(1, 2, 0, 32), "B and T must be positive"),
    ],
    ids=["rank", "batch", "seq", "headdim-mismatch", "kv-shape", "heads", "headdim", "headdim-zero", "dtype-mismatch",
         "fp64", "strided-last-dim", "empty"],
)
def test_bad_input_raises(q, k, v, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
def test_narrow_head_uses_the_real_scale():
    """A head of 40 runs in a 64-wide tile but keeps scale 1/sqrt(40), and q, k, v, o and the gradients keep D=40
    (also with a custom scale)."""
    assert [padded_head_dim(d) for d in (1, 32, 33, 40, 64, 65, 128)] == [32, 32, 64, 64, 64, 128, 128]
    q, k, v, do = make_inputs(1, 2, 2, 19, 40, torch.float32, seed=4)
    for scale in (None, 0.7):
        got, ref = run_both(q, k, v, do, causal=True, scale=scale)
        assert [g.shape for g in got] == [q.shape, q.shape, k.shape, v.shape]
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="CPU interpreter sizes")
@pytest.mark.parametrize("d, align", [(40, 4), (41, 1)])
def test_narrow_heads_as_strided_views(d, align):
    """q/k/v of a narrow head as views of one [B, T, H, D] projection, as the model passes them: with D=40 every
    stride is a multiple of 16 bytes (ALIGN=4 fp32 elements, the compiler's hint), with D=41 none is (no hint);
    both must be exact. Claiming ALIGN=4 for D=41 rounds the strides down and breaks this test."""
    b, t, h, hkv = 2, 37, 4, 2
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, t, h + 2 * hkv, d, generator=gen)
    q, k, v = (x.transpose(1, 2) for x in qkv.split([h, hkv, hkv], dim=2))
    assert fa._stride_align(d, q, k, v) == align
    do = torch.randn(b, h, t, d, generator=gen)
    got, ref = run_both(q, k, v, do, causal=True)
    for a, b_ in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b_, atol=2e-5, rtol=1e-4)


def test_full_width_heads_take_no_alignment_hint():
    q = torch.empty(1, 2, 8, 64)
    assert fa._stride_align(64, q) == 1 and fa._stride_align(40, torch.empty(1, 2, 8, 40)) == 4
    assert fa._stride_align(40, torch.empty(1, 2, 8, 40, dtype=torch.bfloat16)) == 8


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter message")
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    q, k, v, _ = make_inputs(1, 2, 1, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


# -- CUDA: bf16 at real sizes ------------------------------------------------------------------


def _sdpa_peer(q, k, v, do, causal):
    """PyTorch's SDPA in the same low precision (K/V repeated): the accuracy bar to meet."""
    group = q.shape[1] // k.shape[1]
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        qs, ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1), is_causal=causal
    )
    o.backward(do)
    return o, qs.grad, ks.grad, vs.grad


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "shape", [(2, 8, 8, 1024, 64), (1, 8, 2, 2048, 128), (1, 4, 1, 4096, 64), (1, 4, 4, 1000, 128), (2, 16, 16, 1024, 40)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_cuda_low_precision_matches_sdpa_accuracy(shape, causal):
    dtype = runtime.dtype()
    q, k, v, do = make_inputs(*shape, dtype)
    got, ref = run_both(q, k, v, do, causal=causal)
    peer = _sdpa_peer(q, k, v, do, causal)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), got, ref, peer, strict=True):
        err = (a.double() - b).abs().max().item()
        peer_err = (c.double() - b).abs().max().item()
        assert err <= 2 * peer_err + 1e-3, f"{name}: max error {err:.3g} vs SDPA's {peer_err:.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_backward_is_deterministic():
    """No atomics by default: two backward passes give bit-identical gradients."""
    dtype = runtime.dtype()
    q, k, v, do = make_inputs(2, 8, 2, 1536, 128, dtype, seed=4)
    first = kernel_grads(q, k, v, do, causal=True)
    second = kernel_grads(q, k, v, do, causal=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 8, 2, 1536, 128), (2, 16, 4, 1024, 40), (1, 8, 8, 1000, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_atomic_dq_is_as_accurate(shape):
    """dQ by atomic adds differs from the dQ kernel's only in summation order: as close to float64."""
    dtype = runtime.dtype()
    q, k, v, do = make_inputs(*shape, dtype, seed=5)
    got = atomic_dq_grads(q, k, v, do, causal=True)
    want, ref = run_both(q, k, v, do, causal=True)
    for name, a, b, r in zip(("dq", "dk", "dv"), got[1:], want[1:], ref[1:], strict=True):
        err_a, err_b = ((x.double() - r).abs().max().item() for x in (a, b))
        assert err_a <= 1.25 * err_b + 1e-3, f"{name}: atomic dQ path {err_a:.3g} vs default {err_b:.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 2048, 128), (1, 8, 8, 1000, 1517, 64), (1, 4, 2, 300, 16400, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_prefix_matches_sdpa_accuracy(shape):
    """Causal, Tq < Tk (prefill after a cached prefix) in bf16: as accurate as SDPA with the same mask.
    16400 keys take the sm_80/sm_90 forward's long-sequence tile."""
    b, h, hkv, tq, tk, d = shape
    dtype = runtime.dtype()
    q, k, v, do = make_inputs(b, h, hkv, tq, d, dtype, tk=tk)
    got, ref = run_both(q, k, v, do, causal=True)
    group = h // hkv
    mask = torch.ones(tq, tk, dtype=torch.bool, device=DEVICE).tril(tk - tq)
    peer = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
    err = (got[0].double() - ref[0]).abs().max().item()
    peer_err = (peer.double() - ref[0]).abs().max().item()
    assert err <= 2 * peer_err + 1e-3, f"o: max error {err:.3g} vs SDPA's {peer_err:.3g}"
    for name, a, r in zip(("dq", "dk", "dv"), got[1:], ref[1:], strict=True):
        rel = (a.double() - r).abs().max().item() / r.abs().max().item()
        assert rel < 3e-2, f"{name}: relative error {rel:.3g}"
