"""Tests for minigpt.memory_traffic.training_step_floor_bytes: the HBM floor of a training step
outside its matmuls and attention.

Three references, none of them the function's closed forms: a ledger of the fused kernels' reads
and writes built from the tensors a tiny model really makes under bf16 autocast (so the dtypes are
the model's, not the function's defaults); a count by hand of the SwiGLU gate at an odd size; and
the eager step under `TrafficCounter`, which moves more than the floor.
"""

import pytest
import torch
import torch.nn as nn

from minigpt import runtime
from minigpt.config import ModelConfig
from minigpt.memory_traffic import TrafficCounter, tensor_bytes, training_step_floor_bytes
from minigpt.model import MiniGPT
from minigpt.norm import RMSNorm

B = tensor_bytes
TINY = dict(vocab_size=97, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=16)
MATMULS = {"mm", "addmm", "bmm"}


def _run_tiny(batch: int = 2, seq_len: int = 12):
    """A tiny ``kernels="triton"`` MiniGPT's forward under bf16 autocast, where its Triton kernels run
    (a GPU, or the CPU in Triton's interpreter): (model, idx, logits, linears, norms). linears[name] =
    (input, output) of each Linear; norms lists, in call order, (x, delta, s, y) of every norm's
    ``add_forward`` (s = x + delta, y = norm(s))."""
    torch.manual_seed(0)
    device = runtime.device().type
    model = MiniGPT(ModelConfig(**TINY, kernels="triton")).to(device)
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    norms: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: linears.__setitem__(name, (i[0], o)))
        if isinstance(mod, RMSNorm):
            def add_forward(x, delta, _f=mod.add_forward):
                s, y = _f(x, delta)
                norms.append((x, delta, s, y))
                return s, y
            mod.add_forward = add_forward
    idx = torch.randint(0, TINY["vocab_size"], (batch, seq_len)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16), torch.no_grad():
        logits, _ = model(idx)
    return model, idx, logits, linears, norms


def _ledger(model, idx, logits, linears, norms) -> dict[str, int]:
    """Bytes of the fused kernels the floor assumes, read off the model's own tensors (a gradient has
    its tensor's bytes).

    Norm forward: read x, delta; write s (unless nothing reads it later: the last norm) and y.
    Backward: read the m partial gradients of y (m = the Linears that read y; 1, the LM head, for
    the last), ds (s's other use: the next norm; x's for the first), s (the last recomputes it from
    x and delta); write dx and ddelta (the first writes nothing: its dx0 is scattered into the
    embedding's gradient).
    """
    total = 0
    for j, (x, delta, s, y) in enumerate(norms):
        first, last = delta is None, j == len(norms) - 1
        m = sum(inp is y for inp, _ in linears.values()) or 1
        total += B(x) + B(y) + (0 if first else B(delta) + (0 if last else B(s)))
        total += m * B(y) + (0 if last else B(s)) + (B(x) + B(delta) if last else B(s)) + (0 if first else B(x) + B(delta))
    norms_b = total + len(norms) * 3 * B(model.norm.weight)
    layers, T = len(model.blocks), idx.shape[1]
    L = lambda i, name: linears[f"blocks.{i}.{name}"]
    tables = B(model.rope_cos[:T]) + B(model.rope_sin[:T])
    rope = sum(4 * (B(L(i, "attn.q_proj")[1]) + B(L(i, "attn.k_proj")[1])) + 2 * tables for i in range(layers))
    swiglu = 0
    for i in range(layers):
        g, u, h = L(i, "ffn.gate_proj")[1], L(i, "ffn.up_proj")[1], L(i, "ffn.down_proj")[0]
        swiglu += (B(g) + B(u) + B(h)) + (B(h) + B(g) + B(u) + B(g) + B(u))  # forward; backward
    adamw = 0
    for p in model.parameters():  # read p, m, v and write them; matrices: the bf16 grad in, the bf16 copy out
        adamw += 6 * B(p) + (2 * B(p.to(logits.dtype)) if p.dim() >= 2 else B(p))
    return {"RMSNorm + residual": norms_b, "RoPE": rope, "SwiGLU gate": swiglu,
            "loss (cross-entropy)": 2 * B(logits) + B(idx), "AdamW": adamw, "embedding": 3 * B(idx)}


def test_floor_equals_the_ledger_of_the_tiny_model_s_own_tensors():
    model, idx, logits, linears, norms = _run_tiny()
    assert len(norms) == 2 * len(model.blocks) + 1
    x, delta, s, y = norms[1]  # the dtypes the floor's defaults assume: fp32 stream, bf16 pending add and norm output
    bf16, fp32 = torch.bfloat16, torch.float32
    assert (x.dtype, delta.dtype, s.dtype, y.dtype, logits.dtype) == (fp32, bf16, fp32, bf16, bf16)
    floor = training_step_floor_bytes(model.config, *idx.shape)
    assert floor == _ledger(model, idx, logits, linears, norms)


def test_swiglu_gate_by_hand_at_an_odd_size():
    # forward reads g, u, writes h; backward reads dh, g, u, writes dg, du: 8 passes of [B*T, ffn] bf16
    cfg = ModelConfig(vocab_size=31, dim=12, n_layers=3, n_heads=2, ffn_dim=37, max_seq_len=8)
    floor = training_step_floor_bytes(cfg, 3, 7)
    assert floor["SwiGLU gate"] == 3 * 8 * (3 * 7) * 37 * 2
    assert floor["loss (cross-entropy)"] == 2 * 21 * 31 * 2 + 21 * 8


def test_floor_scales_as_it_should():
    cfg = ModelConfig(**TINY)
    one, two = training_step_floor_bytes(cfg, 2, 12), training_step_floor_bytes(cfg, 4, 12)
    for part in ("SwiGLU gate", "loss (cross-entropy)", "embedding"):
        assert two[part] == 2 * one[part]  # activations: linear in the tokens
    assert two["AdamW"] == one["AdamW"]  # parameters only
    clipped = training_step_floor_bytes(cfg, 2, 12, grad_clip=True)
    params = cfg.num_params()
    assert clipped["gradient clipping"] == 2 * cfg.matmul_params() + 4 * (params - cfg.matmul_params())


def test_floor_is_below_the_eager_step():
    """The eager step (torch ops, bf16 autocast, AdamW) moves more outside its matmuls and attention."""
    torch.manual_seed(0)
    model = MiniGPT(ModelConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    idx, targets = torch.randint(0, TINY["vocab_size"], (2, 2, 12))
    with TrafficCounter() as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        opt.step()
    rest = sum(o.read + o.written for o in c.ops if o.name not in MATMULS and "scaled_dot_product" not in o.name)
    assert any("scaled_dot_product" in o.name for o in c.ops)  # attention was one op, excluded by name
    floor = training_step_floor_bytes(model.config, *idx.shape)
    assert sum(floor.values()) <= rest


def test_refuses_other_designs_and_bad_sizes():
    with pytest.raises(ValueError, match="RMSNorm, RoPE, SwiGLU"):
        training_step_floor_bytes(ModelConfig(**TINY, mlp="gelu"), 2, 12)
    with pytest.raises(ValueError, match="batch"):
        training_step_floor_bytes(ModelConfig(**TINY), 0, 12)
