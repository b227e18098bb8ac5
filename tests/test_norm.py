import pytest
import torch

from minigpt.norm import RMSNorm, make_norm


def reference(x, w, eps):
    x64 = x.double()
    return (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)) * w.double()


@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 37), (1, 1)])
def test_rmsnorm_matches_float64_formula(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    torch.testing.assert_close(norm(x).double(), reference(x, norm.weight, 1e-5), rtol=1e-5, atol=1e-5)


def test_rmsnorm_backward_matches_float64():
    torch.manual_seed(1)
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(33, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33))
    assert torch.autograd.gradcheck(lambda a: norm(a), (x,))
    gx = torch.randn(5, 33, dtype=torch.float64)
    norm(x).backward(gx)
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2, norm.weight.detach(), 1e-6).backward(gx)
    torch.testing.assert_close(x.grad, x2.grad)


def test_rmsnorm_keeps_low_precision_dtype_and_uses_fp32_stats():
    x = torch.full((2, 8), 300.0, dtype=torch.float16)  # x^2 = 9e4 overflows fp16 (max 65504)
    y = RMSNorm(8).half()(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.ones(2, 8), rtol=1e-3, atol=1e-3)


def test_equals_layernorm_on_zero_mean_input():
    torch.manual_seed(2)
    x = torch.randn(4, 64)
    x = x - x.mean(-1, keepdim=True)
    ln = torch.nn.LayerNorm(64, eps=1e-5, elementwise_affine=False)
    torch.testing.assert_close(RMSNorm(64, eps=1e-5)(x), ln(x), rtol=1e-5, atol=1e-5)


def test_make_norm_rejects_unknown():
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("groupnorm", 8, 1e-5)
