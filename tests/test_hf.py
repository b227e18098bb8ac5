import json

import pytest
import torch

from minigpt import MiniGPT, ModelConfig
from minigpt.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

PARITY = [
    dict(n_heads=4, n_kv_heads=4, tie_embeddings=True),  # MHA, tied
    dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),  # GQA, untied
    dict(n_heads=4, n_kv_heads=1, rope_theta=500.0),  # MQA, other theta
    dict(n_heads=4, n_kv_heads=2, rope_scaling="linear", rope_scaling_factor=2.0),
    dict(n_heads=4, n_kv_heads=2, rope_scaling="ntk", rope_scaling_factor=4.0),
]


@pytest.mark.parametrize("kw", PARITY)
def test_llama_parity_and_round_trip(kw, tmp_path):
    torch.manual_seed(0)
    model = MiniGPT(ModelConfig(vocab_size=97, dim=64, n_layers=3, max_seq_len=128, ffn_dim=160, **kw)).eval()
    save_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 100))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
        assert (ours - theirs).abs().max().item() < 1e-4
        back = load_hf(tmp_path)
        assert torch.equal(back(idx)[0], ours)
    assert back.config.tie_embeddings == model.config.tie_embeddings


def test_export_rejects_non_llama_switches(tmp_path):
    model = MiniGPT(ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, norm="layernorm", mlp="gelu"))
    with pytest.raises(ValueError, match=r"norm='layernorm'.*mlp='gelu'"):
        save_hf(model, tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only Llama"):
        load_hf(tmp_path)
