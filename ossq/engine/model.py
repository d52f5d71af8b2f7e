"""gpt-oss in plain torch, checkable line by line against the reference math (shared spec formats.md §4.7,
openai/gpt-oss `torch/model.py`, transformers `GptOssForCausalLM`).

Module and parameter names equal the MLX checkpoint keys (formats/mlx.py), so loading is a strict
one-to-one match. Weights are stored as the checkpoint stores them (bf16, affine-packed or MXFP4) and
every heavy operation goes through `self.ops` (engine/ops.py), which is where faster kernels plug in.

Shapes: B batch, T tokens, H query heads, K kv heads, D head dim, C hidden, E experts, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ossq.config import ModelConfig
from ossq.engine.cache import KVCache
from ossq.engine.ops import TorchOps
from ossq.formats.mlx import LinearInfo, QuantSpec, linear_modules


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
        """positions (T,) → cos, sin (T, D/2), scaled by the YaRN concentration, in `dtype`."""
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
    """Makes the Linear of an MLX module path, stored as `specs` says, in `dtype`."""

    def __init__(self, config: ModelConfig, specs: dict[str, QuantSpec | None], dtype: torch.dtype) -> None:
        self.infos: dict[str, LinearInfo] = {m.path: m for m in linear_modules(config)}
        self.specs, self.dtype = specs, dtype

    def __call__(self, path: str) -> Linear:
        return Linear(self.infos[path], self.specs.get(path), self.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make: LinearBuilder, ops: TorchOps) -> None:
        super().__init__()
        self.layer, self.ops, self.head_dim = layer, ops, config.head_dim
        self.scale = config.head_dim**-0.5
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, make(f"model.layers.{layer}.self_attn.{name}"))
        self.register_buffer("sinks", torch.zeros(config.num_attention_heads, dtype=make.dtype))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        ops = self.ops
        q = ops.linear(x, self.q_proj).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = ops.linear(x, self.k_proj).view(B, T, -1, self.head_dim)  # (B, T, K, D)
        v = ops.linear(x, self.v_proj).view(B, T, -1, self.head_dim)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        kv = cache.write(self.layer, k, v, positions)
        o = ops.attention(
            q, kv.k, kv.v, self.sinks, q_pos=positions, k_pos=kv.pos, window=kv.window, scale=self.scale
        )  # (B, T, H, D)
        return ops.linear(o.reshape(B, T, -1), self.o_proj)


class Experts(nn.Module):
    def __init__(self, prefix: str, make: LinearBuilder) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, make(f"{prefix}.{name}"))


class MLP(nn.Module):
    def __init__(self, layer: int, make: LinearBuilder) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}.mlp"
        self.router = make(f"{prefix}.router")
        self.experts = Experts(f"{prefix}.experts", make)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make: LinearBuilder, ops: TorchOps) -> None:
        super().__init__()
        self.config, self.ops = config, ops
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, make, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(layer, make)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        c, ops = self.config, self.ops
        x = x + self.self_attn(self._norm(x, self.input_layernorm), cos, sin, positions, cache)
        h = self._norm(x, self.post_attention_layernorm)
        moe = ops.moe(
            h.reshape(-1, h.shape[-1]),
            self.mlp,
            top_k=c.num_experts_per_tok,
            limit=c.swiglu_limit,
            alpha=c.swiglu_alpha,
        )
        return x + moe.view_as(x)

    def _norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return self.ops.rms_norm(x, norm.weight, norm.eps)


class Body(nn.Module):
    def __init__(self, config: ModelConfig, make: LinearBuilder, ops: TorchOps) -> None:
        super().__init__()
        self.embed_tokens = make("model.embed_tokens")
        self.layers = nn.ModuleList(Block(config, i, make, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GptOss(nn.Module):
    """The whole model. `forward(tokens, cache)` runs one chunk and advances the cache."""

    def __init__(
        self,
        config: ModelConfig,
        specs: dict[str, QuantSpec | None] | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        ops: TorchOps | None = None,
    ) -> None:
        super().__init__()
        self.config, self.dtype = config, dtype
        self.ops = ops or TorchOps()
        self.specs = dict(specs or {})
        make = LinearBuilder(config, self.specs, dtype)
        self.model = Body(config, make, self.ops)
        self.lm_head = make("lm_head")
        self.rotary = Rotary(config)

    def make_cache(
        self, *, max_tokens: int, batch: int = 1, max_kv_size: int | None = None, chunk: int | None = None
    ) -> KVCache:
        device = self.lm_head.weight.device
        kwargs = {"chunk": chunk} if chunk else {}
        return KVCache(
            self.config,
            max_tokens=max_tokens,
            batch=batch,
            max_kv_size=max_kv_size,
            dtype=self.dtype,
            device=device,
            **kwargs,
        )

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V) in float32 ((B, 1, V) with `last_only`).

        Without a cache the call is a full forward over `tokens` from position 0.
        """
        B, T = tokens.shape
        if cache is None:
            cache = self.make_cache(max_tokens=T, batch=B, chunk=T)
        positions = cache.positions(T)
        x = self.ops.embedding(tokens, self.model.embed_tokens, self.dtype)  # (B, T, C)
        cos, sin = self.rotary(positions, self.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, positions, cache)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.ops.rms_norm(x, self.model.norm.weight, self.model.norm.eps)
        return self.ops.linear(x, self.lm_head).float()
