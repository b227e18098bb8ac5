"""MiniGPT: a decoder-only transformer built from ``ModelConfig`` switches.

With the defaults it is a Llama-style model (pre-norm RMSNorm, RoPE, GQA, SwiGLU, tied
embeddings); with ``norm="layernorm", norm_position="post", pos_encoding="learned", mlp="gelu"``
it is the 2017 block. Shapes: ``idx[B, T]`` token ids -> ``logits[B, T, vocab_size]``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn

from minigpt import runtime
from minigpt.attention import Attention, KVCache
from minigpt.config import ModelConfig
from minigpt.ffn import GeluMLP, SwiGLU
from minigpt.norm import RMSNorm, make_norm
from minigpt.ops import Ops
from minigpt.positions import sinusoidal_table
from minigpt.rope import rope_cache
from minigpt.sampling import sample_next

__all__ = ["Block", "MiniGPT"]


class Block(nn.Module):
    """One transformer block: attention then MLP, each wrapped in a residual connection.

    pre-norm (2024):  x = x + attn(norm(x));  x = x + mlp(norm(x))
    post-norm (2017): x = norm(x + attn(x));  x = norm(x + mlp(x))
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        triton = config.kernels == "triton"
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config.norm, config.dim, config.norm_eps, use_triton=triton)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config.norm, config.dim, config.norm_eps, use_triton=triton)
        assert config.ffn_dim is not None  # resolved in ModelConfig.__post_init__
        self.ffn: SwiGLU | GeluMLP
        if config.mlp == "swiglu":
            self.ffn = SwiGLU(config.dim, config.ffn_dim, config.dropout, use_triton=triton)
        else:
            self.ffn = GeluMLP(config.dim, config.ffn_dim, config.dropout)

    def forward(self, x: torch.Tensor, cos=None, sin=None, cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, cos, sin, cache, start_pos))
        return self.ffn_norm(x + self.ffn(x))

    def forward_fused(self, x: torch.Tensor, delta: torch.Tensor | None, cos=None, sin=None,
                      cache: KVCache | None = None, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm block with every residual add done inside the norm kernel that follows it.

        The residual stream arrives as a pair: the block's input is x + delta (x alone when delta
        is None). The block returns its output as a pair again, (x', ffn output), so that the next
        block's first norm, or the model's last one, adds it: ``sum(forward_fused(x, d)) ==
        forward(x + d)``. With Triton kernels each add then costs no kernel of its own, nor its
        gradient (chapter 11); Inductor fuses the plain ``forward``'s adds into its norms itself.
        """
        if not (self.pre_norm and isinstance(self.attn_norm, RMSNorm) and isinstance(self.ffn_norm, RMSNorm)):
            raise ValueError("forward_fused needs a pre-norm RMSNorm block; call forward instead")
        x, h = self.attn_norm.add_forward(x, delta)  # x = x + delta; h = norm(x)
        x, h = self.ffn_norm.add_forward(x, self.attn(h, cos, sin, cache, start_pos))
        return x, self.ffn(h)


def _build_bytes(config: ModelConfig) -> tuple[int, int]:
    """(parameters, position tables): host bytes that building a MiniGPT of ``config`` takes at its peak.

    Parameters are fp32 (a learned position table is one of them). A RoPE table is built in fp64
    before it is cast: the angles [T, D/2], one fp64 cos or sin at a time and the two fp32 results,
    12 * T * head_dim bytes at the peak; a sinusoidal table, T * dim fp32 numbers and two [T, dim/2]
    fp32 temporaries (the angles and their sin or cos), 8 * T * dim. Both match the growth of the
    process's peak memory on a CPU within 1% (T = 2,000,000).
    """
    t = config.max_seq_len
    table = {"rope": 12 * t * config.head_dim, "sinusoidal": 8 * t * config.dim}.get(config.pos_encoding, 0)
    return 4 * config.num_params(), table


def _check_fits_in_memory(config: ModelConfig) -> None:
    """Refuse, before allocating, a model that cannot be built in this machine's free memory: a typo'd
    ``max_seq_len`` of 10^8 used to build a RoPE table of tens of GB until the process was killed."""
    free = runtime.available_memory_bytes()
    params, table = _build_bytes(config)
    if free is not None and params + table > free:
        raise ValueError(
            f"this ModelConfig needs {(params + table) / 1e9:.1f} GB of host memory to build ({params / 1e9:.1f} GB of "
            f"fp32 parameters, {table / 1e9:.1f} GB for the {config.pos_encoding} position table of max_seq_len="
            f"{config.max_seq_len:,}), more than the {free / 1e9:.1f} GB free here; lower max_seq_len to the longest "
            "sequence the model will see, or the model's size")


class MiniGPT(nn.Module):
    """The language model. ``forward(idx, targets) -> (logits, loss)``; ``generate`` samples."""

    pos_table: torch.Tensor  # buffers, when the config has them (sinusoidal positions, RoPE tables)
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"MiniGPT needs a ModelConfig, got {type(config).__name__}")
        config.validate()
        _check_fits_in_memory(config)
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.dim)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_seq_len, config.dim), persistent=False)
        else:
            cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta, config.rope_scaling_dict)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = make_norm(config.norm, config.dim, config.norm_eps, use_triton=config.kernels == "triton") \
            if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.ops = Ops(config.kernels, config.attn_backend)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, start_pos: int) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an integer tensor of shape [B, T], got {shape}")
        end = start_pos + idx.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {end} positions exceeds max_seq_len={self.config.max_seq_len}; "
                "crop the input (e.g. idx[:, -max_seq_len:]) or build the model with a larger max_seq_len"
            )

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Final hidden states ``[B, T, dim]`` (after the last norm) for tokens at ``start_pos..``.

        With Triton kernels under autocast they come in the autocast dtype (see `Block.forward_fused`).
        """
        self._check_idx(idx, start_pos)
        T = idx.shape[1]
        x = self.tok_emb(idx)
        cos = sin = None
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(torch.arange(start_pos, start_pos + T, device=idx.device))
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[start_pos:start_pos + T].to(x.dtype)
        else:
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.drop(x)
        if isinstance(self.norm, RMSNorm) and self.norm.ops.triton:  # the stream goes block to block as (x, pending add)
            delta = None
            for block in cast("list[Block]", self.blocks):
                x, delta = block.forward_fused(x, delta, cos, sin, cache, start_pos)
            return self.norm.add_forward(x, delta)[1]
        for block in cast("list[Block]", self.blocks):
            x = block(x, cos, sin, cache, start_pos)
        return self.norm(x) if self.norm is not None else x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx[B, T]`` -> ``(logits[B, T, V], loss)``; loss = mean CE over targets != -100 (None without targets).

        With ``kernels="triton"`` and targets, the loss comes from the fused linear cross-entropy,
        which never builds the [B, T, V] logits: logits is then None (call without targets for them).
        """
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        return self.ops.lm_loss(self.hidden_states(idx), self.lm_head.weight, targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx[B, T]``; returns ``[B, T + n]``.

        ``temperature=0`` is greedy. With ``eos_id``, a sequence that produced it keeps emitting
        it, and generation stops once every sequence has. ``use_cache=False`` recomputes the
        whole prefix each step (same tokens, quadratic cost; kept for checking the cache).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        self._check_idx(idx, 0)
        if idx.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len={self.config.max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        cache = None
        if use_cache:
            cache = KVCache.for_model(self.config, idx.shape[0], device=idx.device, dtype=self.tok_emb.weight.dtype)
        h = self.hidden_states(idx, cache, 0)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample_next(self.lm_head(h[:, -1]), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            idx = torch.cat([idx, nxt[:, None].to(idx.dtype)], dim=1)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            if use_cache:
                h = self.hidden_states(idx[:, -1:], cache, idx.shape[1] - 1)
            else:
                h = self.hidden_states(idx)
        self.train(was_training)
        return idx
