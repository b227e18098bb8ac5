import math

import pytest
import torch

from minigpt.rope import apply_rope, apply_rope_interleaved, interleaved_to_half, rope_cache, rope_frequencies


def test_cache_shapes_and_values():
    cos, sin = rope_cache(11, 8, theta=100.0)
    assert cos.shape == sin.shape == (11, 4) and cos.dtype == torch.float32
    p, i = 7, 3
    angle = p * 100.0 ** (-2 * i / 8)
    assert cos[p, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sin[p, i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_apply_rope_matches_complex_rotation_float64():
    torch.manual_seed(0)
    B, T, H, D = 2, 9, 3, 10
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    cos, sin = rope_cache(T, D, dtype=torch.float64)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])  # rotate-half pairs (i, i + D/2)
    rotated = z * torch.complex(cos, sin)[:, None, :]
    want = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), want)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    D = 16
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cos, sin = rope_cache(64, D, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, D), cos[m:m + 1], sin[m:m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, D), cos[n:n + 1], sin[n:n + 1]).flatten()
        return (qm @ kn).item()

    for delta in (0, 3, 17):
        values = [score(m + delta, m) for m in (0, 5, 40)]
        assert max(values) - min(values) < 1e-10
    assert abs(score(10, 3) - score(10, 4)) > 1e-6


def test_matches_hugging_face_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(2)
    B, T, H, D = 2, 7, 3, 12
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    cos, sin = rope_cache(T, D, theta=500.0)
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hq.transpose(1, 2))
    torch.testing.assert_close(apply_rope(k, cos, sin), hk.transpose(1, 2))


def test_interleaved_layout_equivalent_after_weight_permutation():
    torch.manual_seed(3)
    H, D, dim, T = 2, 8, 16, 5
    W = torch.randn(H * D, dim, dtype=torch.float64)
    x = torch.randn(1, T, dim, dtype=torch.float64)
    cos, sin = rope_cache(T, D, dtype=torch.float64)

    def scores(y):  # [1, T, H, D] -> per-head [1, H, T, T] dot products between positions
        y = y.transpose(1, 2)
        return y @ y.transpose(-1, -2)

    inter = apply_rope_interleaved((x @ W.T).view(1, T, H, D), cos, sin)
    half = apply_rope((x @ interleaved_to_half(W, H).T).view(1, T, H, D), cos, sin)
    # the same features, reordered within each head: attention scores agree
    torch.testing.assert_close(scores(inter), scores(half))
    wrong = apply_rope((x @ W.T).view(1, T, H, D), cos, sin)
    assert not torch.allclose(scores(inter), scores(wrong))


def test_scaling_variants():
    D = 16
    base = rope_frequencies(D, 10000.0)
    lin = rope_frequencies(D, 10000.0, {"type": "linear", "factor": 4.0})
    ntk = rope_frequencies(D, 10000.0, {"type": "ntk", "factor": 4.0})
    torch.testing.assert_close(lin, base / 4)
    assert ntk[0] == pytest.approx(base[0].item())  # fastest pair unchanged
    assert ntk[-1].item() == pytest.approx(base[-1].item() / 4, rel=1e-5)  # slowest slowed by the factor


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rope_cache(8, 7), "even"),
        (lambda: rope_cache(0, 8), "seq_len"),
        (lambda: rope_frequencies(8, scaling={"type": "yarn", "factor": 2}), "unknown RoPE scaling"),
        (lambda: rope_frequencies(8, scaling={"type": "linear", "factor": 0.5}), ">= 1"),
        (lambda: apply_rope(torch.randn(2, 4, 8), *rope_cache(4, 8)), r"\[B, T, H, D\]"),
        (lambda: apply_rope(torch.randn(1, 5, 2, 8), *rope_cache(4, 8)), "slice the cache"),
        (lambda: interleaved_to_half(torch.randn(10, 4), 2), "even head_dim"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
