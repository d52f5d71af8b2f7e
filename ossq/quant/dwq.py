"""DWQ, distilled weight quantization: the scales and biases of an affine-quantized checkpoint tuned by
gradient descent so that its next-token distributions match the full-precision model's on calibration
text (the method of mlx-lm's `mlx_lm.dwq`). The codes stay as GPTQ or round-to-nearest chose them and only
the (scale, bias) pairs move, so the result is the same plain MLX affine at the same size.

Why it helps after GPTQ: GPTQ minimises each layer's own output error with full-precision inputs, but the
error that reaches the logits is every layer's error carried through the quantized layers after it.
Distillation sees that end-to-end error directly, as the KL the table of issue 12 scores, so each layer's
pairs (and lm_head's, whose error is the largest share of the KL on a 201k vocabulary) move to cancel
what the others leave.

- Objective: the mean over calibration tokens of KL(teacher ‖ student) of the next-token distribution;
  the teacher is the source checkpoint, walked once layer by layer (ossq/calibrate.py) to its final
  hidden states, whose logits are recomputed per chunk from its lm_head.
- Parametrisation: scale = s₀(1 + σ), bias = b₀ + |s₀|·β, with σ = β = 0 at the start, so one learning rate
  suits every tensor whatever its magnitude. The forward rounds both to the stored dtype (bf16) with a
  straight-through gradient, so the loss trained is the loss of the checkpoint written.
- Held-out check: the last VALID_FRACTION of the calibration sequences are never trained on; their KL is
  measured before training and every `eval_every` steps, and the pairs written are those with the lowest
  held-out KL — distillation never returns a checkpoint worse, on text it did not fit, than it was given.
- Memory: the student's codes (one byte per weight) and pairs with their Adam moments on the device; each
  block and each logits chunk is checkpointed (recomputed in the backward pass), so at any time one
  layer's weights are dense. The forward is calibrate.block, the engine's reference math in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ossq.calibrate import Forward, Read, Tokens, block
from ossq.config import ModelConfig
from ossq.engine.ops import TorchOps
from ossq.errors import OssqError
from ossq.formats.mlx import layer_prefix, linear_modules
from ossq.quant import affine
from ossq.quant.spec import QuantSpec

SEQ_TOKENS = 512  # calibration text is cut into sequences of this length (fewer when it is short)
BATCH_SEQS = 4  # sequences per step
VALID_FRACTION = 0.125  # of the sequences, at least one, held out from training
LOGIT_CHUNK = 512  # tokens whose 201k-wide logits exist at once
LEARNING_RATE = 1e-3  # Adam on σ and β (relative units), cosine-decayed to zero after a 5 % warm-up


@dataclass(frozen=True)
class Result:
    """What distillation did: held-out KL before and after (the best step's), steps run, the step kept."""

    kl_before: float
    kl_after: float
    steps: int
    best_step: int
    train_tokens: int
    valid_tokens: int
    seconds: float


class _Pairs:
    """One affine module of the student: its codes fixed, its (scale, bias) pairs trained."""

    def __init__(self, wq: Tensor, scales: Tensor, biases: Tensor, spec: QuantSpec, device: torch.device) -> None:
        self.codes = affine.unpack(wq.to(device), spec.bits)  # uint8 (…, R, K)
        self.s0, self.b0 = scales.to(device, torch.float32), biases.to(device, torch.float32)
        self.dtype, self.group = scales.dtype, spec.group_size
        self.sigma = torch.zeros_like(self.s0, requires_grad=True)
        self.beta = torch.zeros_like(self.b0, requires_grad=True)

    def stored(self) -> tuple[Tensor, Tensor]:
        """(scale, bias) float32 as they would be stored: rounded to the dtype, gradient straight through."""
        return (
            _round(self.s0 * (1 + self.sigma), self.dtype),
            _round(self.b0 + self.s0.abs() * self.beta, self.dtype),
        )

    def dense(self, rows: Tensor | None = None) -> Tensor:
        """The dequantized weight (…, R, K) float32, or its `rows` (embedding lookups)."""
        s, b = self.stored()
        codes = self.codes
        if rows is not None:
            codes, s, b = codes[rows], s[rows], b[rows]
        q = codes.reshape(*codes.shape[:-1], -1, self.group).float()
        return (q * s[..., None] + b[..., None]).flatten(-2)


def _round(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x + (x.to(dtype).float() - x).detach()


class Student:
    """The quantized model as trainable pairs (affine modules) and fixed float32 tensors (everything
    else: MXFP4 or bf16 modules, norms, sinks, biases)."""

    def __init__(
        self,
        config: ModelConfig,
        specs: dict[str, QuantSpec | None],
        raw: Callable[[str], Tensor],
        dense: Read,
        device: torch.device,
    ) -> None:
        self.config = config
        self.pairs: dict[str, _Pairs] = {}
        self.fixed: dict[str, Tensor] = {}
        self.mods = {m.path: m for m in linear_modules(config)}
        for path, mod in self.mods.items():
            spec = specs[path]
            if spec is not None and spec.mode == "affine":
                parts = (raw(f"{path}.{p}") for p in ("weight", "scales", "biases"))
                self.pairs[path] = _Pairs(*parts, spec, device)
            else:
                self.fixed[f"{path}.weight"] = dense(f"{path}.weight", None).to(device, torch.float32)
            if mod.bias:
                self.fixed[f"{path}.bias"] = dense(f"{path}.bias", None).to(device, torch.float32)
        norms = [f"{layer_prefix(i)}.{n}" for i in range(config.num_hidden_layers) for n in _LAYER_PLAIN]
        for name in (*norms, "model.norm.weight"):
            self.fixed[name] = dense(name, None).to(device, torch.float32)
        if not self.pairs:
            raise OssqError("--distill tunes affine scales and biases, and this checkpoint has no affine module")

    def parameters(self) -> list[Tensor]:
        return [t for p in self.pairs.values() for t in (p.sigma, p.beta)]

    def weight(self, path: str) -> Tensor:
        pairs = self.pairs.get(path)
        return pairs.dense() if pairs is not None else self.fixed[f"{path}.weight"]

    def hidden(self, tokens: Tokens) -> Tensor:
        """The final norm's output (N, C) over `tokens`, each block recomputed in the backward pass."""
        embed = self.pairs.get("model.embed_tokens")
        rows, inverse = torch.unique(tokens.ids, return_inverse=True)
        x = (embed.dense(rows) if embed else self.fixed["model.embed_tokens.weight"][rows])[inverse]
        for layer in range(self.config.num_hidden_layers):
            x = checkpoint(self._block, x, tokens, layer, use_reentrant=False)
        return TorchOps().rms_norm(x, self.fixed["model.norm.weight"], self.config.rms_norm_eps)

    def _block(self, x: Tensor, tokens: Tokens, layer: int) -> Tensor:
        prefix = layer_prefix(layer) + "."
        w = {n.removeprefix(prefix): t for n, t in self.fixed.items() if n.startswith(prefix)}
        for path, mod in self.mods.items():
            if mod.layer == layer:
                w[f"{path.removeprefix(prefix)}.weight"] = self.weight(path)
        return block(w, x, tokens, self.config, layer)

    def state(self) -> list[Tensor]:
        return [t.detach().clone() for t in self.parameters()]

    def load(self, state: list[Tensor]) -> None:
        with torch.no_grad():
            for t, saved in zip(self.parameters(), state, strict=True):
                t.copy_(saved)

    def stored(self) -> Iterator[tuple[str, Tensor]]:
        """(tensor name, stored value) of every trained scale and bias, in the checkpoint's dtypes, on the CPU."""
        with torch.no_grad():
            for path, p in self.pairs.items():
                s, b = p.stored()
                yield f"{path}.scales", s.to(p.dtype).cpu()
                yield f"{path}.biases", b.to(p.dtype).cpu()


_LAYER_PLAIN = ("self_attn.sinks", "input_layernorm.weight", "post_attention_layernorm.weight")


class _Teacher:
    """The full-precision model's final hidden states over every calibration token, and its lm_head."""

    def __init__(self, read: Read, config: ModelConfig, tokens: Tokens) -> None:
        forward = Forward(read, config, tokens)
        for _ in forward.layers():
            pass
        self.hidden = forward.final()
        self.lm_head = read("lm_head.weight", None).float()


def _kl_sum(student_h: Tensor, teacher_h: Tensor, lm_head: Callable[[], Tensor], teacher_head: Tensor) -> Tensor:
    """Σ over the chunk's tokens of KL(teacher ‖ student), float32."""
    with torch.no_grad():
        t = F.log_softmax(teacher_h @ teacher_head.T, dim=-1)
    s = F.log_softmax(student_h @ lm_head().T, dim=-1)
    return (t.exp() * (t - s)).sum()


def _sequences(n: int) -> tuple[int, list[tuple[int, int]]]:
    seq = min(SEQ_TOKENS, n // 2)
    if seq < 8:
        raise OssqError(f"--distill needs at least 16 calibration tokens, got {n}")
    return seq, [(a, a + seq) for a in range(0, n - seq + 1, seq)]


def distill(
    student: Student,
    teacher: Read,
    ids: list[int],
    *,
    steps: int,
    device: torch.device,
    lr: float = LEARNING_RATE,
    eval_every: int | None = None,
    seed: int = 0,
    on_step: Callable[[int, float | None], None] | None = None,
) -> Result:
    """Train `student`'s pairs for `steps` steps on the calibration tokens `ids` against the teacher read
    through `teacher`; the student ends holding the pairs of the best held-out KL. `on_step(step, kl)` is
    called after every step (kl: the held-out KL when measured, else None)."""
    if steps < 1:
        raise OssqError(f"--distill needs at least 1 step, got {steps}")
    start = time.perf_counter()
    config = student.config
    seq, spans = _sequences(len(ids))
    valid_n = max(1, round(len(spans) * VALID_FRACTION))
    if len(spans) - valid_n < 1:
        raise OssqError(f"--distill needs at least 2 × {seq} calibration tokens, got {len(ids)}")
    everything = Tokens.of(ids[: spans[-1][1]], device, seq_tokens=seq)
    teacher_out = _Teacher(teacher, config, everything)
    train, valid = spans[:-valid_n], spans[-valid_n:]
    lm_head = lambda: student.weight("lm_head")  # noqa: E731 — recomputed per chunk, inside its checkpoint

    def kl(batch: list[tuple[int, int]], grad: bool) -> Tensor:
        tokens = _batch_tokens(ids, batch, device)
        rows = torch.cat([torch.arange(a, b, device=device) for a, b in batch])
        with torch.set_grad_enabled(grad):
            h = student.hidden(tokens)
            total = h.new_zeros(())
            for c in range(0, len(rows), LOGIT_CHUNK):
                t_h = teacher_out.hidden[rows[c : c + LOGIT_CHUNK]]
                total = total + checkpoint(
                    _kl_sum, h[c : c + LOGIT_CHUNK], t_h, lm_head, teacher_out.lm_head, use_reentrant=False
                )
            return total / len(rows)

    def held_out() -> float:
        return sum(float(kl([span], grad=False)) for span in valid) / valid_n  # equal lengths: the token mean

    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    eval_every = eval_every or max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    best = before = held_out()
    best_step, best_state = 0, student.state()
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < BATCH_SEQS:
            order += torch.randperm(len(train), generator=gen).tolist()
        batch = [train[i] for i in order[:BATCH_SEQS]]
        del order[:BATCH_SEQS]
        optimizer.zero_grad(set_to_none=True)
        kl(batch, grad=True).backward()
        optimizer.step()
        schedule.step()
        measured = None
        if step % eval_every == 0 or step == steps:
            measured = held_out()
            if measured < best:
                best, best_step, best_state = measured, step, student.state()
        if on_step:
            on_step(step, measured)
    student.load(best_state)
    return Result(
        kl_before=before,
        kl_after=best,
        steps=steps,
        best_step=best_step,
        train_tokens=len(train) * seq,
        valid_tokens=valid_n * seq,
        seconds=time.perf_counter() - start,
    )


def _batch_tokens(ids: list[int], batch: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Tokens of the concatenated sequences `batch` (all the same length), each from position 0."""
    seq = batch[0][1] - batch[0][0]
    flat = [i for a, b in batch for i in ids[a:b]]
    return Tokens.of(flat, device, seq_tokens=seq)
