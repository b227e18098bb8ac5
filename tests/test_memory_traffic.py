"""Tests for minigpt.memory_traffic: the eager traffic counter and the attention IO formulas."""

import pytest
import torch
import torch.nn.functional as F

from minigpt.memory_traffic import (
    TrafficCounter,
    flash_attention_hbm_bytes,
    standard_attention_hbm_bytes,
    tensor_bytes,
)


def test_counter_swiglu_forward_and_backward_passes():
    torch.manual_seed(0)
    g = torch.randn(7, 13, requires_grad=True)
    u = torch.randn(7, 13, requires_grad=True)
    one = g.numel() * g.element_size()
    with TrafficCounter() as fwd:
        y = F.silu(g) * u
    assert [o.name for o in fwd.ops] == ["silu", "mul"]
    assert (fwd.read, fwd.written) == (3 * one, 2 * one)
    dy = torch.randn_like(y)
    with TrafficCounter() as bwd:
        y.backward(dy)
    assert sorted(o.name for o in bwd.ops) == ["mul", "mul", "silu_backward"]
    assert (bwd.read, bwd.written) == (6 * one, 3 * one)


@pytest.mark.parametrize("n,d", [(10, 8), (33, 16)])
def test_counter_matches_standard_attention_formula(n, d):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, n, d, dtype=torch.float64) for _ in range(3))
    with TrafficCounter() as c:
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    assert c.total == standard_attention_hbm_bytes(n, d, elem_bytes=8)


def test_views_are_free_and_broadcasts_count_once():
    x = torch.randn(4, 6)
    with TrafficCounter() as c:
        x.t().reshape(24)  # transpose is a view; flattening the transposed tensor copies
        x[:, :1].expand(4, 6).clone()
    assert [o.name for o in c.ops] == ["clone", "clone"]
    assert c.ops[0].read == c.ops[0].written == 96
    assert tensor_bytes(torch.ones(3, 1).expand(3, 5)) == 12
    assert c.ops[1].read == 16 and c.ops[1].written == 96


def test_in_place_ops():
    x = torch.zeros(5)
    with TrafficCounter() as c:
        x.fill_(2.0)
        x.mul_(torch.full((5,), 3.0))
    assert [(o.name, o.read, o.written) for o in c.ops if o.name != "full"] == [("fill_", 0, 20), ("mul_", 40, 20)]


def _tally_tiles(n, d, bm, bn, order, causal, eb, sb):
    """Walk the tile loops of the forward and add up every slice moved (independent of the formula)."""
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    q_blocks = [(i, min(i + bm, n)) for i in range(0, n, bm)]
    kv_blocks = [(j, min(j + bn, n)) for j in range(0, n, bn)]
    visit = lambda qb, kb: bool(allowed[qb[0]:qb[1], kb[0]:kb[1]].any())
    total = 0
    if order == "fa2":
        for qb in q_blocks:
            r = qb[1] - qb[0]
            total += r * d * eb  # Q_i
            for kb in kv_blocks:
                if visit(qb, kb):
                    total += 2 * (kb[1] - kb[0]) * d * eb  # K_j, V_j
            total += r * d * eb + r * sb  # O_i, lse_i
    else:
        total += n * d * eb + 2 * n * sb  # O = 0, m = -inf, l = 0 in HBM
        for kb in kv_blocks:
            total += 2 * (kb[1] - kb[0]) * d * eb
            for qb in q_blocks:
                if visit(qb, kb):
                    r = qb[1] - qb[0]
                    total += r * (2 * d * eb + 2 * sb)  # read Q_i, O_i, m_i, l_i
                    total += r * (d * eb + 2 * sb)  # write O_i, m_i, l_i
    return total


@pytest.mark.parametrize("order", ["fa1", "fa2"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,d,bm,bn", [(37, 16, 8, 4), (64, 32, 16, 16), (50, 8, 16, 32), (5, 4, 64, 64)])
def test_flash_formula_matches_tile_walk(order, causal, n, d, bm, bn):
    got = flash_attention_hbm_bytes(n, d, bm, bn, order=order, causal=causal, elem_bytes=2, stat_bytes=4)
    assert got == _tally_tiles(n, d, bm, bn, order, causal, 2, 4)


def test_flash_traffic_is_quadratic_not_linear():
    small = flash_attention_hbm_bytes(8192, 128, 128, 64)
    big = flash_attention_hbm_bytes(16384, 128, 128, 64)
    assert 3.9 < big / small < 4.0
    one_block = flash_attention_hbm_bytes(100, 64, 128, 128)
    assert one_block == 4 * 100 * 64 * 2 + 100 * 4  # Q, K, V, O once plus the LSE
    assert flash_attention_hbm_bytes(4096, 64, 128, 64) < standard_attention_hbm_bytes(4096, 64)


@pytest.mark.parametrize("kwargs", [dict(seq_len=0), dict(head_dim=-1), dict(block_m=1.5), dict(order="fa3")])
def test_bad_arguments_raise(kwargs):
    args = dict(seq_len=16, head_dim=8, block_m=4, block_n=4) | kwargs
    with pytest.raises(ValueError):
        flash_attention_hbm_bytes(**args)
    with pytest.raises(ValueError):
        standard_attention_hbm_bytes(0, 8)
