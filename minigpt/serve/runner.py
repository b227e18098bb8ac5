"""The model's forward pass over a packed, paged batch, and its CUDA-graph replay for decode.

``MiniGPT.forward`` takes a rectangular ``[B, T]`` batch with one shared start position. A
serving step is ragged: some sequences decode one token, others read a chunk of their prompt on
top of a cached prefix. The runner flattens every scheduled token into one row of ``N`` tokens
(each with its own position and KV slot), runs the model's own modules (embedding, norms,
projections, MLPs: the same weights) over it, and only attention looks at sequence boundaries:

- decode tokens (one per sequence) go through ``paged_decode_attention`` (Triton on CUDA, the
  plain PyTorch path on CPU);
- each prefill chunk attends to its cached prefix plus itself: queries at positions
  ``c..c+n-1`` against keys ``0..c+n-1`` with a causal mask shifted by ``c``.

With ``fused=True`` (the default on CUDA for Llama-style models) the runner also cuts the
number of kernels per layer: one matmul for q, k, v and one for gate, up (concatenated copies
of the weights, made once), and the library's Triton RMSNorm, RoPE and SwiGLU kernels.

On CUDA a step of up to ``graph_tokens`` tokens is replayed from a CUDA graph captured once per
token-count bucket (inputs padded to the bucket, block tables padded to ``max_blocks_per_seq``):
one launch instead of hundreds of kernel launches, which is where an eager step spends its time
(about 30 ms of host time for `small` on the H200 VM, `scripts/gpu_profile_serve.py`). The graph
treats every token as a decode row: a prompt token at position p attends to its sequence's cached
keys 0..p through ``paged_decode_attention``, which is causal attention over the chunk because
the chunk's own keys are written to the cache before attention runs. Each row re-reads its
prefix (from L2: one sequence's prefix is shared by its rows), cheap beside a host-bound pass.
Longer steps (a dynamic-batching prefill of thousands of tokens) replay their decode rows and
run the prefill chunks in a second, eager pass, where a causal SDPA per chunk shares the reads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minigpt.attention import sdpa_attention
from minigpt.kernels.decode_attention import paged_decode_attention, paged_decode_attention_torch
from minigpt.kernels.rms_norm import rms_norm as triton_rms_norm
from minigpt.kernels.rope import apply_rope_qk as triton_rope_qk
from minigpt.kernels.swiglu import swiglu as triton_swiglu
from minigpt.model import Block, MiniGPT

from .paged_cache import PagedKVCache

__all__ = ["ModelRunner", "StepInputs", "graph_buckets", "split_step"]


@dataclass
class StepInputs:
    """One packed step. Decode tokens come first (``num_decodes`` of them), then prefill chunks.

    input_ids, positions, slots: ``[N]``; block_tables ``[num_decodes, M]`` int32; context_lens
    ``[num_decodes]`` int32; prefills: ``(start, n, context_len, blocks[ceil(context_len/bs)])``;
    logit_rows ``[R]``: the token rows whose next-token logits are needed.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    num_decodes: int
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    prefills: list[tuple[int, int, int, torch.Tensor]]
    logit_rows: torch.Tensor


def split_step(inp: StepInputs) -> tuple[StepInputs, StepInputs]:
    """(decode-only, prefill-only) halves of a mixed step; the decode rows' logits come first in both."""
    nd = inp.num_decodes
    decode = StepInputs(inp.input_ids[:nd], inp.positions[:nd], inp.slots[:nd], nd, inp.block_tables, inp.context_lens, [],
                        inp.logit_rows[:nd])
    prefill = StepInputs(inp.input_ids[nd:], inp.positions[nd:], inp.slots[nd:], 0, inp.block_tables[:0], inp.context_lens[:0],
                         [(start - nd, n, ctx, blocks) for start, n, ctx, blocks in inp.prefills], inp.logit_rows[nd:] - nd)
    return decode, prefill


# Prompt chunks in an eager pass: not cuDNN's SDPA, which plans every new (q_len, kv_len) anew, and
# a server sees new prompt lengths all the time (measured: see the chapter 10 serving benchmark).
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
GRAPH_TOKENS = 512  # steps up to this many tokens replay a graph (the engine caps it at max_num_tokens)


def graph_buckets(max_batch_size: int, max_tokens: int | None = None) -> list[int]:
    """Token counts that get a CUDA graph: 1, 2, 4, 8, then multiples of 8 up to ``max_batch_size``
    (decode steps, one token a sequence), then multiples of 64 up to ``max_tokens`` (steps that
    carry prompt chunks too): a step is padded by at most 7 rows, or 63 beyond the batch size."""
    max_tokens = max_batch_size if max_tokens is None else max(max_tokens, max_batch_size)
    sizes = [b for b in (1, 2, 4) if b < max_batch_size] + list(range(8, max_batch_size, 8)) + [max_batch_size]
    sizes += [*range(64 * (max_batch_size // 64 + 1), max_tokens, 64), max_tokens]
    return sorted(set(sizes))


class ModelRunner:
    """Runs ``model`` over ``StepInputs`` against a ``PagedKVCache``; optional CUDA graphs for steps of up to
    ``graph_tokens`` tokens (at least ``max_batch_size``: every decode-only step fits)."""

    def __init__(self, model: MiniGPT, cache: PagedKVCache, max_batch_size: int, max_blocks_per_seq: int,
                 cuda_graphs: bool, fused: bool = False, graph_tokens: int | None = None):
        self.model, self.cache = model, cache
        self.config = model.config
        self.fused = fused
        if fused:
            self._fuse_weights()
        self.device = model.tok_emb.weight.device
        on_cuda = self.device.type == "cuda"
        self._decode_attn = paged_decode_attention if on_cuda else paged_decode_attention_torch
        self.max_blocks_per_seq = max_blocks_per_seq
        # static_decode: steps of up to graph_tokens tokens go through fixed, padded input buffers
        # (what a graph needs); cuda_graphs: they are also captured and replayed. On CPU
        # static_decode runs eagerly, so the padding logic is tested without a GPU.
        self.static_decode = cuda_graphs
        self.cuda_graphs = cuda_graphs and on_cuda
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None  # the CUDA-graph memory pool, shared by every bucket's graph
        if self.static_decode:
            self.buckets = graph_buckets(max_batch_size, graph_tokens)
            B, dev = self.buckets[-1], self.device
            self._static = dict(
                input_ids=torch.zeros(B, dtype=torch.long, device=dev),
                positions=torch.zeros(B, dtype=torch.long, device=dev),
                slots=torch.zeros(B, dtype=torch.long, device=dev),  # slot 0 = scratch block 0
                block_tables=torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, device=dev),
                context_lens=torch.ones(B, dtype=torch.int32, device=dev),
                logit_rows=torch.arange(B, device=dev),  # lives as long as the graphs that read it
            )

    # ------------------------------------------------------------------ fused kernels
    @staticmethod
    def can_fuse(config) -> bool:
        """Fused kernels need the Llama block: pre-norm RMSNorm, RoPE, SwiGLU."""
        return (config.norm, config.norm_position, config.pos_encoding, config.mlp) == ("rmsnorm", "pre", "rope", "swiglu")

    def _fuse_weights(self) -> None:
        if not self.can_fuse(self.config):
            raise ValueError("fused serving kernels need a Llama-style model (rmsnorm, pre-norm, rope, swiglu); "
                             "pass fused=False")
        with torch.no_grad():
            blocks = cast("list[Block]", self.model.blocks)
            self._qkv = [torch.cat([b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight]) for b in blocks]
            self._gate_up = [torch.cat([b.ffn.gate_proj.weight, b.ffn.up_proj.weight]) for b in blocks]  # type: ignore[union-attr, list-item]  # swiglu: can_fuse

    def _norm(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return triton_rms_norm(x, module.weight, module.eps)
        return module(x)

    def _ffn(self, layer: int, ffn, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return ffn(x)
        gate, up = F.linear(x, self._gate_up[layer]).chunk(2, dim=-1)
        return ffn.down_proj(triton_swiglu(gate, up))

    def _qkv_rope(self, layer: int, attn, h: torch.Tensor, cos, sin):
        N = h.shape[1]
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        if self.fused:
            q, k, v = F.linear(h, self._qkv[layer]).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(1, N, H, D), k.view(1, N, Hkv, D), v.view(1, N, Hkv, D)
            q, k = triton_rope_qk(q, k, cos, sin)  # q and k in one launch
            return q, k, v
        q = attn.q_proj(h).view(1, N, H, D)
        k = attn.k_proj(h).view(1, N, Hkv, D)
        v = attn.v_proj(h).view(1, N, Hkv, D)
        if attn.use_rope:
            q, k = attn.ops.rope_qk(q, k, cos, sin)
        return q, k, v

    # ------------------------------------------------------------------ the packed forward
    def _attention(self, layer: int, attn, h: torch.Tensor, cos, sin, inp: StepInputs) -> torch.Tensor:
        N = h.shape[1]
        H, D = attn.n_heads, attn.head_dim
        q, k, v = self._qkv_rope(layer, attn, h, cos, sin)
        self.cache.write(layer, inp.slots, k[0], v[0])
        nd = inp.num_decodes
        parts = []
        if nd:
            parts.append(self._decode_attn(q[0, :nd], self.cache.k[layer], self.cache.v[layer],
                                           inp.block_tables, inp.context_lens))
        if inp.prefills:
            with sdpa_kernel(PREFILL_SDPA_BACKENDS):
                parts += [self._prefill_attention(layer, q[0, start:start + n], ctx, blocks)
                          for start, n, ctx, blocks in inp.prefills]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return attn.o_proj(y.reshape(1, N, H * D))

    def _prefill_attention(self, layer: int, q: torch.Tensor, ctx: int, blocks: torch.Tensor) -> torch.Tensor:
        """One prompt chunk q [n, H, D] against its sequence's cached keys 0..ctx-1 (its prefix and
        itself, written this layer): causal SDPA, the mask shifted to the chunk's end. -> [n, H, D]."""
        kc, vc = self.cache.gather(layer, blocks, ctx)  # [ctx, Hkv, D]
        group = q.shape[1] // kc.shape[1]
        if group > 1:  # GQA: repeat the KV heads, so FlashAttention (no GQA path in every version) takes it
            kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
        y = sdpa_attention(q.transpose(0, 1)[None], kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], causal=True)
        return y[0].transpose(0, 1)  # [1, H, n, D] -> [n, H, D]

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        m, cfg = self.model, self.config
        x = m.tok_emb(inp.input_ids)[None]  # [1, N, dim]
        cos = sin = None
        if cfg.pos_encoding == "learned":
            x = x + m.pos_emb(inp.positions)[None]
        elif cfg.pos_encoding == "sinusoidal":
            x = x + m.pos_table[inp.positions].to(x.dtype)[None]
        else:
            cos, sin = m.rope_cos[inp.positions], m.rope_sin[inp.positions]
        for i, block in enumerate(cast("list[Block]", m.blocks)):
            if block.pre_norm:
                x = x + self._attention(i, block.attn, self._norm(block.attn_norm, x), cos, sin, inp)
                x = x + self._ffn(i, block.ffn, self._norm(block.ffn_norm, x))
            else:
                x = block.attn_norm(x + self._attention(i, block.attn, x, cos, sin, inp))
                x = block.ffn_norm(x + block.ffn(x))
        h = x[0, inp.logit_rows]
        if m.norm is not None:
            h = self._norm(m.norm, h)
        return m.lm_head(h)

    @torch.no_grad()
    def run(self, inp: StepInputs) -> torch.Tensor:
        """Next-token logits ``[R, vocab]`` for ``inp.logit_rows`` (graph replay when it can).

        A step of up to ``buckets[-1]`` tokens, decode rows and prefill chunks alike (the common
        step of continuous batching), is one replay. A longer step with decode rows is run as two
        passes: the decode rows replayed, the prefill chunks eagerly. The sequences are disjoint,
        so the passes write disjoint KV slots and the order does not matter.
        """
        nd = inp.num_decodes
        if self.static_decode and inp.input_ids.shape[0] <= self.buckets[-1]:
            return self._replay(inp)
        if not self.static_decode or nd == 0 or nd > self.buckets[-1]:
            return self._forward(inp)
        decode, prefill = split_step(inp)
        return torch.cat([self._replay(decode), self._forward(prefill)])

    # ------------------------------------------------------------------ CUDA graphs
    def _bucket_inputs(self, B: int) -> StepInputs:
        s = self._static
        return StepInputs(s["input_ids"][:B], s["positions"][:B], s["slots"][:B], B, s["block_tables"][:B],
                          s["context_lens"][:B], [], s["logit_rows"][:B])

    def _capture(self, B: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inp = self._bucket_inputs(B)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: compiles Triton kernels, settles allocator state
            for _ in range(2):
                self._forward(inp)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(inp)
        return graph, out

    def capture_all(self) -> None:
        """Capture every bucket now (largest first, so smaller graphs reuse its memory)."""
        if not self.cuda_graphs:
            return
        with torch.no_grad():
            for B in reversed(self.buckets):
                if B not in self._graphs:
                    self._graphs[B] = self._capture(B)

    def _replay(self, inp: StepInputs) -> torch.Tensor:
        """Logits of ``inp.logit_rows``: every token of the step is a row of the bucket's graph."""
        n, nd = inp.input_ids.shape[0], inp.num_decodes
        B = next(b for b in self.buckets if b >= n)
        s = self._static
        s["input_ids"][:n].copy_(inp.input_ids, non_blocking=True)
        s["positions"][:n].copy_(inp.positions, non_blocking=True)
        s["slots"][:n].copy_(inp.slots, non_blocking=True)
        s["context_lens"][:nd].copy_(inp.context_lens, non_blocking=True)
        M = inp.block_tables.shape[1]
        s["block_tables"][:nd, :M].copy_(inp.block_tables, non_blocking=True)
        if n > nd:  # prompt rows (contiguous after the decode rows): keys 0..p of their own sequence
            s["context_lens"][nd:n].copy_(inp.positions[nd:] + 1)
            for start, length, _, blocks in inp.prefills:
                s["block_tables"][start:start + length, :blocks.shape[0]].copy_(blocks.expand(length, -1))
        if n < B:  # padded rows write to the scratch slot and attend to one scratch key
            s["input_ids"][n:B].zero_()
            s["positions"][n:B].zero_()
            s["slots"][n:B].zero_()
            s["context_lens"][n:B].fill_(1)
        if self.cuda_graphs and (B in self._graphs or self._try_capture(B)):
            graph, out = self._graphs[B]
            graph.replay()
        else:  # CPU, or a capture that failed: the same padded inputs, run eagerly
            out = self._forward(self._bucket_inputs(B))
        return out[:n] if n == nd else out[inp.logit_rows]  # decode-only: logit_rows is 0..n-1

    def _try_capture(self, B: int) -> bool:
        try:
            self._graphs[B] = self._capture(B)
            return True
        except RuntimeError as e:  # say so loudly, keep serving eagerly
            warnings.warn(f"CUDA graph capture failed for {B} tokens ({str(e)[:200]}); running steps eagerly from now on",
                          RuntimeWarning, stacklevel=2)
            self.cuda_graphs = False
            return False
