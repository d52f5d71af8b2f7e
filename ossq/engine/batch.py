"""The metadata of one forward step over a flat batch of tokens from many sequences.

A step mixes prefill chunks of new requests and the one decode token of each running request: the
model sees N tokens in a row, sequence after sequence (N = Σ T_s). Everything the ops need to keep the
sequences apart is here, on the device for kernels and, for the reference path's per-sequence loop, as
host tuples built together with them — so no op ever reads a tensor back to learn a length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ossq.engine.kv import BLOCK_TOKENS


def device_tensor(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Host values as a tensor on `device`, copied without waiting for the device: a blocking copy of
    pageable memory would synchronise the stream (and trip `torch.cuda.set_sync_debug_mode("error")`);
    a non-blocking one stages the values before it returns, so the temporary may go at once."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step: tokens `start` .. `start + len(tokens)` of it, through its block
    table (block ids; −1 for a block released because it left every window)."""

    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]
    logits_from: int | None = None  # first position of the chunk whose logits are wanted (None: none)


@dataclass(frozen=True)
class Batch:
    """S sequences, N tokens. Device tensors:

    - `tokens` (N,) int64 and `positions` (N,) int64, the absolute position of each token in its sequence;
    - `slots` (N,) int64: the pool row (engine/kv.py) each token's key and value are written to;
    - `block_tables` (S, max blocks) int32, −1 padded; `query_start` (S + 1,) int32, the first row of each
      sequence (cumulative); `seq_lens` (S,) int32, each sequence's length once this step is written;
    - `logits_rows` (R,) int64: the rows whose logits the model returns, in this order.

    `host_query_start` and `host_seq_lens` repeat `query_start` and `seq_lens` as Python ints.
    `max_kv_size` caps the keys the full-attention layers see (None: all earlier positions).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    logits_rows: torch.Tensor
    host_query_start: tuple[int, ...]
    host_seq_lens: tuple[int, ...]
    max_kv_size: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.host_seq_lens)

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], *, device: torch.device | str, max_kv_size: int | None = None) -> Batch:
        """The step that writes every chunk; logits rows are each chunk's rows from `logits_from` on."""
        tokens, positions, slots, rows, query_start, seq_lens = [], [], [], [], [0], []
        for c in chunks:
            n = len(c.tokens)
            tokens.extend(c.tokens)
            span = range(c.start, c.start + n)
            positions.extend(span)
            slots.extend(c.block_table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS for p in span)
            if c.logits_from is not None:
                first = query_start[-1] + max(c.logits_from - c.start, 0)
                rows.extend(range(first, query_start[-1] + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(c.start + n)
        width = max(len(c.block_table) for c in chunks)
        tables = [list(c.block_table) + [-1] * (width - len(c.block_table)) for c in chunks]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return device_tensor(values, dtype, device)

        return cls(
            tokens=tensor(tokens, torch.int64),
            positions=tensor(positions, torch.int64),
            slots=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            query_start=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            logits_rows=tensor(rows, torch.int64),
            host_query_start=tuple(query_start),
            host_seq_lens=tuple(seq_lens),
            max_kv_size=max_kv_size,
        )
