"""Tests for the measurement layer's counts: `measure.saved_tensors` against hand counts,
`measure.attention_flops(exact=True)` against torch's FLOP counter, and the card table of `runtime`."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt import measure, runtime
from minigpt.attention import naive_attention


def _sizes(saved):
    return sorted((s.nbytes, s.numel) for s in saved.values())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """`round_ratios` round by round; `paired_ratio` their median; both refuse series that do not pair."""
    # per round 2, 4, 3: the median of the ratios (3), not the ratio of the medians (4 / 1 = 4) or of the means
    assert measure.round_ratios([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == [2.0, 4.0, 3.0]
    assert measure.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0
    with pytest.raises(ValueError, match="equally long"):
        measure.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        measure.paired_ratio([], [])


def test_saved_tensors_of_a_product_and_a_relu_by_hand():
    """x * w saves both factors; a ReLU saves its output; an excluded parameter drops out."""
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5))
    assert _sizes(measure.saved_tensors(lambda: x * w)) == [(20, 5), (60, 15)]
    assert _sizes(measure.saved_tensors(lambda: x * w, exclude=[w])) == [(60, 15)]
    out = {}

    def relu():
        out["y"] = torch.relu(x)

    saved = measure.saved_tensors(relu)
    assert list(saved) == [out["y"].untyped_storage().data_ptr()]  # the output, not the input
    assert _sizes(saved) == [(60, 15)]
    assert measure.saved_tensors(lambda: torch.relu(x.detach())) == {}  # nothing needs a backward


def test_saved_tensors_counts_one_storage_once_and_whole():
    """Two views of one buffer, saved by two ops, are one storage of the buffer's full size, in the
    saved dtype's elements; a parameter saved as a view (a transposed weight) is still excluded."""
    buf = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a, b = buf[:, :3], buf[:, 3:]
    saved = measure.saved_tensors(lambda: (a * b).sum())
    assert len(saved) == 1 and _sizes(saved) == [(4 * 6 * 8, 24)]
    lin = torch.nn.Linear(6, 2, bias=False)
    x = torch.randn(7, 6, requires_grad=True)
    assert _sizes(measure.saved_tensors(lambda: lin(x), exclude=lin.parameters())) == [(7 * 6 * 4, 42)]


def _attention_by_rows(q, k, v):
    """Causal attention computed one query at a time against only the keys it may see (queries at
    the end of the keys): the matmuls FlopCounterMode sees are the unmasked pairs exactly."""
    tq, tk = q.shape[-2], k.shape[-2]
    rows = []
    for i in range(tq):
        seen = tk - tq + i + 1
        s = q[..., i : i + 1, :] @ k[..., :seen, :].transpose(-1, -2) / math.sqrt(q.shape[-1])
        rows.append(torch.softmax(s, dim=-1) @ v[..., :seen, :])
    return torch.cat(rows, dim=-2)


@pytest.mark.parametrize("q_len,kv_len", [(1, 20), (5, 5), (7, 16), (3, 3)])
def test_exact_causal_attention_flops_match_the_flop_counter(q_len, kv_len):
    b, h, d = 2, 3, 8
    q = torch.randn(b, h, q_len, d)
    k, v = torch.randn(b, h, kv_len, d), torch.randn(b, h, kv_len, d)
    with FlopCounterMode(display=False) as counter:
        _attention_by_rows(q, k, v)
    exact = measure.attention_flops(b, h, q_len, d, kv_len=kv_len, exact=True)
    assert counter.get_total_flops() == exact
    # against the default (FlashAttention papers') convention: half a pair more per query
    assert exact - measure.attention_flops(b, h, q_len, d, kv_len=kv_len) == 4 * b * h * d * q_len / 2
    # a decode step (one query) sees every key: the full score matrix of masked attention is the exact count
    if q_len == 1:
        with FlopCounterMode(display=False) as full:
            naive_attention(q, k, v, causal=True)
        assert full.get_total_flops() == exact
    # exact changes nothing without a causal mask
    assert measure.attention_flops(b, h, q_len, d, causal=False, kv_len=kv_len, exact=True) == 4 * b * h * q_len * kv_len * d


def test_card_table_feeds_peak_flops():
    h100 = runtime.card_spec("NVIDIA H100 80GB HBM3")
    assert (h100.name, h100.sms, h100.smem_kb_per_sm, h100.hbm_tbs) == ("H100 SXM", 132, 228, 3.35)
    assert runtime.card_spec("NVIDIA A100-SXM4-40GB").hbm_tbs == 1.555
    assert runtime.card_spec("NVIDIA A100-SXM4-80GB").hbm_tbs == 2.039  # not the 40 GB card's
    assert runtime.card_spec("NVIDIA H200").hbm_tbs == 4.8
    assert runtime.card_spec("NVIDIA H200").l2_mb == 60  # chapter 6 prints the H200's own 61,440 KiB
    assert runtime.card_spec("NVIDIA H100 NVL").name == "H100 NVL" and runtime.card_spec("NVIDIA L40").name == "L40"
    for name in ("H100 SXM", "A100 40GB", "L40S"):  # the table's own card names, as chapter 6 passes them
        assert runtime.card_spec(name).name == name
    assert runtime.card_spec("cpu") is None
    for key, spec in runtime._CARDS:
        assert runtime.peak_flops(f"NVIDIA {key}") == spec.bf16_tflops * 1e12
