"""kernels="triton" routes norm, RoPE, SwiGLU, attention and the loss through minigpt.kernels (as
minigpt.ops custom ops): logits, loss and every gradient match the PyTorch path (fp32; on CPU
through the interpreter), and torch.compile traces the whole model without a graph break."""

import pytest
import torch

from minigpt import MiniGPT, ModelConfig


def assert_same_gradients(fast, loss, ref, loss_ref, tol: dict) -> None:
    """Backward through both models; every parameter's gradient must match the reference's."""
    loss.backward()
    loss_ref.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n_kv_heads, dim", [(4, 128), (2, 128), (2, 160)], ids=["mha", "gqa", "gqa-head-dim-40"])
def test_triton_path_matches_torch_path(n_kv_heads, dim):
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(vocab_size=67, dim=dim, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32)
    ref = MiniGPT(ModelConfig(**base)).to(dev)
    fast = MiniGPT(ModelConfig(**base, kernels="triton")).to(dev)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 67, (2, 19), device=dev)
    targets = torch.randint(0, 67, (2, 19), device=dev)
    targets[1, :4] = -100
    # fp32 on CPU; tf32 matmuls inside the GPU kernels need a looser tolerance
    tol = dict(rtol=1e-4, atol=1e-4) if dev == "cpu" else dict(rtol=2e-2, atol=2e-3)
    logits_ref, loss_ref = ref(idx, targets)
    logits, loss = fast(idx, targets)
    assert logits is None  # the fused linear cross-entropy never builds the logits
    torch.testing.assert_close(fast(idx)[0], logits_ref, **tol)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert_same_gradients(fast, loss, ref, loss_ref, tol)


def test_triton_post_norm_model_matches_torch_path():
    """A post-norm block has no add in front of its norms: Ops.rms_norm (the add + norm op without
    delta) normalises, and loss and every gradient match the PyTorch path."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(vocab_size=67, dim=64, n_layers=2, n_heads=2, max_seq_len=32, norm_position="post")
    ref = MiniGPT(ModelConfig(**base)).to(dev)
    fast = MiniGPT(ModelConfig(**base, kernels="triton")).to(dev)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 67, (2, 9), device=dev)
    tol = dict(rtol=1e-4, atol=1e-4) if dev == "cpu" else dict(rtol=2e-2, atol=2e-3)
    _, loss_ref = ref(idx, idx)
    _, loss = fast(idx, idx)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert_same_gradients(fast, loss, ref, loss_ref, tol)


def test_triton_path_matches_torch_path_under_autocast():
    """Under autocast the residual stream stays fp32 while the blocks' outputs are half precision:
    the fused add + norm kernel must add them as torch does, hand the norm's output on in the
    autocast dtype and send each gradient back in its own dtype (fp16 on CPU, bf16 on a GPU)."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if dev == "cuda" else torch.float16
    base = dict(vocab_size=67, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    ref = MiniGPT(ModelConfig(**base)).to(dev)
    fast = MiniGPT(ModelConfig(**base, kernels="triton")).to(dev)
    fast.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, 67, (2, 19), device=dev), torch.randint(0, 67, (2, 19), device=dev)
    with torch.autocast(dev, dtype=amp):
        _, loss_ref = ref(idx, targets)
        _, loss = fast(idx, targets)
    tol = dict(rtol=1e-2, atol=1e-3) if amp == torch.float16 else dict(rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert_same_gradients(fast, loss, ref, loss_ref, tol)


def test_forward_fused_is_forward_on_the_sum():
    """Block.forward_fused carries the residual stream as (x, pending add): on the PyTorch path too,
    sum(forward_fused(x, d)) == forward(x + d); blocks it cannot fuse say so."""
    from minigpt.model import Block
    from minigpt.rope import rope_cache

    torch.manual_seed(0)
    block = Block(ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=2, max_seq_len=8), 0)
    cos, sin = rope_cache(5, 32)
    x, d = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    torch.testing.assert_close(sum(block.forward_fused(x, d, cos, sin)), block(x + d, cos, sin))
    torch.testing.assert_close(sum(block.forward_fused(x, None, cos, sin)), block(x, cos, sin))
    post = Block(ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=2, norm_position="post"), 0)
    with pytest.raises(ValueError, match="call forward instead"):
        post.forward_fused(x, d, cos, sin)


def test_triton_config_head_dim_limit_is_the_kernels():
    from minigpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS

    ModelConfig(vocab_size=10, dim=80, n_layers=1, n_heads=2, kernels="triton")  # head_dim 40: padded, accepted
    ModelConfig(vocab_size=10, dim=256, n_layers=1, n_heads=2, kernels="triton")  # 128, the largest tile
    with pytest.raises(ValueError, match="head_dim up to 128"):
        ModelConfig(vocab_size=10, dim=264, n_layers=1, n_heads=2, kernels="triton")
    assert max(SUPPORTED_HEAD_DIMS) == 128


def test_triton_attention_rejects_dropout():
    with pytest.raises(ValueError, match="no attention dropout"):
        MiniGPT(ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=2, kernels="triton", dropout=0.1))


def test_triton_model_generates_like_torch_model():
    torch.manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(vocab_size=50, dim=64, n_layers=1, n_heads=2, max_seq_len=24)
    ref = MiniGPT(ModelConfig(**base)).to(dev)
    fast = MiniGPT(ModelConfig(**base, kernels="triton")).to(dev)
    fast.load_state_dict(ref.state_dict())
    prompt = torch.randint(0, 50, (1, 6), device=dev)
    assert torch.equal(fast.generate(prompt, 8, temperature=0), ref.generate(prompt, 8, temperature=0))


DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-4) if DEV == "cpu" else dict(rtol=2e-2, atol=2e-3)  # tf32 inside the GPU kernels


def _tiny(kernels: str, dim: int = 64) -> MiniGPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16, kernels=kernels)
    return MiniGPT(cfg).to(DEV)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_triton_model_has_no_graph_break_and_matches_eager(backend):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward through the fakes."""
    torch._dynamo.reset()
    ref, fast = _tiny("torch"), _tiny("triton")
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 37, (2, 11), device=DEV)
    targets = torch.randint(0, 37, (2, 11), device=DEV)
    compiled = torch.compile(fast, backend=backend, fullgraph=True)
    _, loss = compiled(idx, targets)
    _, loss_ref = ref(idx, targets)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert_same_gradients(fast, loss, ref, loss_ref, TOL)


KERNEL_NAMES = ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                "_swiglu_bwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                "_cross_entropy_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles Triton launches only on a GPU")
@pytest.mark.parametrize("dim", [64, 80], ids=["head32", "head40"])
def test_inductor_launches_the_kernels_from_its_own_code(dim):
    """The ops are triton_ops: Inductor's generated forward and backward call every one of the book's
    kernels directly and no ``torch.ops.minigpt`` op remains (each would be a Python dispatch per
    call: the host cost that made the compiled training step host-bound). Loss and gradients
    still match the PyTorch path, also for heads of 40 (run masked in a 64-wide tile: no pad copies),
    and no transposing copy sits between the attention kernels and the projections."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    ref, fast = _tiny("torch", dim), _tiny("triton", dim)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 37, (2, 11), device=DEV)
    targets = torch.randint(0, 37, (2, 11), device=DEV)
    compiled = torch.compile(fast, fullgraph=True)

    def step():
        _, loss = compiled(idx, targets)
        loss.backward()
        return loss

    # Inductor's own matmul padding (shape_padding) pads a matmul's rows when its benchmark says so, which
    # varies with the GPU's load; off, any constant_pad_nd left is a pad copy around our kernels.
    with torch._inductor.config.patch(shape_padding=False):
        loss, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "torch.ops.minigpt" not in code
    assert "constant_pad_nd" not in code
    assert "clone_transpose" not in code  # attention outputs and gradients in the projections' layout
    missing = [k for k in KERNEL_NAMES if k not in code]
    assert not missing, f"Inductor did not launch {missing} itself"
    _, loss_ref = ref(idx, targets)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_dynamo_explain_counts_one_graph():
    torch._dynamo.reset()
    model = _tiny("triton")
    idx = torch.randint(0, 37, (1, 9), device=DEV)
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_custom_op_fakes_agree_with_the_kernels():
    """torch.library.opcheck: schema, fake (meta) shapes/dtypes and autograd registration of each op."""
    from minigpt import ops
    from minigpt.rope import rope_cache

    def rnd(*shape):
        return torch.randn(*shape, device=DEV, requires_grad=True)

    x, w = rnd(3, 5, 24), rnd(24)
    q, k = rnd(1, 4, 2, 8), rnd(1, 4, 1, 8)
    cos, sin = rope_cache(4, 8, device=DEV)
    g, u = rnd(4, 10), rnd(4, 10)
    fq, fk, fv = rnd(1, 2, 16, 32), rnd(1, 2, 20, 32), rnd(1, 2, 20, 32)  # Tq < Tk: a cached prefix
    nq, nk, nv = rnd(1, 2, 16, 40), rnd(1, 1, 16, 40), rnd(1, 1, 16, 40)  # a head narrower than its tile
    h, lw = rnd(6, 8), rnd(50, 8)
    cases = [
        (ops._add_rms_norm, (x, rnd(3, 5, 24), w, 1e-6, torch.float32)),
        (ops._add_rms_norm, (x, rnd(3, 5, 24).half().detach().requires_grad_(), w, 1e-6, torch.float16)),
        (ops._add_rms_norm, (x, None, w, 1e-6, torch.float32)),
        (ops._swiglu_op, (g, u)),
        (ops._rope_qk, (q, k, cos, sin, False)),
        (ops._flash, (fq, fk, fv, True, 32**-0.5)),
        (ops._flash, (nq, nk, nv, True, 40**-0.5)),
        (ops._linear_ce, (h, lw, torch.randint(0, 50, (6,), device=DEV), -100, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_ops_rejects_unknown_kernels():
    from minigpt.ops import Ops

    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        Ops("cuda")


def test_triton_prefill_after_a_cached_prefix_matches_one_pass():
    """Two prefills through the KV cache (the second with Tq < Tk in the flash kernel) equal one pass."""
    from minigpt.attention import KVCache

    model = _tiny("triton").eval()
    idx = torch.randint(0, 37, (2, 13), device=DEV)
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = KVCache.for_model(model.config, 2, device=DEV)
        model.hidden_states(idx[:, :6], cache, 0)
        tail = model.hidden_states(idx[:, 6:], cache, 6)
    torch.testing.assert_close(tail, full[:, 6:], **TOL)
