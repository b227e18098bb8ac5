import pytest
import torch

from minigpt.sampling import filter_logits, sample_next


def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 3, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        tok = sample_next(logits, temperature=1.5, top_k=3, generator=g)
        assert (allowed == tok[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.01))
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays


def test_top_p_never_samples_outside_the_nucleus():
    torch.manual_seed(2)
    logits = torch.randn(3, 40) * 3
    allowed = torch.isfinite(filter_logits(logits, top_p=0.6))
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        tok = sample_next(logits, top_p=0.6, generator=g)
        assert allowed.gather(1, tok[:, None]).all()


def test_greedy_and_errors():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-0.1)
