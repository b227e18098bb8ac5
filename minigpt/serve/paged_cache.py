"""The paged KV cache: fixed-size blocks, a block table per sequence, and an allocator.

The static ``minigpt.attention.KVCache`` reserves ``max_seq_len`` positions for every row, so a
20-token request holds as much memory as a 1024-token one. Here the cache is a pool of
``num_blocks`` blocks of ``block_size`` token slots each (per layer, for K and for V); a
sequence owns a list of block ids (its *block table*) and grows it one block at a time. Memory
held by a sequence of n cached tokens is ``ceil(n / block_size)`` blocks: at most one partly
filled block of waste per sequence (vLLM's PagedAttention, Kwon et al. 2023).

Token t of a sequence lives in block ``table[t // block_size]`` at offset ``t % block_size``;
its flat *slot* is ``block * block_size + offset``. Block 0 is reserved as a scratch block that
padded rows of a CUDA-graph batch write into, so it is never handed out.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BlockAllocator", "PagedKVCache", "blocks_for"]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return math.ceil(num_tokens / block_size)


class BlockAllocator:
    """Hands out block ids ``1..num_blocks-1`` (0 is the scratch block) and takes them back.

    Raises on a double free or on freeing a block it never handed out, so a bookkeeping bug in
    the scheduler shows up as an error rather than as two sequences sharing memory.
    """

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks must be an int >= 2 (block 0 is reserved), got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the scratch block)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh block ids; raises ``MemoryError`` (no partial allocation) if fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free or foreign block)")
            self._used.remove(b)
            self._free.append(b)


class PagedKVCache:
    """K and V storage: ``k[layer]``, ``v[layer]`` of shape ``[num_blocks, block_size, n_kv_heads, head_dim]``."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v[N, n_kv_heads, head_dim]`` of N new tokens at flat ``slots[N]``."""
        Hkv, D = self.k.shape[-2:]
        self.k[layer].view(-1, Hkv, D).index_copy_(0, slots, k)
        self.v[layer].view(-1, Hkv, D).index_copy_(0, slots, v)

    def gather(self, layer: int, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` cached K, V of one sequence with block table ``blocks``: ``[length, Hkv, D]`` each."""
        Hkv, D = self.k.shape[-2:]
        k = self.k[layer][blocks].view(-1, Hkv, D)[:length]
        v = self.v[layer][blocks].view(-1, Hkv, D)[:length]
        return k, v
