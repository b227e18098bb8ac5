"""`ModelConfig`: every architectural choice of the model, validated, counted and costed.

The same dataclass builds the 2024 block (pre-norm RMSNorm, RoPE, GQA, SwiGLU, tied embeddings)
and the 2017 one (post-norm LayerNorm, learned or sinusoidal positions, MHA, GELU MLP), so the
ablation chapters change one switch at a time and everything else stays identical.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "ModelConfig", "swiglu_ffn_dim"]

_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "pos_encoding": ("rope", "learned", "sinusoidal"),
    "mlp": ("swiglu", "gelu"),
    "rope_scaling": (None, "linear", "ntk"),
    "attn_backend": ("sdpa", "naive", "triton"),
    "kernels": ("torch", "triton"),
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=8, dim=128, n_heads=4, n_kv_heads=1),
    "small": dict(n_layers=12, dim=384, n_heads=12, n_kv_heads=3),
    "medium": dict(n_layers=20, dim=640, n_heads=16, n_kv_heads=4, ffn_dim=2048),
}


def swiglu_ffn_dim(dim: int, multiple_of: int = 64) -> int:
    """Hidden width of a SwiGLU MLP with the parameters of a 4*dim GELU MLP.

    A GELU MLP has two matrices of dim x 4*dim (8*dim^2 weights); SwiGLU has three of dim x f,
    so f = 8/3 * dim keeps the count. Rounded *up* to a multiple of 64 so matmuls tile well
    (the Llama recipe), which adds at most 3*dim*63 parameters.
    """
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Sizes: ``vocab_size`` tokens, ``dim`` model width, ``n_layers`` blocks, ``n_heads`` query
    heads of ``head_dim = dim // n_heads``, ``n_kv_heads`` key/value heads (None: = n_heads, MHA;
    1: MQA; in between: GQA), ``ffn_dim`` MLP width (None: 8/3*dim rounded up to a multiple of 64
    for SwiGLU, 4*dim for GELU), ``max_seq_len`` context length.

    Switches for the 2017 -> 2024 ablations: ``norm`` ("rmsnorm" | "layernorm"),
    ``norm_position`` ("pre" | "post"), ``pos_encoding`` ("rope" | "learned" | "sinusoidal"),
    ``mlp`` ("swiglu" | "gelu"), ``rope_scaling`` (None | "linear" | "ntk") with
    ``rope_scaling_factor``, ``tie_embeddings``.

    Execution: ``attn_backend`` ("sdpa" | "naive" | "triton") and ``kernels`` ("torch" |
    "triton"; "triton" routes norm, RoPE, SwiGLU, attention and the loss through
    ``minigpt.kernels``). All linear layers are bias-free (LayerNorm keeps its bias).
    """

    vocab_size: int = 20000
    dim: int = 384
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    pos_encoding: str = "rope"
    mlp: str = "swiglu"
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    attn_backend: str = "sdpa"
    kernels: str = "torch"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None and isinstance(self.dim, int) and self.dim > 0:
            self.ffn_dim = swiglu_ffn_dim(self.dim) if self.mlp == "swiglu" else 4 * self.dim
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any inconsistent setting."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r} is not supported; choose one of {allowed}"
                )
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of dim (e.g. {_divisors_near(self.dim, self.n_heads)})"
            )
        assert self.n_kv_heads is not None  # resolved above; tells the type checker
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; each KV head "
                f"must serve the same number of query heads (try n_kv_heads in "
                f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]})"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates pairs of features, so head_dim (= dim/n_heads = {self.head_dim}) must be "
                "even; change dim or n_heads"
            )
        if "triton" in (self.kernels, self.attn_backend) and self.head_dim > 128:  # max(flash_attention.SUPPORTED_HEAD_DIMS)
            raise ValueError(
                f"the Triton FlashAttention kernel supports head_dim up to 128 (32, 64 and 128 natively, other sizes "
                f"run masked in the next), got {self.head_dim} (= dim/n_heads); change dim/n_heads or use kernels='torch'"
            )
        if self.pos_encoding == "sinusoidal" and self.dim % 2 != 0:
            raise ValueError(f"sinusoidal positions need an even dim, got {self.dim}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")
        if self.rope_scaling is not None and self.pos_encoding != "rope":
            raise ValueError("rope_scaling only applies with pos_encoding='rope'")
        if self.rope_scaling_factor < 1.0:
            raise ValueError(f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        """The scaling argument for :func:`minigpt.rope.rope_cache`, or None."""
        if self.rope_scaling is None:
            return None
        return {"type": self.rope_scaling, "factor": self.rope_scaling_factor}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size from the reference design: "tiny", "small" or "medium".

        All presets: vocab 20000, SwiGLU, RoPE, RMSNorm pre-norm, tied embeddings. ``overrides``
        replace any field (e.g. ``ModelConfig.preset("small", vocab_size=65)``).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} (config from a newer minigpt?)")
        return cls(**d)

    # ---- counting -------------------------------------------------------------------------

    def _norm_params(self) -> int:
        return self.dim if self.norm == "rmsnorm" else 2 * self.dim

    def layer_params(self) -> int:
        """Parameters of one block: attention projections, MLP and its two norms."""
        d, hd = self.dim, self.head_dim
        assert self.n_kv_heads is not None and self.ffn_dim is not None  # resolved in __post_init__
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * self.ffn_dim
        return attn + mlp + 2 * self._norm_params()

    def num_params(self) -> int:
        """Exact parameter count; equals ``sum(p.numel() for p in MiniGPT(cfg).parameters())``.

        = token embedding V*d + learned positions (max_seq_len*d, if any) + n_layers * block
        + final norm (pre-norm only: post-norm blocks already end in a norm) + LM head (V*d,
        only when untied; a tied head reuses the embedding and is counted once).
        """
        n = self.vocab_size * self.dim + self.n_layers * self.layer_params()
        if self.pos_encoding == "learned":
            n += self.max_seq_len * self.dim
        if self.norm_position == "pre":
            n += self._norm_params()
        if not self.tie_embeddings:
            n += self.vocab_size * self.dim
        return n

    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply per token: block linears + the LM head."""
        per_layer = self.layer_params() - 2 * self._norm_params()
        return self.n_layers * per_layer + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``.

        flops = 6 * N_matmul + 12 * n_layers * seq_len * dim

        - 6 * N_matmul: each weight in a matmul costs 2 FLOPs (multiply + add) per token forward
          and 4 backward (grads of input and weight). N_matmul counts the LM head (tied or not)
          and excludes embedding lookups and norms, which are not matmuls.
        - 12 * L * T * d: attention scores QK^T and the weighted sum PV each cost 2*T*d FLOPs per
          token per layer forward, x3 for forward + backward. This is the PaLM / nanoGPT MFU
          convention; it counts the full T x T score matrix, although a causal kernel that skips
          masked blocks does about half that work.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        return 6.0 * self.matmul_params() + 12.0 * self.n_layers * seq_len * self.dim


def _divisors_near(n: int, target: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - target))[:4]
