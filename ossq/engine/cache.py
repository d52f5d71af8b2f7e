"""KV cache: preallocated per layer, ring buffers where attention is windowed.

A layer whose queries see at most W keys (the sliding layers, and the full layers when `max_kv_size`
caps them, as mlx-lm's option does) keeps a ring of `W + chunk − 1` slots, so memory does not grow with
the context: writing a chunk of up to `chunk` tokens never overwrites a key that one of the chunk's own
queries still needs. Unwindowed layers keep `max_tokens` slots. Each slot remembers the absolute
position it holds (−1 = empty), which is all the attention mask needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossq.config import ModelConfig
from ossq.errors import PromptTooLong

PREFILL_CHUNK_TOKENS = 512


@dataclass
class LayerKV:
    k: torch.Tensor  # (B, S, K, D)
    v: torch.Tensor  # (B, S, K, D)
    pos: torch.Tensor  # (S,) int64, absolute position held by each slot, −1 when empty
    window: int | None  # keys visible to a query, including itself; None = all earlier keys


class KVCache:
    """Keys and values of every layer for one batch of sequences that advance together."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_tokens: int,
        batch: int = 1,
        max_kv_size: int | None = None,
        chunk: int = PREFILL_CHUNK_TOKENS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_kv_size is not None and max_kv_size < 1:
            raise ValueError(f"max_kv_size must be positive, got {max_kv_size}")
        self.max_tokens = max_tokens if max_kv_size is None else None
        self.chunk = chunk
        self.offset = 0
        self.layers = [
            self._layer(config, i, batch, max_tokens, max_kv_size, dtype, device)
            for i in range(config.num_hidden_layers)
        ]

    def _layer(
        self,
        config: ModelConfig,
        i: int,
        batch: int,
        max_tokens: int,
        max_kv_size: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> LayerKV:
        window = config.window(i) or max_kv_size
        slots = max_tokens if window is None else min(window + self.chunk - 1, max_tokens)
        shape = (batch, slots, config.num_key_value_heads, config.head_dim)
        return LayerKV(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            pos=torch.full((slots,), -1, dtype=torch.long, device=device),
            window=window,
        )

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions of the next `n` tokens, checked against the capacity."""
        if n > self.chunk:
            raise ValueError(f"a forward step of {n} tokens exceeds the cache's chunk of {self.chunk}")
        if self.max_tokens is not None and self.offset + n > self.max_tokens:
            raise PromptTooLong(
                f"{self.offset + n} tokens exceed the context of {self.max_tokens} this cache was made for "
                "(raise max_tokens, or pass max_kv_size to cap the attention span)"
            )
        device = self.layers[0].pos.device
        return torch.arange(self.offset, self.offset + n, device=device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> LayerKV:
        """Store (B, T, K, D) keys/values at `positions`; return the layer's buffers to attend over."""
        kv = self.layers[layer]
        slots = positions % kv.pos.numel()
        kv.k.index_copy_(1, slots, k.to(kv.k.dtype))
        kv.v.index_copy_(1, slots, v.to(kv.v.dtype))
        kv.pos.index_copy_(0, slots, positions)
        return kv

    def advance(self, n: int) -> None:
        self.offset += n

    @property
    def nbytes(self) -> int:
        return sum(kv.k.nbytes + kv.v.nbytes + kv.pos.nbytes for kv in self.layers)
