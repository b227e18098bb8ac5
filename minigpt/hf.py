"""Hugging Face interop: save a MiniGPT as a ``LlamaForCausalLM`` checkpoint and load one back.

Our parameter names were chosen to map one-to-one onto Llama's, and our RoPE uses the same
rotate-half layout, so no weight permutation is needed (Meta's original interleaved checkpoints
need ``minigpt.rope.interleaved_to_half`` on W_q and W_k first). Only Llama-architecture configs
can be exported: pre-norm RMSNorm, RoPE, SwiGLU, no biases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch

from minigpt.config import ModelConfig
from minigpt.model import Block, MiniGPT

__all__ = ["from_llama_config", "load_hf", "save_hf", "to_llama_config"]

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}


def to_llama_config(config: ModelConfig) -> dict:
    """The ``config.json`` of an equivalent ``LlamaForCausalLM``; ValueError for non-Llama switches."""
    unsupported = {
        "norm": ("rmsnorm", config.norm),
        "norm_position": ("pre", config.norm_position),
        "pos_encoding": ("rope", config.pos_encoding),
        "mlp": ("swiglu", config.mlp),
    }
    bad = [f"{k}={v!r} (Llama needs {want!r})" for k, (want, v) in unsupported.items() if v != want]
    if bad:
        raise ValueError("cannot export to the Llama format: " + ", ".join(bad))
    theta, rope_scaling = config.rope_theta, None
    if config.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": config.rope_scaling_factor}
    elif config.rope_scaling == "ntk":  # static NTK-aware scaling is just a larger base
        theta = config.rope_theta * config.rope_scaling_factor ** (config.head_dim / (config.head_dim - 2))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def from_llama_config(d: dict) -> ModelConfig:
    """A ``ModelConfig`` from a Llama ``config.json`` dict (transformers 4.x or 5.x keys)."""
    if d.get("model_type") != "llama":
        raise ValueError(f"only Llama checkpoints can be loaded, got model_type={d.get('model_type')!r}")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("unsupported Llama variant: needs hidden_act='silu' and no attention/MLP biases")
    heads = d["num_attention_heads"]
    if d.get("head_dim", d["hidden_size"] // heads) * heads != d["hidden_size"]:
        raise ValueError("unsupported Llama variant: head_dim * num_attention_heads != hidden_size")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}; minigpt loads 'default' and 'linear'")
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads", heads), ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=d.get("tie_word_embeddings", False),
        rope_scaling="linear" if kind == "linear" else None,
        rope_scaling_factor=float(rope.get("factor", 1.0)) if kind == "linear" else 1.0,
    )


def _hf_state_dict(model: MiniGPT) -> dict[str, torch.Tensor]:
    assert model.norm is not None  # a Llama-style (pre-norm) model; checked by the caller
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": cast(torch.Tensor, model.norm.weight)}
    for i, block in enumerate(cast("list[Block]", model.blocks)):
        for ours, theirs in _LAYER_MAP.items():
            sd[f"model.layers.{i}.{theirs}"] = block.get_parameter(ours)
    if not model.config.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_hf(model: MiniGPT, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``LlamaForCausalLM.from_pretrained``."""
    from safetensors.torch import save_file

    hf_config = to_llama_config(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(_hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(directory / shard)))
        return sd
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def load_hf(directory: str | Path, dtype: torch.dtype | None = None) -> MiniGPT:
    """Load a Llama-architecture checkpoint directory (config.json + safetensors) as a MiniGPT."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found; expected a Hugging Face model directory")
    config = from_llama_config(json.loads(cfg_path.read_text()))
    sd = _read_safetensors(directory)
    model = MiniGPT(config)
    ours: dict[str, torch.Tensor] = {"tok_emb.weight": sd.pop("model.embed_tokens.weight"),
                                     "norm.weight": sd.pop("model.norm.weight")}
    for i in range(config.n_layers):
        for mine, theirs in _LAYER_MAP.items():
            ours[f"blocks.{i}.{mine}"] = sd.pop(f"model.layers.{i}.{theirs}")
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        ours["lm_head.weight"] = ours["tok_emb.weight"]  # the same Parameter: state_dict lists it twice
    else:
        ours["lm_head.weight"] = sd.pop("lm_head.weight")
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"checkpoint has tensors minigpt does not know: {leftover[:5]}")
    model.load_state_dict(ours, strict=True)
    return model.to(dtype) if dtype is not None else model
