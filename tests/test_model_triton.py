"""kernels="triton" routes norm, RoPE, SwiGLU, attention and the loss through minigpt.kernels:
logits, loss and every gradient match the PyTorch path (fp32; on CPU through the interpreter)."""

import pytest
import torch

from minigpt import MiniGPT, ModelConfig


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
    torch.testing.assert_close(logits, logits_ref, **tol)
    torch.testing.assert_close(loss, loss_ref, **tol)
    loss_ref.backward()
    loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **tol, msg=lambda m: f"{name}: {m}")


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
