import torch
import torch.nn.functional as F

from minigpt.ffn import GeluMLP, SwiGLU


def test_swiglu_matches_float64_formula_and_grads():
    torch.manual_seed(0)
    ffn = SwiGLU(24, 70).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    g, u, d = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    gate = x @ g.T
    want = (gate * torch.sigmoid(gate) * (x @ u.T)) @ d.T
    torch.testing.assert_close(ffn(x), want)
    assert torch.autograd.gradcheck(lambda a: ffn(a), (x,))


def test_gelu_mlp_matches_formula():
    torch.manual_seed(1)
    mlp = GeluMLP(16, 64)
    x = torch.randn(4, 16)
    want = F.gelu(x @ mlp.up_proj.weight.T) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want)


def test_equal_parameters_at_8_3_width():
    swiglu = sum(p.numel() for p in SwiGLU(384, 1024).parameters())
    gelu = sum(p.numel() for p in GeluMLP(384, 4 * 384).parameters())
    assert swiglu == gelu
