"""Quantization recipes: which module is stored with which bits / group size / mode, and what the result
weighs.

A `Recipe` is an ordered list of `Rule`s; the first rule that matches a module decides its `QuantSpec`
(None = kept unquantized, bf16). `plan` applies a recipe to every quantizable module of a model
(`formats.mlx.linear_modules`) and returns a `Plan`, the single record the converter, the config writer
and `ossq convert --dry-run` read. The built-in recipes reproduce mlx-lm's choices (shared spec
formats.md §2.5, §3.2, §3.7); the size figures use mlx-lm's definitions (§3.4), so the bits per weight we
print equals the number `mlx_lm.convert` prints for the same choices.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossq.config import FULL, ModelConfig
from ossq.errors import UnsupportedQuantization
from ossq.formats.mlx import LinearInfo, linear_modules, module_tensors, plain_tensors
from ossq.quant.spec import QuantSpec

if TYPE_CHECKING:
    from rich.table import Table

LayerSelect = Callable[[int, ModelConfig], bool]

EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")
MIXED_BITS = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
# mlx-lm's gpt_oss `quant_predicate` (models/gpt_oss.py): routers at 8 bits, group 64, affine.
ROUTER_SPEC = QuantSpec(bits=8, group_size=64)
MXFP4_SPEC = QuantSpec(bits=4, group_size=32, mode="mxfp4")
DEFAULT_GROUP = {"affine": 64, "mxfp4": 32}  # mlx-lm's per-mode defaults (utils.quantize_model)
BF16_BYTES = 2
ROPE_FREQ_BYTES = 4  # mlx-lm's YarnRoPE keeps head_dim/2 float32 `_freqs` per layer


# ---- rules and recipes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSet:
    """A fixed set of layer indices, as a user recipe file names them."""

    indices: frozenset[int]

    def __call__(self, layer: int, config: ModelConfig) -> bool:
        return layer in self.indices


def mixed_more_bits(layer: int, config: ModelConfig) -> bool:
    """mlx-lm's `use_more_bits` (convert.mixed_quant_predicate_builder): the first and last eighth of the
    layers and every third layer between them."""
    n = config.num_hidden_layers
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def edge_sixths(layer: int, config: ModelConfig) -> bool:
    """The first and last sixth of the layers (0-5 and 30-35 of 36)."""
    n = config.num_hidden_layers
    return layer < n // 6 or layer >= n - n // 6


def full_attention(layer: int, config: ModelConfig) -> bool:
    return config.layer_types[layer] == FULL


@dataclass(frozen=True)
class Rule:
    """Modules whose kind or path matches one of `match` (and, when `layers` is set, whose layer index it
    selects) get `spec`. A pattern is a glob (fnmatch) tried on both the kind (`q_proj`, `router`, …) and
    the full path, or `re:<regex>` searched in the path. Modules outside the layers (embeddings, lm_head)
    never match a rule that names layers."""

    match: tuple[str, ...]
    spec: QuantSpec | None
    layers: LayerSelect | None = None

    def matches(self, mod: LinearInfo, config: ModelConfig) -> bool:
        if self.layers is not None and (mod.layer is None or not self.layers(mod.layer, config)):
            return False
        return any(_pattern_matches(p, mod) for p in self.match)


def _pattern_matches(pattern: str, mod: LinearInfo) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], mod.path) is not None
    return fnmatchcase(mod.kind, pattern) or fnmatchcase(mod.path, pattern)


@dataclass(frozen=True)
class Recipe:
    """An ordered rule list (first match wins; a module no rule matches stays unquantized) plus what
    config.json's top-level `quantization` says.

    `skip_group` is mlx-lm's global group size: an affine module whose row length it does not divide is
    left unquantized (utils.quantize_model), e.g. with 128 only o_proj (4096 wide) is quantized.
    `group_size_null` asks the config writer for mlx-lm's `"group_size": null` in every per-path entry,
    which mlx-lm writes for a mixed recipe run without `--q-group-size` (formats.md §3.7).
    `explicit_entries` asks for a per-path entry for every module the recipe quantizes, even one equal to
    the top level, as mlx-lm writes for a predicate that returns a dict for every module (the mixed ones)."""

    name: str
    top: QuantSpec
    rules: tuple[Rule, ...]
    skip_group: int | None = None
    group_size_null: bool = False
    explicit_entries: bool = False

    def spec_for(self, mod: LinearInfo, config: ModelConfig) -> QuantSpec | None:
        for rule in self.rules:
            if rule.matches(mod, config):
                return rule.spec
        return None


def uniform(bits: int | None = None, group_size: int | None = None, mode: str = "affine") -> Recipe:
    """mlx-lm's plain `-q` for gpt_oss: routers 8-bit g64 affine, everything else at (bits, group_size);
    missing values take mlx-lm's per-mode defaults (affine 4/64, mxfp4 4/32)."""
    group_size = DEFAULT_GROUP.get(mode, 64) if group_size is None else group_size
    spec = QuantSpec(bits=4 if bits is None else bits, group_size=group_size, mode=mode)
    rules = (Rule(("router",), ROUTER_SPEC), Rule(("*",), spec))
    return Recipe(f"uniform {spec.bits}-bit g{group_size} {mode}", spec, rules, skip_group=group_size)


def mixed(name: str, group_size: int | None = None, *, bits: int | None = None) -> Recipe:
    """mlx-lm's `--quant-predicate mixed_L_H` (formats.md §3.7): high bits for v_proj and the experts'
    down_proj in the `mixed_more_bits` layers and for lm_head; low bits for everything else, the router
    and embed_tokens included. `bits` only sets the top-level entry, as mlx-lm's `--q-bits` does."""
    if name not in MIXED_BITS:
        raise UnsupportedQuantization(f"unknown mixed recipe {name!r}; choose one of {', '.join(MIXED_BITS)}")
    low, high = MIXED_BITS[name]
    g = 64 if group_size is None else group_size
    rules = (
        Rule(("v_proj", "down_proj"), QuantSpec(high, g), layers=mixed_more_bits),
        Rule(("lm_head",), QuantSpec(high, g)),
        Rule(("*",), QuantSpec(low, g)),
    )
    top = QuantSpec(4 if bits is None else bits, g)
    return Recipe(name, top, rules, skip_group=g, group_size_null=group_size is None, explicit_entries=True)


def tiered(group_size: int = 64) -> Recipe:
    """The 3.6-bit recipe of the gpt-oss-120b card: bf16 routers; 6-bit embeddings, lm_head, v_proj and
    o_proj, all attention in the first and last sixth of the layers and q/k of full-attention layers;
    4-bit q/k of the other sliding layers; 3-bit experts."""
    six, four, three = (QuantSpec(b, group_size) for b in (6, 4, 3))
    qk = ("q_proj", "k_proj")
    rules = (
        Rule(("router",), None),
        Rule(("embed_tokens", "lm_head", "v_proj", "o_proj"), six),
        Rule(qk, six, layers=edge_sixths),
        Rule(qk, six, layers=full_attention),
        Rule(qk, four),
        Rule(EXPERT_KINDS, three),
    )
    return Recipe(f"tiered g{group_size}", three, rules, skip_group=group_size)


def experts_mxfp4(bits: int = 4, group_size: int = 64) -> Recipe:
    """mlx-lm's "direct" flavour from the MXFP4 checkpoint (formats.md §3.2): experts stay MXFP4, routers
    8-bit g64, everything else affine at (bits, group_size); the top level is the source's mxfp4 entry."""
    rest = QuantSpec(bits, group_size)
    rules = (Rule(EXPERT_KINDS, MXFP4_SPEC), Rule(("router",), ROUTER_SPEC), Rule(("*",), rest))
    return Recipe(f"mxfp4-experts + {bits}-bit g{group_size}", MXFP4_SPEC, rules, skip_group=group_size)


BUILTIN = ("uniform", *MIXED_BITS, "tiered", "mxfp4-experts")


def resolve(
    name_or_path: str | None, *, bits: int | None = None, group_size: int | None = None, mode: str = "affine"
) -> Recipe:
    """The `--recipe` argument of `ossq convert`: a built-in name (None = uniform) or a TOML/JSON file."""
    if name_or_path in (None, "uniform"):
        return uniform(bits, group_size, mode)
    if name_or_path in ("tiered", "mxfp4-experts", *MIXED_BITS) and mode != "affine":
        raise UnsupportedQuantization(f"recipe {name_or_path!r} is affine-only; drop --q-mode {mode}")
    if name_or_path in MIXED_BITS:
        return mixed(name_or_path, group_size, bits=bits)
    if name_or_path == "tiered":
        if bits is not None:
            raise UnsupportedQuantization("recipe 'tiered' fixes its own bits (6/4/3); drop --q-bits")
        return tiered(64 if group_size is None else group_size)
    if name_or_path == "mxfp4-experts":
        return experts_mxfp4(4 if bits is None else bits, 64 if group_size is None else group_size)
    path = Path(name_or_path)
    if path.suffix.lower() in (".toml", ".json") or path.exists():
        if bits is not None or group_size is not None or mode != "affine":
            raise UnsupportedQuantization(
                f"{path}: a recipe file sets its own bits, group size and mode; drop --q-bits/--q-group-size/--q-mode"
            )
        return from_file(path)
    raise UnsupportedQuantization(
        f"unknown recipe {name_or_path!r}; choose one of {', '.join(BUILTIN)} or give a .toml/.json file"
    )


# ---- user recipe files ---------------------------------------------------------------------------------
RULE_KEYS = frozenset({"match", "layers", "bits", "group_size", "mode", "keep"})
FILE_KEYS = frozenset({"name", "default", "rules"})


class RecipeFileError(UnsupportedQuantization):
    """A recipe file that cannot be read or that breaks the schema; the message names file and rule."""


def from_file(path: str | Path) -> Recipe:
    """A user recipe, TOML or JSON:

        name = "my recipe"                      # optional
        default = { bits = 4, group_size = 64 } # or { keep = true }
        [[rules]]                               # first match wins
        match = ["q_proj", "k_proj"]            # globs on kind or path, or "re:<regex>" on the path
        layers = "0-5,30-35"                    # optional: "a-b,c" or a list of indices
        bits = 6                                # group_size (64 / mxfp4 32) and mode (affine) optional
        [[rules]]
        match = "router"
        keep = true                             # leave unquantized (bf16)

    The top-level config entry is the default's spec (4-bit g64 affine when the default keeps)."""
    path = Path(path)
    doc = _read_document(path)
    where = str(path)
    unknown = sorted(set(doc) - FILE_KEYS)
    if unknown:
        raise RecipeFileError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(FILE_KEYS)}")
    if not isinstance(doc.get("default"), dict):
        raise RecipeFileError(f"{where}: needs a `default` table, e.g. default = {{ bits = 4 }}")
    rules_doc = doc.get("rules", [])
    if not isinstance(rules_doc, list):
        raise RecipeFileError(f"{where}: `rules` must be a list of tables")
    rules = [_parse_rule(r, f"{where}: rule {i + 1}") for i, r in enumerate(rules_doc)]
    default = _parse_rule({"match": "*", **doc["default"]}, f"{where}: default")
    name = doc.get("name", path.stem)
    return Recipe(str(name), default.spec or QuantSpec(), (*rules, default))


def _read_document(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeFileError(f"{path}: cannot read the recipe file ({e.strerror})") from None
    if path.suffix.lower() == ".toml":
        doc = _parse_toml(text, path)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeFileError(f"{path}: not valid JSON ({e}); recipe files are .toml or .json") from None
    if not isinstance(doc, dict):
        raise RecipeFileError(f"{path}: expected a table/object at the top level")
    return doc


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise RecipeFileError(
                f"{path}: TOML recipes need Python 3.11 or `pip install tomli`; or write the recipe as JSON"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeFileError(f"{path}: not valid TOML ({e})") from None


def _parse_rule(d: Any, where: str) -> Rule:
    if not isinstance(d, dict):
        raise RecipeFileError(f"{where}: expected a table/object, got {type(d).__name__}")
    unknown = sorted(set(d) - RULE_KEYS)
    if unknown:
        raise RecipeFileError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(RULE_KEYS)}")
    match = _parse_match(d.get("match"), where)
    layers = IndexSet(_parse_layers(d["layers"], where)) if "layers" in d else None
    return Rule(match, _parse_spec(d, where), layers)


def _parse_match(value: Any, where: str) -> tuple[str, ...]:
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RecipeFileError(f"{where}: `match` must be a pattern or a list of patterns, got {value!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise RecipeFileError(f"{where}: bad regular expression {p[3:]!r} ({e})") from None
    return tuple(patterns)


def _parse_spec(d: dict[str, Any], where: str) -> QuantSpec | None:
    if d.get("keep") is True:
        if set(d) & {"bits", "group_size", "mode"}:
            raise RecipeFileError(f"{where}: `keep = true` cannot be combined with bits/group_size/mode")
        return None
    if "keep" in d and d["keep"] is not False:
        raise RecipeFileError(f"{where}: `keep` must be true or false, got {d['keep']!r}")
    mode = d.get("mode", "affine")
    if "bits" not in d and mode != "mxfp4":
        raise RecipeFileError(f"{where}: give `bits` (or `keep = true`)")
    values = {"bits": d.get("bits", 4), "group_size": d.get("group_size", DEFAULT_GROUP.get(mode, 64))}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecipeFileError(f"{where}: `{key}` must be an integer, got {value!r}")
    try:
        return QuantSpec(mode=mode, **values)
    except UnsupportedQuantization as e:
        raise RecipeFileError(f"{where}: {e}") from None


def _parse_layers(value: Any, where: str) -> frozenset[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list) and all(_is_index(i) for i in value):
        return frozenset(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", value)
        if m:
            return frozenset(_expand_ranges(value))
    raise RecipeFileError(f'{where}: `layers` must be like "0-5,30-35" or a list of indices, got {value!r}')


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _expand_ranges(text: str) -> Iterable[int]:
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        yield from range(int(lo), int(hi or lo) + 1)


# ---- the plan and its size ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableRow:
    """One line of the size table: `count` tensors of one kind stored the same way (spec None = bf16).
    `counted`: whether mlx-lm's parameter total includes them (not the sinks, which no leaf module owns)."""

    kind: str
    count: int
    spec: QuantSpec | None
    parameters: int
    bytes: int
    counted: bool = True


@dataclass(frozen=True)
class Plan:
    """Every quantizable module's storage under one recipe, for one model.

    `specs` maps each module path (linear_modules order) to its QuantSpec or None (bf16). `skipped` lists
    the modules the recipe wanted quantized but whose row length the group size does not divide (left
    bf16, as mlx-lm does; the converter should warn). `passthrough` are expert modules copied unchanged
    from an MXFP4 source."""

    recipe: Recipe
    config: ModelConfig
    specs: dict[str, QuantSpec | None]
    skipped: tuple[str, ...] = ()
    passthrough: frozenset[str] = field(default_factory=frozenset)

    @property
    def top(self) -> QuantSpec:
        return self.recipe.top

    @property
    def group_size_null(self) -> bool:
        return self.recipe.group_size_null

    def table(self) -> list[TableRow]:
        """Rows grouped by kind (model order), one per distinct spec within a kind; norms and sinks last."""
        rows: dict[tuple[str, QuantSpec | None], TableRow] = {}
        for mod in linear_modules(self.config):
            spec = self.specs[mod.path]
            _add(rows, TableRow(mod.kind, 1, spec, _module_parameters(mod), module_bytes(mod, spec)))
        for name, shape in plain_tensors(self.config).items():
            n = math.prod(shape)
            is_sink = name.endswith(".sinks")  # sinks belong to no leaf module: mlx-lm does not count them
            _add(rows, TableRow("sinks" if is_sink else "norms", 1, None, n, BF16_BYTES * n, counted=not is_sink))
        kinds = list(dict.fromkeys(kind for kind, _ in rows))
        return sorted(rows.values(), key=lambda r: kinds.index(r.kind))  # stable: specs keep model order

    @property
    def total_parameters(self) -> int:
        """mlx-lm's `get_total_parameters`: a quantized module counts its unpacked weight and its bias; the
        sinks (not a leaf module's parameter) are not counted (formats.md §3.4)."""
        return sum(r.parameters for r in self.table() if r.counted)

    @property
    def total_bytes(self) -> int:
        """Bytes of every stored tensor (the index's `total_size`): packed uint32 weights, bf16 affine
        scales/biases, uint8 mxfp4 scales, bf16 everything else."""
        return sum(r.bytes for r in self.table())

    @property
    def bits_per_weight(self) -> float:
        """mlx-lm's `compute_bits_per_weight`, which also counts the in-memory rope `_freqs`."""
        return (self.total_bytes + self._rope_bytes) * 8 / self.total_parameters

    @property
    def _rope_bytes(self) -> int:
        c = self.config
        return 0 if c.rope_scaling is None else c.num_hidden_layers * c.head_dim // 2 * ROPE_FREQ_BYTES


def _add(rows: dict[tuple[str, QuantSpec | None], TableRow], row: TableRow) -> None:
    old = rows.get((row.kind, row.spec))
    if old is not None:
        row = replace(row, count=old.count + 1, parameters=old.parameters + row.parameters, bytes=old.bytes + row.bytes)
    rows[row.kind, row.spec] = row


def _module_parameters(mod: LinearInfo) -> int:
    # Quantized: weight.size * 32 / bits recovers the unpacked count, so every module counts numel + bias.
    return mod.numel + (math.prod(mod.lead) if mod.bias else 0)


def module_bytes(mod: LinearInfo, spec: QuantSpec | None) -> int:
    """Bytes `mod` stores under `spec` (None: bf16): packed weight, scales, biases and its bias."""
    total = 0
    for name, shape in module_tensors(mod, spec).items():
        suffix = name.rsplit(".", 1)[1]
        if spec is not None and suffix == "weight":
            per = 4  # packed uint32
        elif suffix == "scales" and spec is not None and spec.mode == "mxfp4":
            per = 1  # E8M0 uint8
        else:
            per = BF16_BYTES
        total += per * math.prod(shape)
    return total


def plan(recipe: Recipe, config: ModelConfig, *, source_experts_mxfp4: bool = False) -> Plan:
    """Apply `recipe` to every module of `config`. Raises nothing for awkward shapes: a module whose row
    length the group size (or mlx-lm's global `skip_group`, for affine modules) does not divide is
    kept bf16 and listed in `skipped`. With `source_experts_mxfp4`, experts the recipe keeps as MXFP4 are
    marked `passthrough` (copied bit for bit)."""
    specs: dict[str, QuantSpec | None] = {}
    skipped: list[str] = []
    passthrough: set[str] = set()
    for mod in linear_modules(config):
        spec = recipe.spec_for(mod, config)
        if spec is not None and _group_misfits(spec, mod.in_features, recipe.skip_group):
            skipped.append(mod.path)
            spec = None
        if spec == MXFP4_SPEC and mod.kind in EXPERT_KINDS and source_experts_mxfp4:
            passthrough.add(mod.path)
        specs[mod.path] = spec
    return Plan(recipe, config, specs, tuple(skipped), frozenset(passthrough))


def _group_misfits(spec: QuantSpec, in_features: int, skip_group: int | None) -> bool:
    if in_features % spec.group_size:
        return True
    return spec.mode == "affine" and skip_group is not None and in_features % skip_group != 0


# ---- the dry-run table ---------------------------------------------------------------------------------
def _human(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def render_table(p: Plan) -> Table:
    """A rich Table for `ossq convert --dry-run`: one row per tensor class and storage, then the totals
    (bits per weight to 3 decimals as mlx-lm prints it, size in GB = 1e9 bytes)."""
    from rich.table import Table

    gb = f"{p.total_bytes / 1e9:.2f} GB"
    uncounted = sum(r.parameters for r in p.table() if not r.counted)
    caption = f"parameters as mlx-lm counts them: the total leaves out the {uncounted:,} attention sinks"
    table = Table(
        title=f"{p.recipe.name}: {p.bits_per_weight:.3f} bits per weight, {gb}", caption=caption if uncounted else None
    )
    for col in ("tensor", "count", "bits", "group", "mode", "parameters", "size"):
        table.add_column(col, justify="left" if col in ("tensor", "mode") else "right")
    for r in p.table():
        spec = r.spec
        cells = (str(spec.bits), str(spec.group_size), spec.mode) if spec else ("16", "-", "bf16")
        table.add_row(r.kind, str(r.count), *cells, f"{r.parameters:,}", _human(r.bytes))
    table.add_section()
    table.add_row("total", "", f"{p.bits_per_weight:.3f}", "", "", f"{p.total_parameters:,}", gb)
    return table
