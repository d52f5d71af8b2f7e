"""`--target-bpw`: bits and group size per tensor, chosen to hit a size at the least predicted loss.

Sensitivity. For every quantizable module u and every candidate storage c (affine bits 2–8 × groups
32/64/128 that divide its rows, bf16, and the storage the source keeps u in — the released MXFP4 experts
— which loses nothing because the source is the reference), the predicted loss is the relative squared
error that u alone, rounded to nearest at c, causes where its effect first reaches the residual
stream: at its block's output for a layer's linears (the block re-run on the calibration sample with
only u replaced), at the embedding rows for embed_tokens, at the logits for lm_head (tr(ΔW H ΔWᵀ) /
tr(W H Wᵀ) with H the final norm's second moments), times what a relative error at that site costs in
KL at the output. That price is measured once per site (the embedding, each layer's output, the
logits): the site's modules rounded at RATIO_SPEC together, the perturbed stream carried through the rest
of the model beside the clean one on KL_TOKENS tokens, KL(clean ‖ perturbed) over the relative error it
started with. Without it the sites' errors are in different currencies — an error in the logits is
worth far more KL than the same relative error early in the stream, which the later blocks dilute — and
the allocation starves lm_head. With `--calibrate gptq` the candidates are rounded by GPTQ, as the
conversion will round them.

Allocation. Each module's candidates are reduced to their lower convex hull in (bytes, loss); every module
starts at its cheapest point, and the upgrade with the largest loss saved per byte that still fits the
budget is taken until none fits (the classic greedy for a separable knapsack on convex curves); what a
step too large leaves over then goes to the single swaps, to any candidate, that save the most. The
budget is mlx-lm's bits-per-weight definition (recipe.Plan.bits_per_weight) solved for bytes, so the
chosen plan's bpw is at most the target and, on a model whose modules are small against the whole,
within a few hundredths of it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from ossq.calibrate import Forward, Tokens, block
from ossq.config import ModelConfig
from ossq.errors import UnsupportedQuantization
from ossq.formats.mlx import LinearInfo, layer_prefix, linear_modules
from ossq.quant import affine, gptq
from ossq.quant.awq import fake_quantize
from ossq.quant.recipe import Plan, Recipe, Rule, module_bytes
from ossq.quant.spec import QuantSpec

CANDIDATES: tuple[QuantSpec | None, ...] = (
    *(QuantSpec(bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 64, 128)),
    None,
)
SAMPLE_TOKENS = 2048  # calibration tokens the block re-runs use (the Hessians use all of them)
GPTQ_FLOPS = 2e11  # rows × columns² above which a module's GPTQ losses are scaled from one candidate's
RATIO_SPEC = QuantSpec(4, 64)  # the candidate a module's GPTQ/RTN ratio and its site's KL price are measured at
KL_TOKENS = 512  # calibration tokens each site's KL price is measured on
KL_CHUNK = 128  # tokens of logits at a time (a 201k vocabulary's logits are 0.8 MB a token)


@dataclass(frozen=True)
class Option:
    spec: QuantSpec | None
    bytes: int
    loss: float


@dataclass(frozen=True)
class Space:
    """What each module may be stored in: affine bits up to `max_bits` (None: up to bf16; a number also
    rules bf16 out) at the groups that divide its rows, and its `stored` spec when the source keeps it
    quantized. `pinned` modules keep the stored spec and nothing else (`--experts keep`)."""

    max_bits: int | None = None
    stored: Mapping[str, QuantSpec] = field(default_factory=dict)
    pinned: frozenset[str] = frozenset()

    def candidates(self, mod: LinearInfo) -> list[QuantSpec | None]:
        stored = self.stored.get(mod.path)
        if mod.path in self.pinned and stored is not None:
            return [stored]
        out = [
            c
            for c in CANDIDATES
            if (c is None and self.max_bits is None)
            or (c is not None and mod.in_features % c.group_size == 0 and c.bits <= (self.max_bits or 8))
        ]
        if stored is not None and stored not in out and stored.bits <= (self.max_bits or 8):
            out.append(stored)
        return out


def bounds(config: ModelConfig, space: Space) -> tuple[float, float]:
    """The least and the most bits per weight a plan over the candidates can have."""
    mods = linear_modules(config)
    cheap = {m.path: min(space.candidates(m), key=lambda c: module_bytes(m, c)) for m in mods}
    dear = {m.path: max(space.candidates(m), key=lambda c: module_bytes(m, c)) for m in mods}
    return tuple(Plan(Recipe("bound", QuantSpec(), ()), config, s).bits_per_weight for s in (cheap, dear))


def check_target(config: ModelConfig, target: float, space: Space) -> None:
    if space.max_bits is not None and space.max_bits not in {c.bits for c in CANDIDATES if c is not None}:
        raise UnsupportedQuantization(f"--max-bits must be one of 2, 3, 4, 5, 6, 8, got {space.max_bits}")
    low, high = bounds(config, space)
    if not low <= target <= high:
        most = "bf16" if space.max_bits is None else f"{space.max_bits}-bit at its smallest group"
        kept = (
            "; the experts stay as the source stores them — pass --experts quantize to let the allocator "
            "choose theirs too"
            if space.pinned
            else ""
        )
        raise UnsupportedQuantization(
            f"--target-bpw {target} is outside what this model can be stored in: {low:.3f} (every tensor "
            f"2-bit g128) to {high:.3f} ({most}){kept}"
        )


# ---- sensitivities ---------------------------------------------------------------------------------------
def sensitivities(
    forward: Forward, config: ModelConfig, space: Space, *, calibrated: bool = False
) -> dict[str, list[Option]]:
    """Every module's options in `space`, measured on the first SAMPLE_TOKENS tokens of `forward`
    (which this walks). `calibrated` (`--calibrate gptq`): each affine candidate is rounded as the
    conversion will round it, with GPTQ against the module's input Hessian (not the embedding: it has no
    input), so that the allocation prices what GPTQ delivers, which differs by module (lm_head and the
    attention gain more than the experts)."""
    tokens = forward.tokens
    n = min(len(tokens.ids), SAMPLE_TOKENS)
    sample = Tokens.of(tokens.ids[:n].tolist(), tokens.ids.device, seq_tokens=_seq_tokens(tokens))
    mods = {m.path: m for m in linear_modules(config)}
    embed = forward.read("model.embed_tokens.weight", None).float()
    rows, counts = torch.unique(tokens.ids, return_counts=True)
    out = {"model.embed_tokens": _Measure(embed[rows], None, _embed_loss(embed[rows], counts), False).options(
        mods["model.embed_tokens"], space
    )}  # fmt: skip
    k = min(n, KL_TOKENS)
    sites = _Sites(Tokens.of(tokens.ids[:k].tolist(), tokens.ids.device, seq_tokens=_seq_tokens(tokens)), config)
    clean = embed[tokens.ids[:k]]
    sites.start(["model.embed_tokens"], fake_quantize(clean, _anchor(mods["model.embed_tokens"])), clean)
    for layer, w, h in forward.layers():
        probe = _Probe(w, forward.x[:n], sample, config, layer)
        layer_mods = [m for m in mods.values() if m.layer == layer]
        keys = {m.path: f"{m.path.removeprefix(layer_prefix(layer) + '.')}.weight" for m in layer_mods}
        for mod in layer_mods:
            measure = _Measure(w[keys[mod.path]], h.of(mod.kind), partial(probe.loss, keys[mod.path]), calibrated)
            out[mod.path] = measure.options(mod, space)
        sites.advance(w, layer)
        rounded = {**w, **{keys[m.path]: fake_quantize(w[keys[m.path]], _anchor(m)) for m in layer_mods}}
        perturbed = block(rounded, forward.x[:k], sites.tokens, config, layer)
        sites.start(list(keys), perturbed, probe.ref[:k])  # the sample's first k tokens are the sites' tokens
    final = forward.final()
    lm_head = forward.read("lm_head.weight", None).float()
    hessian = final.T @ final
    out["lm_head"] = _Measure(lm_head, hessian, _logit_loss(lm_head, hessian), calibrated).options(
        mods["lm_head"], space
    )
    ends = [forward.final(x) for x in sites.streams]
    for paths, price in sites.prices(final[:k], ends, lm_head, fake_quantize(lm_head, _anchor(mods["lm_head"]))):
        for path in paths:
            out[path] = [Option(o.spec, o.bytes, o.loss * price) for o in out[path]]
    return {path: out[path] for path in mods}  # model order


def _anchor(mod: LinearInfo) -> QuantSpec:
    return RATIO_SPEC if mod.in_features % RATIO_SPEC.group_size == 0 else QuantSpec(4, 32)


class _Sites:
    """What a relative squared error of the stream costs in KL at the output, per site where it starts
    (module docstring): one perturbed stream per site, carried through the later blocks."""

    def __init__(self, tokens: Tokens, config: ModelConfig) -> None:
        self.tokens, self.config = tokens, config
        self.paths: list[list[str]] = []  # the modules each site prices
        self.streams: list[Tensor] = []
        self.errors: list[float] = []  # each stream's relative squared error where it started

    def start(self, paths: list[str], perturbed: Tensor, clean: Tensor) -> None:
        self.paths.append(paths)
        self.streams.append(perturbed)
        self.errors.append(_relative(perturbed, clean))

    def advance(self, w: dict[str, Tensor], layer: int) -> None:
        """Carry every stream started so far through layer `layer` (its full-precision weights)."""
        self.streams = [block(w, x, self.tokens, self.config, layer) for x in self.streams]

    def prices(
        self, final: Tensor, ends: list[Tensor], lm_head: Tensor, rounded_head: Tensor
    ) -> list[tuple[list[str], float]]:
        """(the site's modules, KL per unit of relative squared error) for every site and for lm_head,
        whose site is the logits. `final`: the clean final norm output on the sites' tokens; `ends`: each
        stream's."""
        kl = [0.0] * (len(ends) + 1)
        head_err = [0.0, 0.0]  # Σ‖ΔL‖², Σ‖L‖² of lm_head rounded
        for a in range(0, final.shape[0], KL_CHUNK):
            ref = final[a : a + KL_CHUNK] @ lm_head.T
            logp = torch.log_softmax(ref, -1)
            for i, x in enumerate(ends):
                kl[i] += _kl(logp, x[a : a + KL_CHUNK] @ lm_head.T)
            head = final[a : a + KL_CHUNK] @ rounded_head.T
            kl[-1] += _kl(logp, head)
            head_err[0] += float((head - ref).pow(2).sum())
            head_err[1] += float(ref.pow(2).sum())
        errors = [*self.errors, head_err[0] / head_err[1]]
        n = final.shape[0]
        return [
            (paths, max(total / n, 0.0) / err if err > 0 else 1.0)
            for paths, total, err in zip([*self.paths, ["lm_head"]], kl, errors, strict=True)
        ]


def _kl(logp: Tensor, logits: Tensor) -> float:
    """Σ over the tokens of KL(p ‖ q), q = softmax(logits)."""
    return float((logp.exp() * (logp - torch.log_softmax(logits, -1))).sum())


def _relative(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).pow(2).sum() / ref.pow(2).sum())


def _seq_tokens(tokens: Tokens) -> int:
    a, b = tokens.seqs[0]
    return b - a


class _Measure:
    """One module's loss at each candidate: `evaluate` scores a rounded weight. With `calibrated` and a
    Hessian, affine candidates are rounded with GPTQ; where GPTQ at every candidate would cost more than
    GPTQ_FLOPS (the lm_head and expert stacks of the full-size models), the RTN losses are scaled by the
    GPTQ/RTN ratio measured at 4-bit g64 instead."""

    def __init__(self, w: Tensor, h: Tensor | None, evaluate: Callable[[Tensor], float], calibrated: bool) -> None:
        self.w, self.h, self.evaluate = w, h, evaluate
        self.gptq = calibrated and h is not None
        self.every = self.gptq and w.numel() * w.shape[-1] <= GPTQ_FLOPS
        self._ratio: float | None = None

    def options(self, mod: LinearInfo, space: Space) -> list[Option]:
        """Unquantized and as stored cost nothing: the source is the reference."""
        stored = space.stored.get(mod.path)
        return [
            Option(c, module_bytes(mod, c), 0.0 if c is None or c == stored else self.loss(c))
            for c in space.candidates(mod)
        ]

    def loss(self, spec: QuantSpec) -> float:
        if not self.gptq or spec.mode != "affine":
            return self.evaluate(fake_quantize(self.w, spec))
        if self.every:
            return self.evaluate(self._gptq(spec))
        if self._ratio is None:
            ref = RATIO_SPEC if self.w.shape[-1] % RATIO_SPEC.group_size == 0 else QuantSpec(4, 32)
            rtn = self.evaluate(fake_quantize(self.w, ref))
            self._ratio = self.evaluate(self._gptq(ref)) / rtn if rtn > 0 else 1.0
        return self.evaluate(fake_quantize(self.w, spec)) * self._ratio

    def _gptq(self, spec: QuantSpec) -> Tensor:
        wq, scales, biases = gptq.quantize(
            self.w.to(torch.bfloat16), self.h, bits=spec.bits, group_size=spec.group_size
        )  # bf16, the dtype the conversion rounds gpt-oss's weights from
        return affine.dequantize(wq, scales, biases, bits=spec.bits, group_size=spec.group_size, dtype=torch.float32)


class _Probe:
    """One layer's block re-run on the sample with one of its weights replaced: the relative error of its
    output against the full-precision output."""

    def __init__(self, w: dict[str, Tensor], x: Tensor, tokens: Tokens, config: ModelConfig, layer: int) -> None:
        self.w, self.x, self.tokens, self.config, self.layer = w, x, tokens, config, layer
        self.ref = block(w, x, tokens, config, layer)

    def loss(self, key: str, rounded: Tensor) -> float:
        return _relative(block({**self.w, key: rounded}, self.x, self.tokens, self.config, self.layer), self.ref)


def _embed_loss(e: Tensor, counts: Tensor) -> Callable[[Tensor], float]:
    """The relative error of the embedding rows the calibration text reads, weighted by how often."""
    norm = (e.pow(2).sum(-1) * counts).sum()
    return lambda rounded: float(((rounded - e).pow(2).sum(-1) * counts).sum() / norm)


def _logit_loss(w: Tensor, h: Tensor) -> Callable[[Tensor], float]:
    norm = ((w @ h) * w).sum()
    return lambda rounded: float((((rounded - w) @ h) * (rounded - w)).sum() / norm)


# ---- allocation ------------------------------------------------------------------------------------------
def hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of (bytes, loss), cheapest first: the options a greedy upgrade can stop at."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.loss)):
        if pts and o.loss >= pts[-1].loss:
            continue  # dearer and no better
        while len(pts) >= 2 and _slope(pts[-2], pts[-1]) >= _slope(pts[-1], o):
            pts.pop()  # pts[-1] lies on or above the chord: never the best stop
        pts.append(o)
    return pts


def _slope(a: Option, b: Option) -> float:
    return (b.loss - a.loss) / max(b.bytes - a.bytes, 1)  # negative: loss saved per byte, signed


def allocate(options: dict[str, list[Option]], budget: int) -> dict[str, QuantSpec | None]:
    """The option per module that keeps Σ bytes ≤ `budget` at the least Σ loss (greedy on the hulls)."""
    hulls = {path: hull(opts) for path, opts in options.items()}
    at = dict.fromkeys(hulls, 0)
    spent = sum(h[0].bytes for h in hulls.values())
    heap = [_upgrade(path, h, 0) for path, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, path, i = heapq.heappop(heap)
        h = hulls[path]
        cost = h[i + 1].bytes - h[i].bytes
        if spent + cost > budget:
            continue  # this module stays; cheaper upgrades of others may still fit
        spent, at[path] = spent + cost, i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, _upgrade(path, h, i + 1))
    chosen = {path: hulls[path][i] for path, i in at.items()}
    return {path: o.spec for path, o in _fill(options, chosen, budget - spent).items()}


def _fill(options: dict[str, list[Option]], chosen: dict[str, Option], left: int) -> dict[str, Option]:
    """The greedy stops where a module's next hull step is larger than what is left, which with one
    dominant module (a 201k-row embedding or lm_head) can be a quarter bit per weight: spend the rest on
    the swap to any option, on the hull or not, that saves the most loss and fits, until none does."""
    while True:
        gain, path, best = max(
            ((chosen[p].loss - o.loss, p, o) for p, opts in options.items() for o in opts
             if o.bytes - chosen[p].bytes <= left),
            key=lambda t: t[0],
            default=(0.0, "", None),
        )  # fmt: skip
        if best is None or gain <= 0:
            return chosen
        left -= best.bytes - chosen[path].bytes
        chosen[path] = best


def _upgrade(path: str, h: list[Option], i: int) -> tuple[float, str, int]:
    return (_slope(h[i], h[i + 1]), path, i)  # most negative slope (most loss saved per byte) pops first


def module_budget(config: ModelConfig, target: float) -> int:
    """Bytes the modules may take so that mlx-lm's bits per weight is `target`: the norms, sinks and rope
    frequencies' share is fixed."""
    bf16 = {m.path: None for m in linear_modules(config)}
    p = Plan(Recipe("budget", QuantSpec(), ()), config, bf16)
    fixed = p.total_bytes - sum(module_bytes(m, None) for m in linear_modules(config))
    rope = round(p.bits_per_weight * p.total_parameters / 8) - p.total_bytes
    return int(target * p.total_parameters / 8) - rope - fixed


def recipe(specs: dict[str, QuantSpec | None], target: float) -> Recipe:
    """The allocation as a recipe: one rule per module path; the top level is the commonest spec."""
    quantized = [s for s in specs.values() if s is not None]
    top = max(set(quantized), key=quantized.count, default=QuantSpec())
    rules = tuple(Rule((path,), spec) for path, spec in specs.items())
    return Recipe(f"allocated to {target} bits per weight", top, rules, explicit_entries=True)
