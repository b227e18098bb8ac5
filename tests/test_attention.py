import math

import pytest
import torch

from minigpt import ModelConfig
from minigpt.attention import Attention, KVCache, kv_cache_bytes, naive_attention, sdpa_attention


def reference_attention(q, k, v, causal):
    """float64, K/V explicitly repeated per query head, explicit causal mask (bottom-right aligned)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("fn", [naive_attention, sdpa_attention])
@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("tq, tk", [(37, 37), (1, 19), (5, 23)])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_match_repeat_kv_reference(fn, H, Hkv, tq, tk, causal):
    torch.manual_seed(0)
    q = torch.randn(2, H, tq, 16, requires_grad=True)
    k = torch.randn(2, Hkv, tk, 16, requires_grad=True)
    v = torch.randn(2, Hkv, tk, 16, requires_grad=True)
    out = fn(q, k, v, causal=causal)
    want = reference_attention(q, k, v, causal)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exp = torch.autograd.grad(want, (q, k, v), grad.double())
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_naive_does_not_repeat_kv(monkeypatch):
    calls = []
    original = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: calls.append(1) or original(*a, **k))
    naive_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    assert not calls


def test_kv_cache_bytes_formula_matches_allocation():
    c = ModelConfig(vocab_size=10, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=29)
    cache = KVCache.for_model(c, batch_size=5, dtype=torch.float16)
    assert cache.nbytes == kv_cache_bytes(3, 29, 2, 8, bytes_per_element=2, batch=5)
    assert kv_cache_bytes(32, 4096, 32, 128, 2) == 2 * 32 * 4096 * 32 * 128 * 2  # Llama-2-7B, fp16
    with pytest.raises(ValueError, match="non-negative int"):
        kv_cache_bytes(2, -1, 1, 8)


def test_kv_cache_overflow_and_batch_errors():
    cache = KVCache(1, 2, 1, 4, 8)
    with pytest.raises(ValueError, match="overflows"):
        cache.update(0, 3, torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    with pytest.raises(ValueError, match="batch"):
        cache.update(0, 0, torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8))


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_attention_module_incremental_equals_full(backend):
    torch.manual_seed(1)
    c = ModelConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16, attn_backend=backend)
    attn = Attention(c).eval()
    from minigpt.rope import rope_cache

    cos, sin = rope_cache(16, c.head_dim)
    x = torch.randn(2, 11, 32)
    full = attn(x, cos[:11], sin[:11])
    cache = KVCache.for_model(c, 2)
    first = attn(x[:, :6], cos[:6], sin[:6], cache, 0)
    rest = [attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache, t) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)
