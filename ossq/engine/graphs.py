"""Decode steps as CUDA graphs: one capture per batch-size bucket, one replay per step.

A decode step of one token runs a few hundred small kernels; launched one by one from Python, the launches
cost more than the kernels. A CUDA graph records the whole forward once and replays it with one call.
A speculative verification step (a request's last token and its drafts, every one wanting its logits)
and a short prompt come here too, as one one-token row per token (engine._token_rows), so drafting and
the first token pay for a replay of a bigger bucket rather than for an eager forward. What a graph
needs, and where it comes from:

- **Static inputs.** The step's tokens, positions, slots, lengths and block tables live in device tensors
  the graph was captured with; each step writes its values into them (two host-to-device copies from
  pinned memory) before the replay.
- **Static shapes.** Batches are padded up to the next bucket of GRAPH_BATCHES. A padding row has length
  0 (attention reads nothing) and writes its key and value to a trash block the block manager never
  hands out. Block tables are padded to a power-of-two width (at least MIN_TABLE_BLOCKS), so a graph is
  keyed by (bucket, width) and a long context adds a capture only when it doubles.
- **No host sync, the same launches whatever the data.** The ops promise this up to `graph_tokens`
  tokens (engine/ops.py); the Triton decode attention sizes its splits on the device, so one graph
  serves every length of its width.

- **Inputs that outlive the capture.** A graph holds raw pointers: every tensor made outside the capture
  and read inside it (the buffers above, the logits rows) is kept with the graph, or the allocator hands
  its memory to the next tensor and the replay reads that tensor's values as indices.

Graphs share one memory pool; only one replays at a time, and its logits are sampled (in stream order)
before the next replays — also when the engine launches that next step before booking this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ossq.engine.batch import Batch, SeqChunk
from ossq.engine.kv import BLOCK_TOKENS, KVPool
from ossq.engine.model import GptOss

GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_TABLE_BLOCKS = 16


def bucket(num_seqs: int) -> int | None:
    """The smallest graph batch that holds `num_seqs` sequences (None: larger than any)."""
    return next((b for b in GRAPH_BATCHES if b >= num_seqs), None)


@dataclass
class _Graph:
    """One captured decode step of `batch` rows and table `width`, with its input buffers: `host64` /
    `dev64` hold tokens, positions and slots; `host32` / `dev32` lengths and block tables; `batch` the
    views of them (and the logits rows) the graph was captured with."""

    graph: torch.cuda.CUDAGraph
    batch: Batch
    host64: torch.Tensor
    host32: torch.Tensor
    dev64: torch.Tensor
    dev32: torch.Tensor
    logits: torch.Tensor
    rows: int
    width: int
    copied: torch.cuda.Event | None = None  # the last copy out of the host buffers


class DecodeGraphs:
    """Runs decode steps of up to `max_seqs` sequences (one token each) through captured graphs."""

    def __init__(self, model: GptOss, kv: KVPool, *, trash_block: int, max_seqs: int, max_kv_size: int | None):
        self.model, self.kv, self.max_kv_size = model, kv, max_kv_size
        self.trash_slot = trash_block * BLOCK_TOKENS
        self.max_seqs = max_seqs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_seqs

    def run(self, chunks: Sequence[SeqChunk], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) float32 of the one token of each chunk (B = len(chunks) ≤ max_seqs); `tokens` (B,)
        on the device replaces the chunks' tokens (the previous step's samples, not yet on the host)."""
        rows = bucket(len(chunks))
        longest = max(len(c.block_table) for c in chunks)
        width = max(MIN_TABLE_BLOCKS, 1 << (longest - 1).bit_length())
        g = self.graphs.get((rows, width)) or self._capture(rows, width)
        self._load(g, chunks)
        if tokens is not None:
            g.dev64[: len(chunks)].copy_(tokens)  # after the host copy, in stream order
        g.graph.replay()
        return g.logits[: len(chunks)]

    def _load(self, g: _Graph, chunks: Sequence[SeqChunk]) -> None:
        """Write the step's inputs (padding rows: token 0 at position 0, trash slot, length 0)."""
        B, R = len(chunks), g.rows
        assert B <= R
        if g.copied is not None:  # the host buffers are rewritten only once their last copy has left them
            g.copied.synchronize()
        h64 = g.host64.numpy()
        h32 = g.host32.numpy()
        h64[:] = 0
        h64[2 * R : 3 * R] = self.trash_slot
        lens = h32[:R]
        lens[:] = 0
        tables = h32[2 * R + 1 :].reshape(R, g.width)
        tables[:] = -1
        for i, c in enumerate(chunks):
            p = c.start
            h64[i], h64[R + i] = c.tokens[0], p
            h64[2 * R + i] = c.block_table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS
            lens[i] = p + 1
            tables[i, : len(c.block_table)] = c.block_table
        g.dev64.copy_(g.host64, non_blocking=True)
        g.dev32.copy_(g.host32, non_blocking=True)
        g.copied = torch.cuda.Event()
        g.copied.record()

    def _capture(self, rows: int, width: int) -> _Graph:
        device = self.model.device
        host64 = torch.zeros(3 * rows, dtype=torch.int64, pin_memory=True)
        host32 = torch.zeros(rows + (rows + 1) + rows * width, dtype=torch.int32, pin_memory=True)
        h32 = host32.numpy()
        h32[rows : 2 * rows + 1] = np.arange(rows + 1)  # query_start: one token per row, never changes
        dev64, dev32 = host64.to(device), host32.to(device)
        batch = Batch(
            tokens=dev64[:rows],
            positions=dev64[rows : 2 * rows],
            slots=dev64[2 * rows :],
            block_tables=dev32[2 * rows + 1 :].view(rows, width),
            query_start=dev32[rows : 2 * rows + 1],
            seq_lens=dev32[:rows],
            logits_rows=torch.arange(rows, device=device),
            host_query_start=tuple(range(rows + 1)),
            host_seq_lens=(1,) * rows,  # only their count reaches the graphed ops
            max_kv_size=self.max_kv_size,
        )
        g = _Graph(torch.cuda.CUDAGraph(), batch, host64, host32, dev64, dev32, torch.empty(0), rows, width)
        self._load(g, [])  # capture on padding rows: they write only the trash block
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up (compile the kernels, allocate the split-K counters)
            self.model(batch, self.kv)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = self.model(batch, self.kv)
        self.graphs[(rows, width)] = g
        return g
