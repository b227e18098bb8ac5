"""``python -m minigpt generate`` continues past the model's context by sliding the window."""

import pytest
import torch

from minigpt import MiniGPT, ModelConfig
from minigpt.__main__ import generate_sliding, main
from minigpt.checkpoint import save_checkpoint
from minigpt.tokenizer import train_char

CTX = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=CTX)
    return MiniGPT(config).eval()


def _reference(model, idx, n):
    """nanoGPT's sampler, greedy: every token from a full forward over the last CTX tokens."""
    for _ in range(n):
        logits, _ = model(idx[:, -CTX:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len,n", [(3, 5), (3, 25), (CTX, 4), (CTX + 5, 7)])
def test_sliding_window_matches_nanogpt_sampler(model, prompt_len, n):
    idx = torch.randint(0, 11, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    new = generate_sliding(model, idx, n, temperature=0)
    assert new.shape == (2, n)
    assert torch.equal(new, _reference(model, idx, n)[:, prompt_len:])


def test_sliding_window_conditions_on_the_last_ctx_tokens(model, monkeypatch):
    """The logits past the context are those of the last CTX tokens, not fewer or more."""
    import minigpt.__main__ as cli

    seen = []
    real = cli.sample_next
    monkeypatch.setattr(cli, "sample_next", lambda logits, *a: seen.append(logits) or real(logits, *a))
    idx = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    full = torch.cat([idx, generate_sliding(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(0))], 1)
    assert len(seen) == 20 - (CTX - 5)
    for i, logits in enumerate(seen):
        end = CTX + i  # the token at position `end` is sampled from tokens [end - CTX, end)
        torch.testing.assert_close(logits, model(full[:, end - CTX : end])[0][:, -1], rtol=0, atol=1e-6)
        assert not torch.allclose(logits, model(full[:, end - CTX + 1 : end])[0][:, -1], atol=1e-4)


def test_sliding_window_is_seeded(model):
    idx = torch.zeros(1, 2, dtype=torch.long)
    a, b = (generate_sliding(model, idx, 30, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):  # the library's own check stays strict
        model.generate(idx, CTX)


def test_cli_generates_past_the_context(model, tmp_path, capsys):
    tok = train_char(["abcdefghij"])
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=CTX)
    m = MiniGPT(cfg)
    save_checkpoint(tmp_path / "ckpt.pt", {"model_config": cfg.to_dict(), "model": m.state_dict(), "tokenizer": tok.to_str(), "train_config": {}, "step": 0})
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "40", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("abc") and len(out) == 3 + 40 and set(out) <= set("abcdefghij")
