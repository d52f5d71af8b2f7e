"""Train a small real gpt-oss, a test asset for measuring quantization quality (benchmarks/quality.sh).

Architecture: gpt-oss's own (formats.md §4.7) with the real o200k_harmony vocabulary (201,088 rows),
alternating sliding (window 128) and full attention layers, attention sinks, GQA, clamped-SwiGLU experts
with top-4 routing and gpt-oss's YaRN rope config. Default size: 8 layers, hidden 512, 8 query / 2 kv
heads of 64, 16 experts of width 512 — 316M parameters, of which 206M are the embedding and lm_head.

Data: the public-domain texts in `--data` (shared data/README.md: the Jargon File, Debian package
`jargon-text`; the King James Bible, `bible-kjv` + `bible-kjv-text`). The last `--heldout-fraction` of
each file is held out (written to OUT/heldout.txt for `ossq ppl`); OUT/calib.txt is a slice of the
training text, for `ossq convert --calib-data`.

Training: a plain PyTorch model built for training speed (parameters in fp32, bf16 autocast on CUDA,
AdamW, warm-up + cosine, a Switch-style load-balancing loss), for `--steps` or `--train-seconds`,
whichever ends first. Then the experts are rounded to MXFP4 by the OCP rule, as the released checkpoints
are, and the model is saved in the published Hugging Face layout through ossq.synth.write_checkpoint.
Finally the saved checkpoint is loaded by ossq's engine and its held-out loss compared with the
training model's (experts replaced by their MXFP4 values): they must agree (`--check-tolerance` nats).

    python benchmarks/train_small.py --out DIR [--tiny] [--device cuda]

writes DIR/model (the checkpoint), DIR/heldout.txt, DIR/calib.txt and DIR/train.json (size, data, steps,
loss curve, held-out loss and perplexity before and after the MXFP4 rounding, the engine's figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ossq.config import ModelConfig
from ossq.engine.model import yarn_inv_freq
from ossq.quant import mxfp4


@dataclass(frozen=True)
class TrainConfig:
    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 16
    intermediate: int = 512
    steps: int = 100_000
    train_seconds: float = 170.0
    batch: int = 16
    seq: int = 512
    lr: float = 3e-3
    warmup: int = 100
    balance: float = 0.01  # weight of the load-balancing loss
    heldout_fraction: float = 0.05
    eval_tokens: int = 32_768
    calib_chars: int = 400_000
    max_chars: int | None = None  # read at most this much of each file (the smoke test)
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_local_experts=self.experts,
            num_experts_per_tok=4,
            max_position_embeddings=131072,
        )


TINY = TrainConfig(
    layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=4, intermediate=64, steps=20, batch=4, seq=64,
    warmup=5, eval_tokens=2048, calib_chars=20_000, max_chars=200_000,
)  # fmt: skip


# ---- data -----------------------------------------------------------------------------------------------
def split_texts(data: Path, fraction: float, max_chars: int | None) -> tuple[list[str], list[str]]:
    """Each .txt file of `data` cut at a line break: (first 1 − fraction of each, the rest of each)."""
    files = sorted(data.glob("*.txt"))
    if not files:
        sys.exit(f"{data}: no .txt files (copy shared data/*.txt there)")
    train, heldout = [], []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")[:max_chars]
        cut = text.rfind("\n", 0, int(len(text) * (1 - fraction))) + 1
        train.append(text[:cut])
        heldout.append(text[cut:])
    return train, heldout


def encode(texts: list[str]) -> list[int]:
    """o200k_harmony ids of every text, `<|endoftext|>` between them, as `ossq ppl` joins documents."""
    from ossq.harmony import ENDOFTEXT
    from ossq.tokenizer import Tokenizer

    tok = Tokenizer.o200k_harmony()
    ids: list[int] = []
    for t in texts:
        ids += ([ENDOFTEXT] if ids else []) + tok.encode(t, allow_special=False)
    return ids


# ---- the training model -------------------------------------------------------------------------------
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    h = x.float()
    return (w * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, heads, D), cos/sin (T, D/2): halves rotated, as engine/ops.py `rope`."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        C, H, K, D, E, I = (
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_local_experts,
            c.intermediate_size,
        )  # fmt: skip
        self.c, self.window = c, c.window(layer)
        self.q, self.k, self.v, self.o = (
            nn.Linear(C, H * D),
            nn.Linear(C, K * D),
            nn.Linear(C, K * D),
            nn.Linear(H * D, C),
        )
        self.sinks = nn.Parameter(torch.zeros(H))
        self.norm1, self.norm2 = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))
        self.router = nn.Linear(C, E)
        self.gate, self.up = nn.Parameter(torch.empty(E, I, C)), nn.Parameter(torch.empty(E, I, C))
        self.down = nn.Parameter(torch.empty(E, C, I))
        self.gate_b, self.up_b, self.down_b = (nn.Parameter(torch.zeros(E, n)) for n in (I, I, C))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, C) → (new stream, this layer's load-balancing loss)."""
        x = x + self.o(self.attention(rms_norm(x, self.norm1, self.c.rms_norm_eps), cos, sin))
        y, balance = self.moe(rms_norm(x, self.norm2, self.c.rms_norm_eps))
        return x + y, balance

    def attention(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = h.shape
        D, H = self.c.head_dim, self.c.num_attention_heads
        q = rope(self.q(h).view(B, T, H, D), cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = (
            rope(self.k(h).view(B, T, -1, D), cos, sin)
            .transpose(1, 2)
            .repeat_interleave(H // self.c.num_key_value_heads, 1)
        )
        v = self.v(h).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // self.c.num_key_value_heads, 1)
        scores = (q @ k.transpose(-1, -2)).float() * D**-0.5  # (B, H, T, T)
        pos = torch.arange(T, device=h.device)
        visible = pos[None, :] <= pos[:, None]
        if self.window is not None:
            visible &= pos[None, :] > pos[:, None] - self.window
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = self.sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]  # the sink only adds to the denominator
        return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, H * D)

    def moe(self, h: Tensor) -> tuple[Tensor, Tensor]:
        c = self.c
        x = h.reshape(-1, h.shape[-1])  # (N, C)
        logits = self.router(x).float()
        top_v, top_i = torch.topk(logits, c.num_experts_per_tok, dim=-1)
        weights = torch.softmax(top_v, -1)
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(c.num_local_experts):
            tok, slot = torch.where(top_i == e)
            xe = x[tok]
            gate = (xe @ self.gate[e].T.to(xe.dtype) + self.gate_b[e].to(xe.dtype)).clamp(max=c.swiglu_limit)
            up = (xe @ self.up[e].T.to(xe.dtype) + self.up_b[e].to(xe.dtype)).clamp(-c.swiglu_limit, c.swiglu_limit)
            act = gate * torch.sigmoid(gate * c.swiglu_alpha) * (up + 1)
            y = act @ self.down[e].T.to(act.dtype) + self.down_b[e].to(act.dtype)
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        fraction = F.one_hot(top_i, c.num_local_experts).float().sum((0, 1)) / top_i.numel()  # (E,)
        balance = c.num_local_experts * (fraction * torch.softmax(logits, -1).mean(0)).sum()
        return out.to(h.dtype).view_as(h), balance


class Net(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", yarn_inv_freq(c), persistent=False)
        self._init()

    def _init(self) -> None:
        depth = (2 * self.c.num_hidden_layers) ** -0.5
        for name, p in self.named_parameters():
            if name.endswith(("norm1", "norm2", "norm")):
                continue
            if p.dim() == 1 or name.endswith("_b") or "sinks" in name:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02 * (depth if name.endswith(("o.weight", "down")) else 1.0))

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, T) → (logits (B, T, V), summed load-balancing loss)."""
        freqs = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.c.attention_factor, freqs.sin() * self.c.attention_factor
        x, balance = self.embed(ids), 0.0
        for block in self.blocks:
            x, b = block(x, cos, sin)
            balance = balance + b
        return self.lm_head(rms_norm(x, self.norm, self.c.rms_norm_eps)), balance


# ---- training -----------------------------------------------------------------------------------------
def autocast(device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def train(net: Net, ids: Tensor, tc: TrainConfig, device: torch.device) -> list[tuple[int, float]]:
    """AdamW with warm-up and cosine decay over `tc.steps` (stopping early at `tc.train_seconds`);
    → (step, loss) every 50 steps."""
    opt = torch.optim.AdamW(
        net.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    gen = torch.Generator().manual_seed(tc.seed)
    curve, start = [], time.perf_counter()
    budget = tc.steps
    for step in range(tc.steps):
        elapsed = time.perf_counter() - start
        if step == 20 and tc.train_seconds:  # after warm-up of the kernels, fix the step count to the budget
            budget = max(21, min(tc.steps, int(tc.train_seconds / (elapsed / 20))))
        if step >= budget:
            break
        for group in opt.param_groups:
            group["lr"] = tc.lr * min(1.0, (step + 1) / tc.warmup) * 0.5 * (1 + math.cos(math.pi * step / budget))
        starts = torch.randint(0, len(ids) - tc.seq - 1, (tc.batch,), generator=gen)
        batch = torch.stack([ids[s : s + tc.seq + 1] for s in starts.tolist()]).to(device)
        with autocast(device):
            logits, balance = net(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + tc.balance * balance).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == budget - 1:
            curve.append((step, float(loss.detach())))
            print(f"step {step}/{budget} loss {curve[-1][1]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return curve


@torch.no_grad()
def heldout_loss(net: Net, ids: list[int], window: int, device: torch.device) -> float:
    """Mean NLL (nats) over `ids` scored exactly as `ossq ppl` scores them (perplexity.windows)."""
    from ossq.perplexity import windows

    total, count = 0.0, 0
    for w in windows(len(ids), window, window):
        x = torch.tensor(ids[w.start : w.stop + 1], device=device)
        with autocast(device):
            logits, _ = net(x[None, :-1])
        nll = F.cross_entropy(logits[0].float(), x[1:], reduction="none")
        keep = torch.arange(w.start + 1, w.stop + 1, device=device) >= w.first_scored
        total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    return total / count


# ---- MXFP4 experts and the published layout ---------------------------------------------------------
@torch.no_grad()
def round_experts(net: Net) -> dict[str, tuple[Tensor, Tensor]]:
    """Round every expert weight to MXFP4 (OCP rule, mxfp4.encode_blocks) and put the rounded values back
    into the training model; → the published tensors {"layer.gate_up" / "layer.down": (blocks, scales)}.
    gate/up are interleaved row by row (even rows gate, odd up), as the published gate_up_proj is."""
    out = {}
    for i, b in enumerate(net.blocks):
        E, I, C = b.gate.shape
        gate_up = torch.stack([b.gate, b.up], dim=2).reshape(E, 2 * I, C)
        for name, w in (("gate_up", gate_up), ("down", b.down)):
            blocks, scales = mxfp4.encode_blocks(w.float())
            out[f"{i}.{name}"] = (blocks.cpu(), scales.cpu())
            rounded = mxfp4.decode_blocks(blocks, scales, dtype=torch.float32)
            if name == "down":
                b.down.copy_(rounded)
            else:
                b.gate.copy_(rounded[:, 0::2])
                b.up.copy_(rounded[:, 1::2])
    return out


def published_tensors(net: Net, experts: dict[str, tuple[Tensor, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors, names and layouts as ossq/synth.py `_tensors` writes them."""

    def bf16(t: Tensor) -> Tensor:
        return t.detach().to(torch.bfloat16).cpu().contiguous()

    yield "model.embed_tokens.weight", bf16(net.embed.weight)
    for i, b in enumerate(net.blocks):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", bf16(b.norm1)
        yield f"{p}.post_attention_layernorm.weight", bf16(b.norm2)
        for name, lin in (("q_proj", b.q), ("k_proj", b.k), ("v_proj", b.v), ("o_proj", b.o)):
            yield f"{p}.self_attn.{name}.weight", bf16(lin.weight)
            yield f"{p}.self_attn.{name}.bias", bf16(lin.bias)
        yield f"{p}.self_attn.sinks", bf16(b.sinks)
        yield f"{p}.mlp.router.weight", bf16(b.router.weight)
        yield f"{p}.mlp.router.bias", bf16(b.router.bias)
        gate_up_bias = torch.stack([b.gate_b, b.up_b], dim=2).reshape(b.gate_b.shape[0], -1)
        for name, bias in (("gate_up_proj", gate_up_bias), ("down_proj", b.down_b)):
            blocks, scales = experts[f"{i}.{name.removesuffix('_proj')}"]
            yield f"{p}.mlp.experts.{name}_blocks", blocks
            yield f"{p}.mlp.experts.{name}_scales", scales
            yield f"{p}.mlp.experts.{name}_bias", bf16(bias)
    yield "model.norm.weight", bf16(net.norm)
    yield "lm_head.weight", bf16(net.lm_head.weight)


def engine_loss(path: Path, ids: list[int], window: int, device: torch.device) -> float:
    """The saved checkpoint's held-out NLL through ossq's loader and engine (reference ops)."""
    from ossq.engine.load import load_model
    from ossq.perplexity import evaluate

    model, _ = load_model(path, device=device, ops="torch")
    return float(evaluate(model, ids, window=window).nll.mean())


# ---- main -----------------------------------------------------------------------------------------------
def parse() -> tuple[argparse.Namespace, TrainConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path(".data"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer smoke-test model, 20 steps")
    p.add_argument("--check-tolerance", type=float, default=0.05, help="nats the engine may differ by")
    for f in dataclasses.fields(TrainConfig):
        kind = float if f.type in ("float", float) else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    args = p.parse_args()
    tc = TINY if args.tiny else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return args, dataclasses.replace(tc, **{k: v for k, v in overrides.items() if v is not None})


def main() -> None:
    from ossq.synth import write_checkpoint

    args, tc = parse()
    device = torch.device(args.device)
    torch.manual_seed(tc.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_texts, heldout_texts = split_texts(args.data, tc.heldout_fraction, tc.max_chars)
    (args.out / "heldout.txt").write_text("\n\n".join(heldout_texts))
    (args.out / "calib.txt").write_text("".join(train_texts)[: tc.calib_chars])
    ids, heldout = torch.tensor(encode(train_texts)), encode(heldout_texts)[: tc.eval_tokens]
    config = tc.model_config()
    net = Net(config).to(device)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{n_params / 1e6:.1f}M parameters, {len(ids):,} training tokens, {len(heldout):,} held-out", flush=True)
    t0 = time.perf_counter()
    curve = train(net.train(), ids, tc, device)
    seconds = time.perf_counter() - t0
    window = tc.seq
    before = heldout_loss(net.eval(), heldout, window, device)
    experts = round_experts(net)
    after = heldout_loss(net, heldout, window, device)
    path = write_checkpoint(args.out / "model", config, published_tensors(net, experts), overwrite=True)
    engine = engine_loss(path, heldout, window, device)
    report = {
        "config": dataclasses.asdict(tc),
        "parameters": n_params,
        "training_tokens": len(ids),
        "heldout_tokens": len(heldout),
        "steps": curve[-1][0] + 1,
        "train_seconds": round(seconds, 1),
        "loss_curve": curve,
        "heldout_nll_bf16": before,
        "heldout_nll_mxfp4_experts": after,
        "heldout_nll_engine": engine,
        "heldout_ppl_engine": math.exp(engine),
        "window": window,
        "data": sorted(p.name for p in args.data.glob("*.txt")),
    }
    (args.out / "train.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("loss_curve", "config")}, indent=2))
    if abs(engine - after) > args.check_tolerance:
        sys.exit(f"the engine's held-out loss {engine:.4f} differs from the training model's {after:.4f}")


if __name__ == "__main__":
    main()
