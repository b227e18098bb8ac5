import itertools

import pytest
import torch

from minigpt import MiniGPT, ModelConfig
from minigpt.config import swiglu_ffn_dim


def test_presets_match_reference_design():
    tiny, small, medium = (ModelConfig.preset(n) for n in ("tiny", "small", "medium"))
    assert (tiny.n_layers, tiny.dim, tiny.n_heads, tiny.n_kv_heads) == (8, 128, 4, 1)
    assert (small.n_layers, small.dim, small.n_heads, small.n_kv_heads) == (12, 384, 12, 3)
    assert (medium.n_layers, medium.dim, medium.n_heads, medium.n_kv_heads, medium.ffn_dim) == (20, 640, 16, 4, 2048)
    for c in (tiny, small, medium):
        assert c.vocab_size == 20000 and c.mlp == "swiglu" and c.pos_encoding == "rope" and c.tie_embeddings


def test_ffn_dim_rule():
    assert swiglu_ffn_dim(384) == 1024  # 8/3 * 384 = 1024 exactly
    assert swiglu_ffn_dim(100) == 320  # 266.7 rounded up to a multiple of 64
    assert ModelConfig(dim=64, n_heads=4, mlp="gelu").ffn_dim == 256
    assert ModelConfig.preset("small", ffn_dim=1000).ffn_dim == 1000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=100, n_heads=12), "not divisible by n_heads"),
        (dict(dim=96, n_heads=12, n_kv_heads=5), "not divisible by n_kv_heads"),
        (dict(dim=36, n_heads=12), "head_dim"),
        (dict(norm="batchnorm"), "norm='batchnorm'"),
        (dict(mlp="relu"), "mlp="),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(n_layers=-1), "n_layers must be a positive integer"),
        (dict(dropout=1.5), "dropout"),
        (dict(pos_encoding="learned", rope_scaling="linear", rope_scaling_factor=2.0), "rope_scaling only"),
        (dict(kernels="cuda"), "kernels="),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.preset("tiny", width=3)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"dim": 64, "colour": "red"})


def test_dict_round_trip():
    c = ModelConfig.preset("tiny", rope_scaling="ntk", rope_scaling_factor=4.0)
    assert ModelConfig.from_dict(c.to_dict()) == c


SWITCHES = list(itertools.product(["rmsnorm", "layernorm"], ["pre", "post"], ["rope", "learned", "sinusoidal"],
                                  ["swiglu", "gelu"], [True, False], [4, 2, 1]))


@pytest.mark.parametrize("norm, pos, enc, mlp, tie, kv", SWITCHES)
def test_num_params_exact_for_every_switch(norm, pos, enc, mlp, tie, kv):
    c = ModelConfig(vocab_size=53, dim=24, n_layers=2, n_heads=4, n_kv_heads=kv, max_seq_len=17, norm=norm,
                    norm_position=pos, pos_encoding=enc, mlp=mlp, tie_embeddings=tie)
    assert c.num_params() == sum(p.numel() for p in MiniGPT(c).parameters())


def test_flops_per_token_matches_flop_counter():
    """Forward+backward FLOPs counted by PyTorch equal the formula (no attention dropout/mask FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=16,
                    attn_backend="naive")
    model = MiniGPT(c)
    idx = torch.randint(0, 64, (2, 16))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    per_token = counter.get_total_flops() / idx.numel()
    assert per_token == pytest.approx(c.flops_per_token(16), rel=1e-9)


def test_flops_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len must be positive"):
        ModelConfig.preset("tiny").flops_per_token(0)
