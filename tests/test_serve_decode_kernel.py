"""Paged split-KV decode attention (Triton: compiled on a GPU, else the interpreter; and the PyTorch path)
vs a float64 reference."""

import math

import pytest
import torch

from minigpt.kernels.decode_attention import num_splits, paged_decode_attention, paged_decode_attention_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel runs


def _triton(*args, **kwargs):
    """paged_decode_attention on DEV, the result back on the CPU."""
    return paged_decode_attention(*(a.to(DEV) for a in args), **kwargs).cpu()


def _reference(q, kc, vc, tables, lens):
    """Per row: gather the row's keys in order, plain softmax attention in float64."""
    B, H, D = q.shape
    bs, Hkv = kc.shape[1], kc.shape[2]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        blocks = tables[b, :math.ceil(L / bs)].long()
        k = kc[blocks].reshape(-1, Hkv, D)[:L].double()
        v = vc[blocks].reshape(-1, Hkv, D)[:L].double()
        for h in range(H):
            kv = h // (H // Hkv)
            p = torch.softmax(k[:, kv] @ q[b, h].double() / math.sqrt(D), dim=0)
            out[b, h] = p @ v[:, kv]
    return out


def _case(B, H, Hkv, D, bs, lens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(L / bs) for L in lens) + 1  # one padding column
    nb = B * max_blocks + 3
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(nb - 1, generator=g)[:B * max_blocks] + 1  # scattered, disjoint blocks
    tables = perm.view(B, max_blocks).int()
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("B,H,Hkv,D,bs,lens", [
    (3, 6, 2, 24, 4, [1, 7, 19]),  # GQA 3:1, odd head dim, lengths inside and at block edges
    (2, 4, 4, 16, 8, [8, 13]),  # MHA
    (2, 5, 1, 8, 2, [3, 11]),  # MQA, odd group size
])
def test_triton_and_torch_paths_match_float64(B, H, Hkv, D, bs, lens):
    q, kc, vc, tables, cl = _case(B, H, Hkv, D, bs, lens)
    ref = _reference(q, kc, vc, tables, cl)
    torch.testing.assert_close(paged_decode_attention_torch(q, kc, vc, tables, cl).double(), ref, rtol=1e-5, atol=1e-5)
    for splits in (None, 1, 3):
        out = _triton(q, kc, vc, tables, cl, splits=splits)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp16_inputs():
    q, kc, vc, tables, cl = _case(2, 4, 2, 16, 4, [5, 9], dtype=torch.float16)
    ref = _reference(q, kc, vc, tables, cl)
    torch.testing.assert_close(_triton(q, kc, vc, tables, cl).double(), ref, rtol=2e-3, atol=2e-3)


def test_num_splits_covers_every_block():
    for B, Hkv, M in [(1, 3, 64), (64, 3, 64), (5, 1, 7), (1, 1, 1)]:
        S, per = num_splits(B, Hkv, M)
        assert S * per >= M and (S - 1) * per < M and S >= 1


def test_bad_inputs_raise():
    q, kc, vc, tables, cl = _case(2, 4, 2, 16, 4, [5, 9])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        _triton(q[:, :3], kc, vc, tables, cl)
    with pytest.raises(ValueError, match="block_tables"):
        _triton(q, kc, vc, tables[:1], cl)
    with pytest.raises(ValueError, match="power-of-two"):
        _triton(q, kc[:, :3], vc[:, :3], tables, cl)
