"""Sizing a model: where its parameters are, shapes at a matched budget, and compute-optimal runs.

Chapter 7 asks three design questions and this module answers the arithmetic of each:

- :func:`param_budget` splits a :class:`~minigpt.config.ModelConfig`'s parameters into embedding,
  attention, MLP and norms (the four add up to ``config.num_params()`` exactly);
- :func:`width_for_depth` returns the config of a given depth whose non-embedding parameter count
  matches a target, so a depth-vs-width comparison at equal parameters is one call per depth;
- :func:`chinchilla_tokens`, :func:`training_flops` and :func:`compute_optimal` are the
  Chinchilla rules of thumb (D ~ 20 N tokens, C ~ 6 N D FLOPs) used to size a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minigpt.config import ModelConfig

__all__ = [
    "CHINCHILLA_TOKENS_PER_PARAM",
    "ParamBudget",
    "chinchilla_tokens",
    "compute_optimal",
    "param_budget",
    "training_flops",
    "width_for_depth",
]

CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class ParamBudget:
    """A model's parameters by role; ``total`` equals ``ModelConfig.num_params()``.

    - ``embedding``: the token embedding V*d, plus the LM head V*d when it is *not* tied, plus
      learned position embeddings (max_seq_len*d) if the model has them. A tied head is the
      embedding matrix itself and is counted once, here.
    - ``attention``: W_q, W_k, W_v, W_o of every block.
    - ``mlp``: the FFN matrices of every block (3 of d x ffn for SwiGLU, 2 for GELU).
    - ``norms``: the gains (and LayerNorm biases) of every norm, the final one included.
    """

    embedding: int
    attention: int
    mlp: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding/head matrices: what Kaplan et al. (2020) call N."""
        return self.total - self.embedding

    def shares(self) -> dict[str, float]:
        """Each role's fraction of the total (the four sum to 1)."""
        return {name: getattr(self, name) / self.total for name in ("embedding", "attention", "mlp", "norms")}


def param_budget(config: ModelConfig) -> ParamBudget:
    """Split ``config``'s parameters into embedding / attention / MLP / norms.

    Per block of width d with h query heads and g KV heads of size h_d = d/h, and FFN width f:
    attention = d*h*h_d (W_q) + 2*d*g*h_d (W_k, W_v) + h*h_d*d (W_o) = 2d^2 + 2*d*g*h_d;
    MLP = 3*d*f (SwiGLU: gate, up, down) or 2*d*f (GELU); norms = 2 per block (d gains each,
    2d for LayerNorm), plus one final norm in a pre-norm model.
    """
    d, hd, L = config.dim, config.head_dim, config.n_layers
    assert config.n_kv_heads is not None and config.ffn_dim is not None  # resolved in ModelConfig.__post_init__
    attention = L * (2 * d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd)
    mlp = L * (3 if config.mlp == "swiglu" else 2) * d * config.ffn_dim
    norm = d if config.norm == "rmsnorm" else 2 * d
    norms = (2 * L + (1 if config.norm_position == "pre" else 0)) * norm
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    if config.pos_encoding == "learned":
        embedding += config.max_seq_len * d
    return ParamBudget(embedding=embedding, attention=attention, mlp=mlp, norms=norms)


def width_for_depth(
    n_layers: int,
    non_embedding_params: int,
    *,
    head_dim: int = 64,
    gqa_ratio: int = 4,
    ffn_ratio: float = 8 / 3,
    ffn_multiple: int = 32,
    **overrides: Any,
) -> ModelConfig:
    """The ``n_layers``-deep config whose non-embedding parameters match ``non_embedding_params``.

    Two steps, so that every depth of a sweep is shaped by the same rule:

    1. **Width.** With the FFN at ``ffn_ratio * d`` and ``gqa_ratio`` query heads per KV head, a
       block has about c*d^2 weights, c = 2(1 + 1/gqa_ratio) (attention) + k*ffn_ratio (MLP,
       k = 3 for SwiGLU, 2 for GELU). So d ~ sqrt(target / (n_layers * c)), rounded to the nearest
       multiple of ``head_dim * gqa_ratio``: every head has ``head_dim`` features and the query
       heads split evenly over ``n_heads / gqa_ratio`` KV heads.
    2. **FFN width.** The parameter count is linear in ``ffn_dim``; solve it for the target
       exactly, then round to the nearest multiple of ``ffn_multiple`` (32 keeps matmuls
       tile-friendly and the match within a fraction of a percent).

    ``overrides`` are other ModelConfig fields (vocab_size, tie_embeddings, mlp, norm, ...); the
    vocabulary does not change the answer, since embeddings are excluded by definition.
    Raises ``ValueError`` when the budget cannot hold ``n_layers`` blocks of the smallest width.

    >>> cfg = width_for_depth(12, 18_589_056, head_dim=32)   # small's non-embedding budget
    >>> cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    (12, 384, 12, 3, 1024)
    """
    for name, value in (("n_layers", n_layers), ("non_embedding_params", non_embedding_params), ("head_dim", head_dim),
                        ("gqa_ratio", gqa_ratio), ("ffn_multiple", ffn_multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"width_for_depth: {name} must be a positive integer, got {value!r}")
    if ffn_ratio <= 0:
        raise ValueError(f"width_for_depth: ffn_ratio must be positive, got {ffn_ratio}")
    clash = {"n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim"} & set(overrides)
    if clash:
        raise ValueError(f"width_for_depth chooses {sorted(clash)} itself; pass only other ModelConfig fields")

    k = 3 if overrides.get("mlp", "swiglu") == "swiglu" else 2
    c = 2 * (1 + 1 / gqa_ratio) + k * ffn_ratio
    step = head_dim * gqa_ratio
    dim = step * max(1, round(math.sqrt(non_embedding_params / (n_layers * c)) / step))
    n_heads = dim // head_dim
    shape = dict(n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_heads // gqa_ratio, **overrides)

    def non_embedding(ffn_dim: int) -> int:
        return param_budget(ModelConfig(**shape, ffn_dim=ffn_dim)).non_embedding

    base = non_embedding(ffn_multiple)
    per_unit = (non_embedding(2 * ffn_multiple) - base) / ffn_multiple  # = n_layers * k * dim
    ffn_dim = ffn_multiple * round((ffn_multiple + (non_embedding_params - base) / per_unit) / ffn_multiple)
    if ffn_dim < ffn_multiple:
        raise ValueError(
            f"{non_embedding_params:,} non-embedding parameters cannot hold {n_layers} blocks of width {dim} "
            f"(the narrowest with head_dim={head_dim}, gqa_ratio={gqa_ratio}); use fewer layers, a larger budget, "
            "or a smaller head_dim/gqa_ratio"
        )
    return ModelConfig(**shape, ffn_dim=ffn_dim)


def chinchilla_tokens(n_params: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> float:
    """Compute-optimal training tokens for a model of ``n_params`` parameters: D ~ 20 N.

    Hoffmann et al. (2022, "Chinchilla") fit loss over many (N, D) pairs and found that for a
    fixed compute budget the optimal N and D grow in proportion, at about 20 tokens per
    parameter. They count *all* parameters, embeddings included (Kaplan et al. counted
    non-embedding ones; much of the two papers' disagreement comes from that, Pearce & Song 2024).
    """
    if n_params <= 0 or tokens_per_param <= 0:
        raise ValueError(f"n_params and tokens_per_param must be positive, got {n_params}, {tokens_per_param}")
    return tokens_per_param * n_params


def training_flops(n_params: float, n_tokens: float) -> float:
    """Training compute C ~ 6 N D FLOPs: 2 per parameter per token forward, 4 backward.

    This is the rule of thumb behind :func:`compute_optimal`; it ignores attention's T^2 term,
    which :meth:`ModelConfig.flops_per_token` adds for a given context length.
    """
    if n_params <= 0 or n_tokens <= 0:
        raise ValueError(f"n_params and n_tokens must be positive, got {n_params}, {n_tokens}")
    return 6.0 * n_params * n_tokens


def compute_optimal(flops: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> tuple[float, float]:
    """The Chinchilla-optimal (parameters, tokens) for a compute budget of ``flops``.

    From C = 6 N D and D = r N (r = ``tokens_per_param``, 20): C = 6 r N^2, so
    N = sqrt(C / (6 r)) and D = r N = sqrt(C r / 6).
    """
    if flops <= 0 or tokens_per_param <= 0:
        raise ValueError(f"flops and tokens_per_param must be positive, got {flops}, {tokens_per_param}")
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n
