import pytest
import torch
import torch.nn.functional as F

from minigpt import MiniGPT, ModelConfig


def tiny(**kw):
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)
    return ModelConfig(**{**base, **kw})


CONFIGS = [
    dict(),
    dict(n_kv_heads=1, tie_embeddings=False),
    dict(norm="layernorm", norm_position="post", pos_encoding="learned", mlp="gelu", n_kv_heads=4),
    dict(pos_encoding="sinusoidal", attn_backend="naive"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_forward_loss_and_gradients(kw):
    torch.manual_seed(0)
    model = MiniGPT(tiny(**kw))
    idx = torch.randint(0, 61, (3, 17))
    targets = torch.randint(0, 61, (3, 17))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 17, 61)
    keep = targets != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_causality():
    torch.manual_seed(1)
    model = MiniGPT(tiny()).eval()
    idx = torch.randint(0, 61, (1, 12))
    a = model(idx)[0]
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 61
    b = model(idx2)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_embedding_shares_storage():
    model = MiniGPT(tiny())
    assert model.lm_head.weight is model.tok_emb.weight
    assert MiniGPT(tiny(tie_embeddings=False)).lm_head.weight is not MiniGPT(tiny()).tok_emb.weight


def test_too_long_input_raises():
    model = MiniGPT(tiny())
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        model(torch.zeros(41, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("kw", CONFIGS)
def test_greedy_generation_with_cache_equals_recompute(kw):
    torch.manual_seed(2)
    model = MiniGPT(tiny(**kw))
    prompt = torch.randint(0, 61, (2, 5))
    a = model.generate(prompt, 30, temperature=0)
    b = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 35) and torch.equal(a, b)
    # and greedy decoding really takes the argmax of a full forward pass at every step
    logits = model.eval()(a[:, :-1])[0]
    assert torch.equal(logits[:, 4:].argmax(-1), a[:, 5:])


@pytest.mark.parametrize("kw", CONFIGS)
def test_kv_cache_logits_equal_full_forward(kw):
    """Prefill in uneven chunks, then decode one token at a time: every position's logits equal
    those of one full forward pass. A cache position off by one (wrong RoPE angle or slot) fails here,
    where comparing greedy tokens of a random model can pass."""
    from minigpt.attention import KVCache

    torch.manual_seed(5)
    model = MiniGPT(tiny(**kw)).double().eval()
    idx = torch.randint(0, 61, (3, 23))
    full = model(idx)[0]
    cache = KVCache.for_model(model.config, 3, dtype=torch.float64)
    pieces, pos = [], 0
    for n in (7, 4, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1):
        pieces.append(model.lm_head(model.hidden_states(idx[:, pos : pos + n], cache, pos)))
        pos += n
    assert pos == idx.shape[1]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-8)


def test_generate_validation_and_eos():
    torch.manual_seed(3)
    model = MiniGPT(tiny())
    prompt = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(prompt, 36)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-1)
    first = model.generate(prompt, 1, temperature=0)[:, -1]
    out = model.generate(prompt, 10, temperature=0, eos_id=int(first[0]))
    assert (out[0, 5:] == first[0]).all()  # sequence 0 stops at once and is padded with EOS


def test_sampling_is_seeded():
    model = MiniGPT(tiny())
    prompt = torch.randint(0, 61, (1, 3))
    a = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_rejects_non_config():
    with pytest.raises(ValueError, match="needs a ModelConfig"):
        MiniGPT({"dim": 32})


def test_a_model_too_big_for_free_memory_is_refused_before_it_is_built(monkeypatch):
    """A typo'd max_seq_len of 10^8 asks for a 38 GB RoPE table: refused with the numbers, before any allocation."""
    from minigpt import model as model_module
    from minigpt import runtime

    small = ModelConfig.preset("tiny", vocab_size=64, max_seq_len=32)
    params, table = model_module._build_bytes(small)
    assert params == 4 * MiniGPT(small).num_params() and table == 12 * 32 * small.head_dim
    assert model_module._build_bytes(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=32, pos_encoding="learned"))[1] == 0
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 10**9)
    huge = ModelConfig.preset("small", max_seq_len=100_000_000)
    with pytest.raises(ValueError, match=r"needs 38\.5 GB of host memory to build .* rope position table of "
                                         r"max_seq_len=100,000,000\), more than the 1\.0 GB free here; lower max_seq_len"):
        MiniGPT(huge)
    MiniGPT(small)  # a model that fits is built
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: params + table - 1)
    with pytest.raises(ValueError, match="more than the"):
        MiniGPT(small)
