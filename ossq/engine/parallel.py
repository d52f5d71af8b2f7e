"""Tensor and expert parallelism (`--tp N`, `--ep N`): which slice of each checkpoint tensor a rank
holds, and the collectives that make N ranks compute what one process computes.

The model stays one file (engine/model.py); parallelism enters it at three points only:
- construction: every Linear and the sinks are built at this rank's shape (`shard_info`, `heads`);
- loading: every rank reads only its slice of each tensor straight from the checkpoint (`shard`);
- four collectives: the vocabulary-parallel embedding, the all-reduce after o_proj, the all-reduce after
  the mixture of experts, and the all-gather of the logits.

Placement (N ranks, rank r; H query heads, K kv heads, E experts, V vocabulary; MLX stores a weight as
(out, in·bits/32) packed along its input, formats.md §3.3):
- q_proj rows and the sinks: query heads r·H/N … (r+1)·H/N. k_proj, v_proj rows: the kv heads those query
  heads read — K/N of them when N ≤ K; when N > K each kv head is replicated on the N/K ranks of its group.
- o_proj: the same heads' columns of its input, i.e. the last axis of weight, scales and biases, which must
  cut whole quantization groups (and so whole uint32 words: a group is ≥ 32 inputs); its bias lives on
  rank 0 only (the others hold zeros), so the all-reduce of the partial products adds it once.
- experts: whole experts r·E/N … (r+1)·E/N (gate, up and down of an expert stay together, so no matrix is
  cut and the quantization groups never matter). The router is replicated; each rank runs the tokens routed
  to its experts (TorchOps.moe's local-experts mask) and the partial sums are all-reduced.
- embed_tokens and lm_head: rows of the vocabulary r·V/N … (r+1)·V/N.
- norms and the router: whole on every rank.

Ranks agree without talking about it: after each all-reduce every rank holds the same bits (gloo and NCCL
give all ranks one result), so the residual stream, the router's top-k and the gathered logits are
identical on every rank, and with identical requests, seeds and pool sizes every rank schedules and
samples the same tokens. With one rank nothing here runs a collective and every shape is the whole.

Expert parallel (`--ep N`, `expert_only`): the throughput layout. Only the experts are split (as above);
attention, the router, the embedding and lm_head are whole on every rank, and each rank runs its own
requests with its own KV pool — data-parallel attention. A step's mixture of experts gathers every rank's
rows (padded to the longest; `step_rows` counts them once per forward), each rank applies its experts to
all of them, the partial sums are all-reduced and each rank keeps its rows. The ranks therefore step
together: while any has work (`any_rank`), one without lends its experts to the others (GptOss.idle), and
a rank done with its requests steps on until all are (Engine.wait_for_peers). The all-reduce moves every
row to every rank, which a reduce-scatter (NCCL) would halve; gloo has no reduce-scatter, so it is one
path for both. No CUDA graphs under --ep: a step's shapes depend on the other ranks' rows.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ossq.config import ModelConfig
from ossq.engine.kv import default_kv_tokens
from ossq.engine.ops import Ops, QuantizedWeight, default_ops, select_ops
from ossq.engine.sampling import SamplingParams, random_seed
from ossq.errors import ConfigError, OssqError, UnsupportedQuantization
from ossq.formats.hf import Checkpoint
from ossq.formats.mlx import LinearInfo, linear_modules
from ossq.quant.spec import QuantSpec

if TYPE_CHECKING:
    from ossq.engine.engine import EngineConfig
    from ossq.engine.model import GptOss

HEAD_KINDS = ("q_proj", "k_proj", "v_proj")
VOCAB_KINDS = ("embed_tokens", "lm_head")
EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


class ParallelError(OssqError):
    """A rank failed, died or timed out, or the ranks cannot be laid out as asked."""


@dataclass(frozen=True)
class Shard:
    """What one rank holds of a checkpoint tensor: `start:stop` along `axis` (None: the whole tensor);
    `zero`: nothing is read and the buffer stays zero (a replicated bias the all-reduce must add once)."""

    axis: int | None = None
    start: int = 0
    stop: int = 0
    zero: bool = False
    rows: tuple[int, ...] | None = None  # these rows of the first axis, in this order (--ep-placement)

    def index(self, ndim: int) -> tuple[slice, ...] | None:
        """The slices that select the shard from the whole tensor, for Checkpoint.read; None: whole."""
        if self.axis is None:
            return None
        index = [slice(None)] * ndim
        index[self.axis] = slice(self.start, self.stop)
        return tuple(index)


WHOLE = Shard()


@dataclass(frozen=True)
class Parallel:
    """This process's place among `world_size` ranks. `group` is the torch.distributed process group
    (None: the default one); `device` is the rank's device where the launcher chose it (one GPU per
    rank), None to let the caller decide. `expert_only` (`--ep N`): only the experts are split; every
    rank holds the rest whole and runs its own requests (module docstring, "Expert parallel")."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    device: str | None = None
    expert_only: bool = False
    # under --ep: each layer's slot order of its experts (rank r holds slots r·E/N … (r+1)·E/N; None:
    # expert i in slot i), and, if given, (layers, E) int64 pairs routed to each slot, on the device
    placement: tuple[tuple[int, ...], ...] | None = None
    routed: Tensor | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def splits_dense(self) -> bool:
        """Attention heads and the vocabulary are split (`--tp`), not whole on every rank."""
        return self.active and not self.expert_only

    @property
    def lockstep(self) -> bool:
        """Ranks run requests of their own (`--ep`), so they must agree on every step's rows."""
        return self.active and self.expert_only

    @property
    def flag(self) -> str:
        return "--ep" if self.expert_only else "--tp"

    # ---- placement ---------------------------------------------------------------------------------
    def _part(self, total: int, dense: bool = True) -> range:
        if dense and not self.splits_dense:
            return range(total)
        return range(*_part_bounds(self.rank, self.world_size, total))

    def heads(self, config: ModelConfig) -> range:
        """The query heads of this rank."""
        return self._part(config.num_attention_heads)

    def kv_heads(self, config: ModelConfig) -> range:
        """The kv heads this rank's query heads read: K/N of them, or one shared by N/K ranks when N > K."""
        K, N = config.num_key_value_heads, self.world_size
        if N <= K or not self.splits_dense:
            return self._part(K)
        first = self.rank // (N // K)
        return range(first, first + 1)

    def experts(self, config: ModelConfig) -> range:
        return self._part(config.num_local_experts, dense=False)

    def vocab(self, config: ModelConfig) -> range:
        return self._part(config.vocab_size)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of the attention this rank runs: its heads only (what the KV pool and the kernels
        size themselves by); experts and vocabulary keep their whole counts (the router and the gathered
        logits span them all)."""
        if not self.splits_dense:
            return config
        return dataclasses.replace(
            config, num_attention_heads=len(self.heads(config)), num_key_value_heads=len(self.kv_heads(config))
        )

    def shard_info(self, info: LinearInfo, config: ModelConfig) -> LinearInfo:
        """The module as this rank stores it."""
        if not self.active or (self.expert_only and info.kind not in EXPERT_KINDS):
            return info
        D = config.head_dim
        if info.kind == "q_proj":
            return dataclasses.replace(info, out_features=len(self.heads(config)) * D)
        if info.kind in ("k_proj", "v_proj"):
            return dataclasses.replace(info, out_features=len(self.kv_heads(config)) * D)
        if info.kind == "o_proj":
            return dataclasses.replace(info, in_features=len(self.heads(config)) * D)
        if info.kind in EXPERT_KINDS:
            return dataclasses.replace(info, experts=len(self.experts(config)))
        if info.kind in VOCAB_KINDS:
            return dataclasses.replace(info, out_features=len(self.vocab(config)))
        return info

    def shard(self, name: str, shape: tuple[int, ...], config: ModelConfig) -> Shard:
        """The slice of checkpoint tensor `name` (an MLX name, of whole shape `shape`) this rank holds."""
        if not self.active:
            return WHOLE
        module, _, part = name.rpartition(".")
        if self.expert_only:
            info = _infos(config).get(module)
            kind, layer = (info.kind, info.layer) if info else (None, None)
            if self.placement is not None and kind == "router":  # its outputs in slot order
                return Shard(axis=0, rows=self.placement[layer])
            if self.placement is not None and kind in EXPERT_KINDS:
                slots = self.experts(config)
                return Shard(axis=0, rows=self.placement[layer][slots.start : slots.stop])
            return _rows(self.experts(config), 1) if kind in EXPERT_KINDS else WHOLE
        if part == "sinks":
            return _rows(self.heads(config), 1)
        kind = info.kind if (info := _infos(config).get(module)) else None
        D = config.head_dim
        if kind == "q_proj":
            return _rows(self.heads(config), D)
        if kind in ("k_proj", "v_proj"):
            return _rows(self.kv_heads(config), D)
        if kind == "o_proj" and part == "bias":
            return WHOLE if self.rank == 0 else Shard(zero=True)
        if kind == "o_proj":  # weight, scales, biases: this rank's heads are an N-th of the packed input axis
            width = shape[-1]
            if width % self.world_size:
                raise UnsupportedQuantization(f"--tp {self.world_size} cannot cut {name}'s {width} columns evenly")
            return Shard(len(shape) - 1, *_part_bounds(self.rank, self.world_size, width))
        if kind in EXPERT_KINDS:
            return _rows(self.experts(config), 1)
        if kind in VOCAB_KINDS:
            return _rows(self.vocab(config), 1)
        return WHOLE

    def default_ops(self, device: torch.device | None = None) -> str | None:
        """The ops to run when none are named: the device's (None) alone; across ranks the device's if
        they honour a partial expert stack (Triton on CUDA), else the reference."""
        if not self.active:
            return None
        name = default_ops(device or torch.device("cpu"))
        return name if getattr(type(select_ops(name, device)).moe, "partial_experts", False) else "torch"

    def check_ops(self, ops: Ops | str | None) -> None:
        """Across ranks the mixture of experts must honour a partial expert stack: a `moe` marked
        `partial_experts` (engine/ops.py; TorchOps' and TritonOps' are). `ops` is an implementation, its name, or None
        (`default_ops`)."""
        if not self.active:
            return
        if ops is None or isinstance(ops, str):
            ops = select_ops(ops or self.default_ops(), torch.device("cpu"))  # the class decides, not the device
        if not getattr(type(ops).moe, "partial_experts", False):
            name = getattr(ops, "name", type(ops).__name__)
            raise OssqError(
                f"{self.flag} {self.world_size} runs with the torch or triton ops (the {name!r} ops compute the whole "
                "expert stack); pass --ops torch or leave --ops out"
            )

    def check(self, config: ModelConfig, specs: dict[str, QuantSpec | None]) -> None:
        """Fail, before any work, when the model cannot be split `world_size` ways."""
        if not self.active:
            return
        N, c, flag = self.world_size, config, self.flag
        split = [("attention heads", c.num_attention_heads)] if self.splits_dense else []
        split.append(("experts", c.num_local_experts))
        if self.splits_dense:
            split.append(("vocabulary rows", c.vocab_size))
        for what, count in split:
            if count % N:
                raise ConfigError(f"{flag} {N} does not divide the model's {count} {what}; choose a divisor of {count}")
        if not self.splits_dense:
            return
        K = c.num_key_value_heads
        if K % N and N % K:
            raise ConfigError(f"--tp {N} and the model's {K} kv heads: one must divide the other")
        inputs = c.num_attention_heads // N * c.head_dim
        for info in linear_modules(c):
            spec = specs.get(info.path)
            if info.kind == "o_proj" and spec is not None and inputs % spec.group_size:
                raise UnsupportedQuantization(
                    f"--tp {N} gives each rank {inputs} inputs of {info.path}, which cuts its quantization groups "
                    f"of {spec.group_size}; choose a --tp whose share is a multiple of {spec.group_size}"
                )

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of every rank's partial `x`, on every rank (in place)."""
        if self.active:
            dist.all_reduce(x, group=self.group)
        return x

    def reduce_heads(self, x: Tensor) -> Tensor:
        """o_proj's partial products of this rank's heads summed over the ranks (under --tp)."""
        return self.all_reduce(x) if self.splits_dense else x

    def step_rows(self, n: int) -> list[int] | None:
        """Under --ep, every rank's row count for the step being run (one small all-gather per forward,
        which the ranks' mixtures of experts then share); None otherwise."""
        if not self.lockstep:
            return None
        t = torch.tensor([n], dtype=torch.int64, device=self._collective_device())
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        return [int(p.item()) for p in parts]

    def moe(self, ops: Ops, h: Tensor, mlp: Any, rows: list[int] | None, layer: int = 0, **kw: Any) -> Tensor:
        """The mixture of experts of h (N, C) over every rank's experts. Under --tp every rank holds the
        same rows: its experts' partial sums are all-reduced. Under --ep (`rows`: step_rows) each rank holds
        its own rows: the ranks' rows are gathered (each padded to the longest), every rank applies its
        experts to all of them, the partial sums are all-reduced and each rank keeps its own rows."""
        if rows is None:
            return self.all_reduce(ops.moe(h, mlp, **kw))
        width = max(rows)
        if width == 0:
            return h
        padded = h.new_zeros(width, h.shape[1])
        padded[: h.shape[0]] = h
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=self.group)
        if self.routed is not None:
            self._count_routes(ops, [p[:n] for p, n in zip(parts, rows, strict=True)], mlp, kw["top_k"], layer)
        y = self.all_reduce(ops.moe(torch.cat(parts), mlp, **kw))
        return y[self.rank * width : self.rank * width + h.shape[0]]

    def _count_routes(self, ops: Ops, parts: list[Tensor], mlp: Any, top_k: int, layer: int) -> None:
        """Add the step's (token, slot) pairs to `routed[layer]`, every rank's rows (not the padding): the
        router run once more, on the device, with no read back."""
        top = ops.linear(torch.cat(parts), mlp.router).topk(top_k, dim=-1).indices
        self.routed[layer].add_(torch.bincount(top.flatten(), minlength=self.routed.shape[1]))

    def routed_per_rank(self) -> list[int] | None:
        """The pairs counted in `routed` that each rank's experts served (one read back); None: not counted."""
        if self.routed is None:
            return None
        return self.routed.sum(0).view(self.world_size, -1).sum(1).tolist()  # rank r: slots r·E/N … (r+1)·E/N

    def routed_per_expert(self) -> list[list[int]] | None:
        """`routed` by layer and expert id (slots mapped back through the placement); None: not counted."""
        if self.routed is None:
            return None
        counts = self.routed.tolist()
        if self.placement is None:
            return counts
        out = [[0] * len(c) for c in counts]
        for layer, (row, order) in enumerate(zip(counts, self.placement, strict=True)):
            for slot, expert in enumerate(order):
                out[layer][expert] = row[slot]
        return out

    def any_rank(self, busy: bool) -> bool:
        """Whether any rank is `busy`: under --ep the ranks step together while one has work."""
        if not self.lockstep:
            return busy
        t = torch.tensor([int(busy)], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def embedding(self, ops: Ops, ids: Tensor, emb: QuantizedWeight, dtype: torch.dtype) -> Tensor:
        """Vocabulary-parallel lookup of ids (N,) → (N, C): this rank gathers the rows of its slice, a token
        outside it gets zeros here and its row from the rank that holds it (an exact all-reduce: x + 0)."""
        if not self.splits_dense:
            return ops.embedding(ids, emb, dtype)
        n = emb.weight.shape[0]
        local = ids - self.rank * n
        here = (local >= 0) & (local < n)
        x = ops.embedding(torch.where(here, local, 0), emb, dtype).masked_fill(~here[:, None], 0)
        return self.all_reduce(x)

    def gather_logits(self, logits: Tensor) -> Tensor:
        """(R, V/N) of this rank's vocabulary → (R, V) on every rank."""
        if not self.splits_dense:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, value, group=self.group)
        return every

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank: a random seed, a decision."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' `value`s (e.g. KV pool sizes, which free memory decides per GPU)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` with one seed for all ranks: rank 0's random one when none is given (each rank drawing
        its own would make them sample different tokens)."""
        if not self.active or params.seed is not None:
            return params
        return dataclasses.replace(params, seed=self.agree(random_seed()))

    def engine_config(self, config: EngineConfig, model: GptOss) -> EngineConfig:
        """`config` with a KV pool size that every rank shares: pool sizes drive admission and preemption,
        so ranks whose free memory differs must still schedule alike (the smallest default wins)."""
        if not self.active or config.kv_cache_tokens is not None:
            return config
        tokens = default_kv_tokens(model.config, model.dtype, model.device)
        return dataclasses.replace(config, kv_cache_tokens=self.agree_min(tokens))

    def _collective_device(self) -> str:
        return "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"


SINGLE = Parallel()


def check_checkpoint(path_or_repo: str | Path, tp: int, ops: str | None = None, *, expert_only: bool = False) -> None:
    """Fail before any rank starts when the checkpoint cannot be split `tp` ways (only its experts, with
    `expert_only`), or `ops` cannot run a shard (reads only the checkpoint's config and tensor headers)."""
    if tp == 1:
        return
    layout = Parallel(world_size=tp, expert_only=expert_only)
    layout.check_ops(ops)
    ckpt = Checkpoint(path_or_repo)
    try:
        layout.check(ckpt.config, ckpt.specs)
    finally:
        ckpt.close()


def _rows(part: range, per: int) -> Shard:
    return Shard(axis=0, start=part.start * per, stop=part.stop * per)


def _part_bounds(rank: int, world_size: int, total: int) -> tuple[int, int]:
    n = total // world_size
    return rank * n, (rank + 1) * n


@functools.lru_cache(maxsize=4)
def _infos(config: ModelConfig) -> dict[str, LinearInfo]:
    return {m.path: m for m in linear_modules(config)}


# ---- --ep-placement ----------------------------------------------------------------------------------------
def balanced_placement(routed: list[list[int]], ranks: int) -> tuple[tuple[int, ...], ...]:
    """Each layer's slot order that gives every rank E/N experts and loads them as evenly as the routing
    histogram `routed` (layers × E pairs) allows: the busiest expert first, each to the least-loaded rank
    with room (longest-processing-time first); each rank's experts in id order."""
    out = []
    for counts in routed:
        room = len(counts) // ranks
        load, held = [0] * ranks, [[] for _ in range(ranks)]
        for expert in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
            r = min((r for r in range(ranks) if len(held[r]) < room), key=lambda r: (load[r], r))
            load[r] += counts[expert]
            held[r].append(expert)
        out.append(tuple(e for h in held for e in sorted(h)))
    return tuple(out)


def read_placement(path: str | Path, config: ModelConfig, ranks: int) -> tuple[tuple[int, ...], ...]:
    """--ep-placement FILE → each layer's slot order. FILE is `ossq bench --ep … --json` output (its first
    row's `routed_per_expert`), {"routed": [[pairs per expert] per layer]}, or {"placement": [[expert ids
    in slot order] per layer]}."""
    import json

    L, E = config.num_hidden_layers, config.num_local_experts
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--ep-placement {path}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]:
        data = {"routed": data["rows"][0].get("routed_per_expert")}
    key = next((k for k in ("placement", "routed") if isinstance(data, dict) and k in data), None)
    table = data.get(key) if key else None
    shape_ok = isinstance(table, list) and len(table) == L and all(isinstance(r, list) and len(r) == E for r in table)
    if not shape_ok or not all(isinstance(v, int) and v >= 0 for r in table for v in r):
        raise ConfigError(
            f'--ep-placement {path}: expected a bench --ep JSON report, or {{"routed"|"placement": '
            f"[{L} lists of {E} non-negative integers]}} for this model's {L} layers of {E} experts"
        )
    if key == "routed":
        return balanced_placement(table, ranks)
    if any(sorted(r) != list(range(E)) for r in table):
        raise ConfigError(f"--ep-placement {path}: each layer's placement must list every expert 0..{E - 1} once")
    return tuple(tuple(r) for r in table)
