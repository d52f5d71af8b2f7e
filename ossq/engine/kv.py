"""The paged KV pool: one preallocated tensor per layer for keys and one for values, cut into blocks of
BLOCK_TOKENS positions. A sequence owns a list of block ids (its block table, engine/blocks.py); position
p of the sequence lives at row `table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS` of every
layer's pool — that flat row number is the token's *slot*.

Every layer, sliding or full, stores every position through the same table. The sliding layers could
keep only their last `sliding_window` keys, but one table for all layers is what makes a cached prefix
valid for every layer at once (engine/blocks.py): a block's contents depend only on the tokens up to
it. The price is that sliding layers hold keys they will no longer read (half of 20b's KV memory for
long contexts). A block is released before its sequence ends only when it has left *every* layer's
window, which happens only when `max_kv_size` caps the full layers too (engine/scheduler.py).

Block size 16: a multiple of the 16-row MMA tile the GPU kernels load per step, small enough that
prefix-cache hits lose at most 15 tokens, and 8 blocks make gpt-oss's 128-token window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ossq.config import ModelConfig

BLOCK_TOKENS = 16
CPU_DEFAULT_KV_TOKENS = 32_768
# On CUDA the pool takes this fraction of the memory free after loading, less room for activations.
GPU_KV_FRACTION = 0.85
GPU_ACTIVATION_RESERVE_BYTES = 2 << 30


@dataclass
class KVPool:
    """Keys and values of every layer: `k[layer]`, `v[layer]` of shape (num_blocks · BLOCK_TOKENS, K, D)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, config: ModelConfig, *, num_blocks: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVPool:
        shape = (num_blocks * BLOCK_TOKENS, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
        )

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0] // BLOCK_TOKENS

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one position costs across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def default_kv_tokens(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The pool size when the user gives none: most of the free GPU memory after the weights are loaded,
    or a fixed 32k tokens on CPU (capped to a quarter of the machine's memory), whose RAM the weights
    and the operating system share."""
    per_token = bytes_per_token(config, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(BLOCK_TOKENS, int((free * GPU_KV_FRACTION - GPU_ACTIVATION_RESERVE_BYTES) // per_token))
    return max(BLOCK_TOKENS, min(CPU_DEFAULT_KV_TOKENS, int(_total_memory_bytes() / 4 // per_token)))


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        return 8 << 30


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // BLOCK_TOKENS)
