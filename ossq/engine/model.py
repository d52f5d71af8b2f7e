"""gpt-oss in plain torch, checkable line by line against the reference math (shared spec formats.md §4.7,
openai/gpt-oss `torch/model.py`, transformers `GptOssForCausalLM`).

Module and parameter names equal the MLX checkpoint keys (formats/mlx.py), so loading is a strict
one-to-one match. Weights are stored as the checkpoint stores them (bf16, affine-packed or MXFP4) and
every heavy operation goes through `self.ops` (engine/ops.py), which is where faster kernels plug in.

A forward step runs a flat batch of N tokens from many sequences at once (prefill chunks and decode
tokens mixed); `Batch` (engine/batch.py) says which token belongs where, and the KV pool (engine/kv.py)
holds every sequence's keys and values. Shapes: N tokens, H query heads, K kv heads, D head dim,
C hidden, E experts, V vocab.

Under tensor or expert parallelism (engine/parallel.py) each rank builds the same modules at its shard's
shapes and calls the collectives that file defines; with one rank they return their input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ossq.config import ModelConfig
from ossq.engine.batch import Batch
from ossq.engine.kv import KVPool
from ossq.engine.ops import Ops, TorchOps
from ossq.engine.parallel import SINGLE, Parallel
from ossq.formats.mlx import LinearInfo, linear_modules
from ossq.quant.spec import QuantSpec


class Linear(nn.Module):
    """A weight as MLX stores it: `weight` (+ `scales`, `biases` when quantized) and an optional `bias`.
    With `info.experts` set it is a stack of per-expert matrices (mlx-lm's SwitchLinear)."""

    def __init__(self, info: LinearInfo, spec: QuantSpec | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        lead, n_in = info.lead, info.in_features
        if spec is None:
            self.register_buffer("weight", torch.zeros(*lead, n_in, dtype=dtype))
            self.scales = self.biases = None
        else:
            shapes = spec.stored_shapes(lead, n_in)
            scale_dtype = torch.uint8 if spec.mode == "mxfp4" else dtype
            self.register_buffer("weight", torch.zeros(shapes["weight"], dtype=torch.uint32))
            self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=scale_dtype))
            self.register_buffer("biases", torch.zeros(shapes["biases"], dtype=dtype) if "biases" in shapes else None)
        self.register_buffer("bias", torch.zeros(*lead, dtype=dtype) if info.bias else None)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(size, dtype=torch.float32))  # fp32, as transformers keeps it


class Rotary(nn.Module):
    """YaRN RoPE exactly as transformers computes it (`truncate: false` → no floor/ceil of the band)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", yarn_inv_freq(config), persistent=False)
        self.attention_factor = config.attention_factor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) → cos, sin (N, D/2), scaled by the YaRN concentration, in `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def yarn_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies; the same float32 operations in the same order as transformers'
    `_compute_yarn_parameters`, so the result is bit-identical."""
    dim, base, rs = config.head_dim, config.rope_theta, config.rope_scaling
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if rs is None:
        return extrapolation
    interpolation = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


class LinearBuilder:
    """Makes the Linear of an MLX module path, stored as `specs` says, in `dtype`, at this rank's shape."""

    def __init__(
        self, config: ModelConfig, specs: dict[str, QuantSpec | None], dtype: torch.dtype, parallel: Parallel
    ) -> None:
        self.infos: dict[str, LinearInfo] = {m.path: parallel.shard_info(m, config) for m in linear_modules(config)}
        self.specs, self.dtype, self.parallel = specs, dtype, parallel

    def __call__(self, path: str) -> Linear:
        return Linear(self.infos[path], self.specs.get(path), self.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make: LinearBuilder, ops: Ops) -> None:
        super().__init__()
        self.layer, self.ops, self.head_dim, self.parallel = layer, ops, config.head_dim, make.parallel
        self.window = config.window(layer)
        self.scale = config.head_dim**-0.5
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, make(f"model.layers.{layer}.self_attn.{name}"))
        heads = len(make.parallel.heads(config))  # this rank's query heads
        self.register_buffer("sinks", torch.zeros(heads, dtype=make.dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, kv: KVPool) -> torch.Tensor:
        N, ops = x.shape[0], self.ops
        qkv = ops.linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(N, -1, self.head_dim) for t in qkv)  # (N, H, D), (N, K, D), (N, K, D)
        k_pool, v_pool = kv.k[self.layer], kv.v[self.layer]
        q = ops.rope_and_store(q, k, v, cos, sin, k_pool, v_pool, batch.slots)  # k rotated, then k, v stored
        window = self.window or batch.max_kv_size  # max_kv_size caps the full layers, as mlx-lm's option
        o = ops.attention(q, k_pool, v_pool, self.sinks, batch, window=window, scale=self.scale)  # (N, H, D)
        return self.parallel.reduce_heads(ops.linear(o.reshape(N, -1), self.o_proj))  # the ranks' heads summed


class Experts(nn.Module):
    """The expert stack this rank holds; `first` is the global id of its first expert (0: the whole stack)."""

    def __init__(self, prefix: str, make: LinearBuilder, first: int) -> None:
        super().__init__()
        self.first = first
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, make(f"{prefix}.{name}"))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make: LinearBuilder) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}.mlp"
        self.router = make(f"{prefix}.router")
        self.experts = Experts(f"{prefix}.experts", make, make.parallel.experts(config).start)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make: LinearBuilder, ops: Ops) -> None:
        super().__init__()
        self.config, self.ops, self.parallel, self.layer = config, ops, make.parallel, layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, make, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer, make)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, kv: KVPool,
        next_norm: RMSNorm, rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """x the residual stream, h = input_layernorm(x) → the new stream and `next_norm` of it (the next
        block's input norm, or the final norm): each residual add is fused with the norm that follows it.
        `rows`: every rank's row count under --ep (Parallel.step_rows)."""
        ops, post = self.ops, self.post_attention_layernorm
        x, h = ops.add_rms_norm(x, self.self_attn(h, cos, sin, batch, kv), post.weight, post.eps)
        return ops.add_rms_norm(x, self.moe(h, rows), next_norm.weight, next_norm.eps)

    def moe(self, h: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """The mixture of experts, summed over the ranks' experts (engine/parallel.py)."""
        c = self.config
        kw = dict(top_k=c.num_experts_per_tok, limit=c.swiglu_limit, alpha=c.swiglu_alpha)
        return self.parallel.moe(self.ops, h, self.mlp, rows, layer=self.layer, **kw)


class Body(nn.Module):
    def __init__(self, config: ModelConfig, make: LinearBuilder, ops: Ops) -> None:
        super().__init__()
        self.embed_tokens = make("model.embed_tokens")
        self.layers = nn.ModuleList(Block(config, i, make, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GptOss(nn.Module):
    """The whole model (or, with `parallel`, one rank's shard of it: `config` is then the rank's view, its
    attention heads the local ones). `forward(batch, kv)` runs one step of many sequences and writes their
    keys and values into the pool."""

    def __init__(
        self,
        config: ModelConfig,
        specs: dict[str, QuantSpec | None] | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        ops: Ops | None = None,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        parallel.check(config, dict(specs or {}))
        self.config, self.dtype, self.parallel = parallel.local_config(config), dtype, parallel
        self.ops = ops or TorchOps()
        self.specs = dict(specs or {})
        make = LinearBuilder(config, self.specs, dtype, parallel)
        self.model = Body(config, make, self.ops)
        self.lm_head = make("lm_head")
        self.rotary = Rotary(config)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, batch: Batch, kv: KVPool) -> torch.Tensor:
        """→ logits (R, V) float32 of the rows `batch.logits_rows`, in that order."""
        ops, layers = self.ops, self.model.layers
        rows = self.parallel.step_rows(batch.tokens.shape[0])
        x = self.parallel.embedding(ops, batch.tokens, self.model.embed_tokens, self.dtype)  # (N, C)
        cos, sin = self.rotary(batch.positions, self.dtype)
        first = layers[0].input_layernorm
        h = ops.rms_norm(x, first.weight, first.eps)
        for block, next_norm in zip(layers, [*(b.input_layernorm for b in layers[1:]), self.model.norm], strict=True):
            x, h = block(x, h, cos, sin, batch, kv, next_norm, rows)
        if batch.logits_rows.numel() == 0:  # a prefill chunk short of its prompt's end: no logits wanted
            return x.new_zeros(0, self.config.vocab_size, dtype=torch.float32)
        logits = ops.linear(h[batch.logits_rows], self.lm_head).float()  # h: the final norm of the stream
        return self.parallel.gather_logits(logits)

    def idle(self) -> None:
        """A step with no rows of this rank's own, under --ep: its experts still serve the other ranks' rows
        (the same collectives, layer by layer, as `forward`)."""
        rows = self.parallel.step_rows(0)
        empty = torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for block in self.model.layers:
            block.moe(empty, rows)
