"""minigpt.design: the parameter split against the real modules and hand counts, matched shapes,
and the Chinchilla arithmetic."""

import math

import pytest
import torch

from minigpt import MiniGPT, ModelConfig
from minigpt.design import (
    ParamBudget,
    chinchilla_tokens,
    compute_optimal,
    param_budget,
    training_flops,
    width_for_depth,
)

CONFIGS = [
    ModelConfig.preset("tiny"),
    ModelConfig.preset("small", tie_embeddings=False),
    ModelConfig.preset("medium"),
    ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=100),
    ModelConfig(vocab_size=61, dim=40, n_layers=2, n_heads=4, mlp="gelu", norm="layernorm",
                pos_encoding="learned", max_seq_len=33, tie_embeddings=False),
    ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, norm_position="post", pos_encoding="sinusoidal"),
]


def _role(name: str) -> str:
    if name.startswith(("tok_emb", "pos_emb", "lm_head")):
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    raise AssertionError(f"unclassified parameter {name}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.n_layers}x{c.dim}-{c.mlp}-{c.norm}-{c.pos_encoding}-tie{c.tie_embeddings}")
def test_budget_matches_the_modules(cfg):
    with torch.device("meta"):
        model = MiniGPT(cfg)
    counted = dict.fromkeys(("embedding", "attention", "mlp", "norms"), 0)
    for name, p in model.named_parameters():  # a tied head is the same tensor: named once
        counted[_role(name)] += p.numel()
    budget = param_budget(cfg)
    assert budget == ParamBudget(**counted)
    assert budget.total == cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert math.isclose(sum(budget.shares().values()), 1.0)


def test_budget_hand_counts():
    # small: 12 blocks of d=384, 12 heads of 32, 3 KV heads, ffn 1024, V=20000, tied.
    b = param_budget(ModelConfig.preset("small"))
    assert b.embedding == 20000 * 384
    assert b.attention == 12 * (2 * 384 * 384 + 2 * 384 * 96)
    assert b.mlp == 12 * 3 * 384 * 1024
    assert b.norms == 25 * 384
    assert (b.total, b.non_embedding) == (26_269_056, 18_589_056)
    # Llama-2-7B: 32 x 4096, MHA, ffn 11008, V=32000, untied: the published 6,738,415,616.
    llama = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, tie_embeddings=False, max_seq_len=4096)
    assert param_budget(llama).total == 6_738_415_616
    assert param_budget(llama).embedding == 2 * 32000 * 4096


def test_budget_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    for tie in (True, False):
        cfg = ModelConfig(vocab_size=101, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=160, tie_embeddings=tie)
        hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                                          num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=tie)
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(hf_cfg)
        assert param_budget(cfg).total == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
@pytest.mark.parametrize("head_dim, gqa", [(64, 4), (32, 4), (64, 1), (48, 3)])
def test_width_for_depth_matches_the_budget(n_layers, head_dim, gqa):
    target = 18_589_056
    cfg = width_for_depth(n_layers, target, head_dim=head_dim, gqa_ratio=gqa)
    assert cfg.n_layers == n_layers and cfg.head_dim == head_dim
    assert cfg.n_heads == gqa * cfg.n_kv_heads
    assert cfg.ffn_dim % 32 == 0
    # The FFN is solved for the target, so the only error is its rounding: at most 16 units of 3*d per block.
    got = param_budget(cfg).non_embedding
    assert abs(got - target) <= n_layers * 3 * cfg.dim * 16
    assert abs(got / target - 1) < 0.02


def test_width_for_depth_reproduces_small_and_the_sweep_shapes():
    target = param_budget(ModelConfig.preset("small")).non_embedding
    shapes = {L: width_for_depth(L, target, head_dim=32) for L in (4, 6, 12, 24)}
    got = {L: (c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim) for L, c in shapes.items()}
    assert got == {4: (640, 20, 5, 1888), 6: (512, 16, 4, 1600), 12: (384, 12, 3, 1024), 24: (256, 8, 2, 800)}
    assert width_for_depth(12, target, head_dim=32) == ModelConfig.preset("small")


def test_width_for_depth_overrides_and_deeper_is_thinner():
    a = width_for_depth(8, 10_000_000, vocab_size=50, tie_embeddings=False)
    b = width_for_depth(8, 10_000_000, vocab_size=20000)
    assert (a.dim, a.ffn_dim) == (b.dim, b.ffn_dim) and a.vocab_size == 50 and not a.tie_embeddings
    gelu = width_for_depth(8, 10_000_000, mlp="gelu", norm="layernorm")
    assert gelu.mlp == "gelu" and abs(param_budget(gelu).non_embedding / 1e7 - 1) < 0.02
    dims = [width_for_depth(L, 50_000_000).dim for L in (2, 4, 8, 16, 32)]
    assert dims == sorted(dims, reverse=True) and dims[0] > dims[-1]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((64, 100_000), {}, "cannot hold 64 blocks"),
        ((0, 100_000), {}, "n_layers must be a positive integer"),
        ((4, -5), {}, "non_embedding_params must be a positive integer"),
        ((4, 100_000), {"head_dim": 0}, "head_dim must be a positive integer"),
        ((4, 100_000), {"ffn_ratio": 0.0}, "ffn_ratio must be positive"),
        ((4, 100_000), {"dim": 128}, "chooses ['dim']"),
    ],
)
def test_width_for_depth_errors(args, kwargs, message):
    with pytest.raises(ValueError) as err:
        width_for_depth(*args, **kwargs)
    assert message in str(err.value)


def test_chinchilla_arithmetic():
    # Chinchilla itself: 70B parameters, 1.4T tokens, C = 6 N D = 5.88e23 FLOPs.
    assert chinchilla_tokens(70e9) == pytest.approx(1.4e12)
    assert training_flops(70e9, 1.4e12) == pytest.approx(5.88e23)
    n, d = compute_optimal(5.88e23)
    assert (n, d) == (pytest.approx(70e9), pytest.approx(1.4e12))
    for c in (1e15, 3.7e19, 1e24):  # round trip: the optimum spends exactly the budget
        n, d = compute_optimal(c, tokens_per_param=10)
        assert training_flops(n, d) == pytest.approx(c) and d == pytest.approx(10 * n)
    for fn, args in ((chinchilla_tokens, (0,)), (training_flops, (1e6, -1)), (compute_optimal, (0,))):
        with pytest.raises(ValueError, match="must be positive"):
            fn(*args)
