"""Int8 weight-only quantization against float64 references, on odd sizes, forward and backward."""

import pytest
import torch
import torch.nn as nn

from minigpt import MiniGPT, ModelConfig
from minigpt.quantize import Int8Embedding, Int8Linear, dequantize_weight, quantize_int8, quantize_weight, weight_bytes


def _reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 in float64, written independently of the library."""
    w = w.double()
    scale = w.abs().max(dim=1).values / 127.0
    q = torch.zeros_like(w)
    nz = scale > 0
    q[nz] = torch.round(w[nz] / scale[nz, None])
    return q, scale


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 5), (64, 129)])
def test_quantize_weight_matches_float64_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.logspace(-3, 1, shape[0])[:, None]  # rows of very different sizes
    q, scale = quantize_weight(w)
    q_ref, scale_ref = _reference_quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    assert (q.double() - q_ref).abs().max() <= 1  # a tie at .5 may round either way in fp32 vs fp64
    err = (dequantize_weight(q, scale).double() - w.double()).abs()
    assert bool((err <= scale.double()[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()), "error exceeds half a step"
    assert bool((q.abs().amax(dim=1) == 127).all()), "every row must use the full int8 range"


def test_per_channel_beats_per_tensor_when_rows_differ():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    w[0] *= 100  # one outlier row sets the per-tensor step
    errors = {}
    for per_channel in (True, False):
        q, s = quantize_weight(w, per_channel=per_channel)
        errors[per_channel] = (dequantize_weight(q, s) - w)[1:].abs().mean().item()
    assert errors[True] * 50 < errors[False]


def test_zero_rows_and_bad_input():
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    q, s = quantize_weight(w)
    assert s[0] == 0 and s[2] == 0 and not q[0].any()
    torch.testing.assert_close(dequantize_weight(q, s)[0], torch.zeros(4))
    for bad in (torch.zeros(4), torch.zeros(2, 3, 4), torch.zeros(3, 3, dtype=torch.long), [[1.0]]):
        with pytest.raises(ValueError, match="2-D floating-point"):
            quantize_weight(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_linear_forward_backward_against_reference(dtype):
    torch.manual_seed(2)
    lin = nn.Linear(37, 19, bias=False)
    qlin = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    w_ref = dequantize_weight(qlin.qweight, qlin.scale, torch.float64)
    x_ref = x.detach().double().requires_grad_(True)
    y, y_ref = qlin(x), x_ref @ w_ref.T
    assert y.dtype == dtype and y.shape == (3, 5, 19)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    y.backward(g.to(dtype))
    y_ref.backward(g)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qlin.weight, w_ref.float())


def test_int8_embedding_against_reference():
    torch.manual_seed(3)
    emb = nn.Embedding(11, 6)
    qemb = quantize_int8(nn.Sequential(emb))[0]
    assert isinstance(qemb, Int8Embedding)
    idx = torch.tensor([[0, 10, 3], [3, 3, 7]])
    want = dequantize_weight(qemb.qweight, qemb.scale, torch.float64)[idx]
    torch.testing.assert_close(qemb(idx).double(), want, rtol=1e-6, atol=1e-7)


def test_quantize_int8_model_shares_the_tied_matrix_and_stays_close():
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=32)
    model = MiniGPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        want, _ = model(idx)
    float_bytes = weight_bytes(model)
    quantize_int8(model)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert model.lm_head.qweight is model.tok_emb.qweight and model.lm_head.scale is model.tok_emb.scale
    with torch.no_grad():
        got, _ = model(idx)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.03, f"int8 logits differ by {rel:.3%} from fp32"
    # bytes: int8 per matmul weight, fp32 per row scale and per norm weight; the tied matrix once
    n_matmul = cfg.matmul_params()
    rows = cfg.vocab_size + cfg.n_layers * (3 * cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim + 2 * cfg.ffn_dim)  # q k v o gate up down
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert weight_bytes(model) == n_matmul + 4 * rows + 4 * norms
    assert float_bytes == 4 * cfg.num_params()
    out = model.generate(idx[:, :5], 4, temperature=0)  # the model still generates (reads .weight.dtype)
    assert out.shape == (2, 9)


def test_medium_preset_sizes_on_meta():
    with torch.device("meta"):
        model = MiniGPT(ModelConfig.preset("medium"))
    assert model.num_params() == 111_949_440 and weight_bytes(model) == 4 * 111_949_440
    quantize_int8(model)
    assert 111_949_440 < weight_bytes(model) < 1.01 * 111_949_440


def test_quantize_int8_errors():
    with pytest.raises(ValueError, match=r"nn\.Module"):
        quantize_int8("model")
    with pytest.raises(ValueError, match="from_linear"):
        quantize_int8(nn.Linear(3, 3, bias=False))
    with pytest.raises(ValueError, match="bias"):
        quantize_int8(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(quantize_int8(nn.Sequential(nn.Linear(3, 3, bias=False))))
    with pytest.raises(ValueError, match="int8 qweight"):
        Int8Linear(torch.zeros(3, 3), torch.ones(3))
