"""The calibration forward: the full-precision model run layer by layer over calibration text, collecting
what calibrated quantization needs — each linear's input second moments H = Σ x xᵀ (GPTQ's Hessian; its
diagonal is AWQ's activation scale) — and the block outputs that `--target-bpw` measures errors at.

The math is the engine's reference (engine/ops.py `rope`, `attend`, `TorchOps.rms_norm`; formats.md
§4.7), in float32, with the MoE written out expert by expert so each expert sees only the tokens routed
to it. q/k/v share one H (their common input), as do router, gate and up (the experts' gate/up H are
their routed tokens' share of it); down_proj's H is per expert, o_proj's is the attention output's.

Memory: one layer's weights, dense float32, on the device (for gpt-oss-20b 3.3 GB, mostly experts), its
Hessians (E × (C² + I²) × 4 B, 2 GB for 20b) and the hidden states N × C float32 of the N calibration
tokens; layers are read in order through `read` and dropped when the next one is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ossq.config import ModelConfig
from ossq.engine.model import yarn_inv_freq
from ossq.engine.ops import TorchOps, attend, rope
from ossq.formats.mlx import layer_prefix

Read = Callable[[str, int | None], Tensor]  # MLX tensor name, expert (None: whole) → dense float tensor
CALIB_SEQ_TOKENS = 1024  # calibration text is cut into sequences of this length, each run from position 0
ATTN = ("q_proj", "k_proj", "v_proj")
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
_REFERENCE = TorchOps()


@dataclass(frozen=True)
class Tokens:
    """Calibration tokens `ids` (N,) on the device, cut into sequences [start, stop) run from position 0."""

    ids: Tensor
    seqs: tuple[tuple[int, int], ...]
    positions: Tensor  # (N,) position of each token in its sequence

    @classmethod
    def of(cls, ids: list[int], device: torch.device, seq_tokens: int = CALIB_SEQ_TOKENS) -> Tokens:
        seqs = tuple((a, min(a + seq_tokens, len(ids))) for a in range(0, len(ids), seq_tokens))
        positions = torch.cat([torch.arange(b - a) for a, b in seqs])
        return cls(torch.tensor(ids, device=device), seqs, positions.to(device))


def load_layer(read: Read, config: ModelConfig, layer: int) -> dict[str, Tensor]:
    """Layer `layer`'s tensors in float32 under their MLX names less the layer prefix
    (`self_attn.q_proj.weight`, `mlp.experts.gate_proj.weight` (E, I, C), `input_layernorm.weight`, …)."""
    p = layer_prefix(layer)
    names = [f"self_attn.{m}.{t}" for m in (*ATTN, "o_proj") for t in ("weight", "bias")]
    names += ["self_attn.sinks", "mlp.router.weight", "mlp.router.bias"]
    names += [f"mlp.experts.{m}.bias" for m in EXPERT_PROJ]
    names += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    w = {n: read(f"{p}.{n}", None).float() for n in names}
    for m in EXPERT_PROJ:
        experts = range(config.num_local_experts)
        w[f"mlp.experts.{m}.weight"] = torch.stack([read(f"{p}.mlp.experts.{m}.weight", e).float() for e in experts])
    return w


class Hessians:
    """Σ x xᵀ of one layer's linear inputs (float32), and how many tokens each sum holds."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        c = config
        C, I, E, HD = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_attention_heads * c.head_dim
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        self.attn, self.o, self.mlp = zeros(C, C), zeros(HD, HD), zeros(C, C)
        self.experts, self.down = zeros(E, C, C), zeros(E, I, I)
        self.expert_tokens = torch.zeros(E, dtype=torch.int64)

    def of(self, kind: str) -> Tensor:
        """The H of a module kind: (C, C), or (E, ·, ·) for the experts."""
        shared = {"o_proj": self.o, "router": self.mlp, "gate_proj": self.experts, "up_proj": self.experts}
        return self.attn if kind in ATTN else shared.get(kind, self.down)


def block(
    w: dict[str, Tensor], x: Tensor, tokens: Tokens, config: ModelConfig, layer: int, h: Hessians | None = None
) -> Tensor:
    """One transformer block on the residual stream x (N, C) float32 → the new stream; with `h`, add
    this step's inputs to its sums."""
    eps = config.rms_norm_eps
    a_in = _REFERENCE.rms_norm(x, w["input_layernorm.weight"], eps)
    o_in = _attention(w, a_in, tokens, config, layer)  # (N, H·D)
    x = x + F.linear(o_in, w["self_attn.o_proj.weight"], w["self_attn.o_proj.bias"])
    m_in = _REFERENCE.rms_norm(x, w["post_attention_layernorm.weight"], eps)
    if h is not None:
        h.attn += a_in.T @ a_in
        h.o += o_in.T @ o_in
        h.mlp += m_in.T @ m_in
    return x + _moe(w, m_in, config, h)


def _attention(w: dict[str, Tensor], x: Tensor, tokens: Tokens, config: ModelConfig, layer: int) -> Tensor:
    N, D = x.shape[0], config.head_dim
    q, k, v = (F.linear(x, w[f"self_attn.{m}.weight"], w[f"self_attn.{m}.bias"]).view(N, -1, D) for m in ATTN)
    freqs = tokens.positions[:, None].float() * yarn_inv_freq(config).to(x.device)[None, :]
    cos, sin = freqs.cos() * config.attention_factor, freqs.sin() * config.attention_factor
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    out = torch.empty_like(q)
    for a, b in tokens.seqs:
        pos = tokens.positions[a:b]
        sinks = w["self_attn.sinks"]
        out[a:b] = attend(q[a:b], k[a:b], v[a:b], sinks, pos, pos, window=config.window(layer), scale=D**-0.5)
    return out.reshape(N, -1)


def _moe(w: dict[str, Tensor], x: Tensor, config: ModelConfig, h: Hessians | None) -> Tensor:
    """Router top-k, softmax over the k, clamped SwiGLU experts over their routed tokens (formats.md §4.7)."""
    c = config
    logits = F.linear(x, w["mlp.router.weight"], w["mlp.router.bias"])  # (N, E)
    top_v, top_i = torch.topk(logits, c.num_experts_per_tok, dim=-1)
    weights = torch.softmax(top_v, dim=-1)
    out = torch.zeros_like(x)
    for e in range(c.num_local_experts):
        tok, slot = torch.where(top_i == e)
        xe = x[tok]
        gate = _expert_linear(w, "gate_proj", e, xe).clamp(max=c.swiglu_limit)
        up = _expert_linear(w, "up_proj", e, xe).clamp(-c.swiglu_limit, c.swiglu_limit)
        act = gate * torch.sigmoid(gate * c.swiglu_alpha) * (up + 1)
        out.index_add_(0, tok, _expert_linear(w, "down_proj", e, act) * weights[tok, slot, None])
        if h is not None:
            h.experts[e] += xe.T @ xe
            h.down[e] += act.T @ act
            h.expert_tokens[e] += len(tok)
    return out


def _expert_linear(w: dict[str, Tensor], proj: str, e: int, x: Tensor) -> Tensor:
    return F.linear(x, w[f"mlp.experts.{proj}.weight"][e], w[f"mlp.experts.{proj}.bias"][e])


class Forward:
    """The full-precision model walked layer by layer over `tokens`: `layers()` yields each layer's
    index, weights and Hessians (its input stream is the fp output of the layer before), then `final()`
    gives the final norm's output, lm_head's input."""

    def __init__(self, read: Read, config: ModelConfig, tokens: Tokens) -> None:
        self.read, self.config, self.tokens = read, config, tokens
        embed = read("model.embed_tokens.weight", None)
        self.x = embed[tokens.ids].float()  # (N, C) the residual stream
        self.device = self.x.device

    def layers(self) -> Iterator[tuple[int, dict[str, Tensor], Hessians]]:
        for i in range(self.config.num_hidden_layers):
            w = load_layer(self.read, self.config, i)
            h = Hessians(self.config, self.device)
            x_next = block(w, self.x, self.tokens, self.config, i, h)
            yield i, w, h
            self.x = x_next

    def final(self, x: Tensor | None = None) -> Tensor:
        """(N, C) float32: the final RMSNorm of the stream after the last layer (or of the stream x)."""
        norm = self.read("model.norm.weight", None).float()
        return _REFERENCE.rms_norm(self.x if x is None else x, norm, self.config.rms_norm_eps)
