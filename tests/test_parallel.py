"""Tensor parallelism (engine/parallel.py, engine/launch.py): N gloo ranks on the CPU compute what one
process computes. The oracles are one process on the same checkpoint (greedy tokens equal, logits within
float32 tolerance: only the order of the all-reduce's sums differs) and, for the shard reads, the whole
tensor dequantized and sliced by heads, columns, experts or vocabulary rows.

Spawning a rank costs seconds (it imports torch), so each degree runs once for every checkpoint
(`spawned`), and the asserts share that run."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist

from ossq.cli import main
from ossq.convert import convert
from ossq.engine.engine import Engine, EngineConfig, forward_full
from ossq.engine.launch import launch
from ossq.engine.load import load_model
from ossq.engine.model import Linear
from ossq.engine.parallel import SINGLE, Parallel, ParallelError, check_checkpoint
from ossq.engine.sampling import SamplingParams
from ossq.errors import ConfigError, DeviceError, InvalidArgument, OssqError, UnsupportedQuantization
from ossq.formats.hf import Checkpoint
from ossq.quant import affine, mxfp4
from ossq.synth import synthesize
from tests.conftest import small_config

# 8 query heads over 2 kv heads (so --tp 4 replicates each kv head on 2 ranks), o_proj 256 inputs wide
# (--tp 2 gives each rank 128, --tp 4 gives 64: group 128 is cut there), every row a multiple of 128.
CONFIG = small_config(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
)
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
PROMPTS = ([1, 5, 9, 30, 100, 7, 3, 200, 11, 12, 40, 41], [300, 2, 8], [77] * 20)
MAX_TOKENS = 6
SAMPLED = "sampled: the ranks agree"
AGREED = "agreed: the smallest value, rank 0's object"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """name → checkpoint: the published layout (MXFP4 experts, bf16 rest), MLX bf16, MLX MXFP4 and MLX
    affine at every bits × group size (experts included)."""
    root = tmp_path_factory.mktemp("tp")
    hf = synthesize(root / "hf", config=CONFIG, seed=3)
    paths = {"hf-mxfp4": hf, "mlx-bf16": root / "bf16", "mlx-mxfp4": root / "mxfp4"}
    convert(hf, paths["mlx-bf16"], dequantize=True, progress=False)
    convert(hf, paths["mlx-mxfp4"], quantize=True, q_mode="mxfp4", experts="quantize", progress=False)
    for bits in BITS:
        for group in GROUPS:
            paths[f"a{bits}g{group}"] = root / f"a{bits}g{group}"
            convert(hf, paths[f"a{bits}g{group}"], quantize=True, q_bits=bits, q_group_size=group, **QUANTIZE_ALL)
    return {name: str(p) for name, p in paths.items()}


QUANTIZE_ALL = dict(experts="quantize", progress=False)


def splittable(items: dict, tp: int) -> dict:
    """The checkpoints (or their results) whose o_proj groups `tp` ranks do not cut (group 128 at --tp 4
    is refused); not the sampling check."""
    return {k: v for k, v in items.items() if not (tp == 4 and k.endswith("g128")) and k not in (SAMPLED, AGREED)}


def e2e(items: dict, tp: int) -> dict:
    """What the spawned runs cover (the shard reads of every layout are checked in-process): each layout
    family, every bit width and every group size at --tp 2; a few at --tp 4, where 4 processes share 2
    cores and a collective costs ~10 ms."""
    names = END_TO_END[tp]
    return {k: v for k, v in items.items() if k in names}


END_TO_END = {
    2: ("hf-mxfp4", "mlx-bf16", "mlx-mxfp4", "a2g32", "a3g64", "a4g128", "a5g32", "a6g64", "a8g128"),
    4: ("hf-mxfp4", "mlx-bf16", "a3g64", "a5g32"),
}


def run_all(parallel: Parallel, paths: dict[str, str]) -> dict[str, tuple[torch.Tensor, list[list[int]]]]:
    """On every rank: each checkpoint's logits of the first prompt and greedy tokens of all prompts."""
    out = {}
    for name, path in paths.items():
        model, _ = load_model(path, dtype=torch.float32, ops="torch", parallel=parallel)
        logits = forward_full(model, torch.tensor([PROMPTS[0]]))[0]
        out[name] = (logits, _greedy(parallel, model))
    out[SAMPLED] = _sampled_agree(parallel, model)
    out[AGREED] = (parallel.agree_min(100 + parallel.rank), parallel.agree(f"rank {parallel.rank}"))
    return out


def _greedy(parallel: Parallel, model) -> list[list[int]]:
    engine = Engine(model, EngineConfig(max_num_seqs=4, kv_cache_tokens=512))
    ids = [engine.add_request(p, SamplingParams(), max_tokens=MAX_TOKENS) for p in PROMPTS]
    while engine.has_unfinished:
        engine.step()
    return [engine.request(i).output for i in ids]


def _sampled_agree(parallel: Parallel, model) -> bool:
    """Sampling with no seed given: every rank must draw the same tokens (rank 0's seed, shared)."""
    engine = Engine(model, EngineConfig(kv_cache_tokens=256))
    rid = engine.add_request(PROMPTS[1], parallel.sampling(SamplingParams(temperature=1.0)), max_tokens=8)
    while engine.has_unfinished:
        engine.step()
    mine = engine.request(rid).output
    if not parallel.active:
        return True
    every: list = [None] * parallel.world_size
    dist.all_gather_object(every, mine)
    return all(t == mine for t in every)


@pytest.fixture(scope="module")
def single(checkpoints):
    return run_all(SINGLE, {k: v for tp in END_TO_END for k, v in e2e(checkpoints, tp).items()})


@pytest.fixture(scope="module")
def spawned(checkpoints) -> dict[int, dict]:
    """--tp 2 and --tp 4, each one spawned run over every checkpoint it can split."""
    return {tp: launch(run_all, e2e(checkpoints, tp), tp=tp) for tp in (2, 4)}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_gives_one_process_greedy_tokens_and_logits(single, spawned, tp):
    got, refs = spawned[tp], e2e(single, tp)
    assert len(refs) == len(END_TO_END[tp])
    for name, ref in refs.items():
        (logits, tokens), (ref_logits, ref_tokens) = got[name], ref
        assert tokens == ref_tokens, name
        assert all(len(t) == MAX_TOKENS for t in tokens)
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_sample_the_same_tokens_without_a_seed(spawned, tp):
    assert spawned[tp][SAMPLED] is True


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_agree_on_the_smallest_pool_and_rank_0s_choices(spawned, tp):
    assert spawned[tp][AGREED] == (100, "rank 0")


# ---- the shards each rank reads -------------------------------------------------------------------------
def dense(lin: Linear) -> torch.Tensor:
    """The float32 matrix (or expert stack) a Linear stores, dequantized."""
    spec = lin.spec
    if spec is None:
        return lin.weight.float()
    if spec.mode == "mxfp4":
        return mxfp4.decode(lin.weight, lin.scales, dtype=torch.float32)
    bits, group = spec.bits, spec.group_size
    return affine.dequantize(lin.weight, lin.scales, lin.biases, bits=bits, group_size=group, dtype=torch.float32)


def expected_slice(kind: str, whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """What rank `rank` of `tp` must hold of a module's whole dense weight, as the issue states it."""
    c = CONFIG
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if kind == "q_proj":
        return whole[rank * H // tp * D : (rank + 1) * H // tp * D]
    if kind in ("k_proj", "v_proj"):
        kv = rank * K // tp if tp <= K else rank // (tp // K)  # beyond K ranks a kv head is replicated
        width = max(K // tp, 1)
        return whole[kv * D : (kv + width) * D]
    if kind == "o_proj":
        return whole[:, rank * H // tp * D : (rank + 1) * H // tp * D]
    if kind in ("gate_proj", "up_proj", "down_proj"):
        E = c.num_local_experts
        return whole[rank * E // tp : (rank + 1) * E // tp]
    if kind in ("embed_tokens", "lm_head"):
        return whole[rank * c.vocab_size // tp : (rank + 1) * c.vocab_size // tp]
    return whole


def linears(model) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_reads_exactly_its_slice_of_every_layout(checkpoints, tp):
    """Loaded in this process (reads need no process group): every rank's stored rows equal the whole
    model's sliced by heads, experts and vocabulary; its dequantized o_proj equals the whole one's input
    columns of its heads (whole quantization groups), whose bias is on rank 0 only; the sinks follow their
    heads."""
    H = CONFIG.num_attention_heads
    for name, path in splittable(checkpoints, tp).items():
        whole, _ = load_model(path, dtype=torch.float32, ops="torch")
        ranks = [load_model(path, dtype=torch.float32, ops="torch", parallel=Parallel(r, tp))[0] for r in range(tp)]
        for module, lin in linears(whole).items():
            kind = module.rsplit(".", 1)[-1]
            wanted = dense(lin) if kind == "o_proj" else None
            for r, shard in enumerate(ranks):
                got = linears(shard)[module]
                if kind == "o_proj":
                    assert torch.equal(dense(got), expected_slice(kind, wanted, r, tp)), (name, module, r)
                    assert torch.equal(got.bias, lin.bias if r == 0 else torch.zeros_like(lin.bias)), (name, r)
                    continue
                for part in ("weight", "scales", "biases", "bias"):
                    if getattr(lin, part) is not None:
                        want = expected_slice(kind, getattr(lin, part), r, tp)
                        assert torch.equal(getattr(got, part), want), (name, module, part, r)
        for r, shard in enumerate(ranks):
            sinks = shard.model.layers[1].self_attn.sinks
            assert torch.equal(sinks, whole.model.layers[1].self_attn.sinks[r * H // tp : (r + 1) * H // tp])


def test_published_layout_regions_equal_the_whole_tensor_sliced(checkpoints):
    """Reading a region of a published-layout expert tensor (MXFP4 blocks re-laid, gate and up
    de-interleaved) gives the whole tensor's read, sliced: for every tensor and every --tp 2 rank."""
    ckpt = Checkpoint(checkpoints["hf-mxfp4"])
    try:
        for name in ckpt.names():
            shape = ckpt.expected[name]
            whole = ckpt.read(name)
            for r in range(2):
                shard = Parallel(r, 2).shard(name, shape, CONFIG)
                index = shard.index(len(shape))
                if index is not None:
                    assert torch.equal(ckpt.read(name, index), whole[index]), (name, r)
    finally:
        ckpt.close()


# ---- what cannot be split, and ranks that fail ------------------------------------------------------------
def test_tp_not_dividing_heads_experts_or_kv_heads_is_refused():
    with pytest.raises(ConfigError, match="--tp 3 does not divide the model's 8 attention heads"):
        Parallel(world_size=3).check(CONFIG, {})
    with pytest.raises(ConfigError, match="6 experts"):
        Parallel(world_size=4).check(small_config(**{**_shape(), "num_local_experts": 6}), {})
    with pytest.raises(ConfigError, match="kv heads"):
        odd = small_config(**{**_shape(), "num_key_value_heads": 3, "num_attention_heads": 6})
        Parallel(world_size=2).check(odd, {})


def _shape() -> dict:
    return dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, head_dim=32)


def test_tp_that_cuts_o_proj_quantization_groups_is_refused_before_any_rank_starts(checkpoints):
    with pytest.raises(UnsupportedQuantization, match="cuts its quantization groups of 128"):
        check_checkpoint(checkpoints["a4g128"], 4)
    check_checkpoint(checkpoints["a4g128"], 2)  # 128 inputs per rank: whole groups


def test_ops_whose_moe_computes_the_whole_expert_stack_are_refused_under_tp():
    Parallel(world_size=2).check_ops("torch")
    Parallel(world_size=2).check_ops(None)
    Parallel(world_size=2).check_ops("triton")  # its MoE skips the pairs of other ranks' experts
    with pytest.raises(OssqError, match="--tp 2 runs with the torch or triton ops \\(the 'cpu' ops"):
        Parallel(world_size=2).check_ops("cpu")
    Parallel().check_ops("cpu")  # one rank: any ops


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr("ossq.engine.launch.resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="--tp 2 needs 2 GPUs, one per rank, but this machine has 1"):
        launch(_fails, "raise", tp=2, device="cuda")


def _fails(parallel: Parallel, how: str) -> None:
    """Rank 1 fails as `how` says while rank 0 waits for it in a collective."""
    if parallel.rank == 1:
        if how == "raise":
            raise InvalidArgument("max_tokens", "max_tokens must be at least 1, got 0")
        if how == "bug":
            raise ValueError("a bug on rank 1")
        if how == "die":
            os._exit(7)
        time.sleep(120)  # "hang": never reaches the collective
    dist.barrier()


@pytest.mark.parametrize(
    ("how", "error", "message"),
    [
        ("raise", InvalidArgument, "max_tokens must be at least 1"),
        ("bug", ParallelError, "rank 1 of 2 failed: ValueError: a bug on rank 1"),
        ("die", ParallelError, "rank 1 of 2 died \\(exit code 7\\)"),
        ("hang", ParallelError, "rank 0 of 2 failed"),
    ],
)
def test_a_rank_that_fails_ends_the_run_with_a_clear_error_and_no_hang(how, error, message):
    start = time.perf_counter()
    with pytest.raises(error, match=message) as e:
        launch(_fails, how, tp=2, timeout_s=3)
    assert isinstance(e.value, OssqError)
    assert time.perf_counter() - start < 30


# ---- the commands -------------------------------------------------------------------------------------------
def test_generate_with_tp_2_prints_what_one_process_prints(tiny_checkpoint, capfd):
    """capfd: rank 0 prints from its own process, to the inherited stdout."""
    argv = ["generate", "-m", str(tiny_checkpoint), "-p", "Tell me a story", "--max-tokens", "6", "--temp", "0"]
    assert main(argv) == 0
    one = capfd.readouterr().out.splitlines()
    assert main([*argv, "--tp", "2"]) == 0
    two = capfd.readouterr().out.splitlines()
    assert two[:2] == one[:2] and one[1].strip()  # the note and the text; the stats line has timings
    assert "generation: 6 tokens" in two[2]


def test_bench_with_tp_2_measures_and_rank_0_writes_the_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "-m", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--tp", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["tp"] == 2
    assert not report["rows"][0].get("error") and report["rows"][0]["model"] == "tiny"


def test_tp_that_cannot_split_the_model_fails_the_command_in_one_line(tiny_checkpoint, capsys):
    assert main(["generate", "-m", str(tiny_checkpoint), "-p", "hi", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ossq generate: error: --tp 3 does not divide the model's 4 attention heads; choose a divisor of 4"


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_generate_with_tp_2_and_a_draft_prints_what_one_process_prints(tiny_checkpoint, capfd, draft):
    """Every rank drafts alike (the n-gram drafter reads the same tokens; a draft model is replicated, whole,
    on every rank) and verifies the same gathered logits, so speculation changes no greedy token."""
    argv = ["generate", "-m", str(tiny_checkpoint), "-p", "Tell me a story", "--max-tokens", "12", "--temp", "0"]
    assert main(argv) == 0
    one = capfd.readouterr().out.splitlines()
    drafter = "ngram" if draft == "ngram" else str(tiny_checkpoint)
    assert main([*argv, "--tp", "2", "--draft-model", drafter, "--num-draft-tokens", "3"]) == 0
    two = capfd.readouterr().out.splitlines()
    assert two[:2] == one[:2] and one[1].strip()


# ---- --ep: experts split, attention whole, every rank its own requests ----------------------------------
EP_CHECKPOINTS = ("hf-mxfp4", "mlx-bf16", "a3g64", "a5g32")


def run_ep(
    parallel: Parallel, paths: dict[str, str], placement: tuple | None = None
) -> dict[str, tuple[list[torch.Tensor], list[list[int]]]]:
    """Rank r runs prompts r, r + N, … (so the ranks' steps differ in rows, and one rank runs out of work
    first) → per checkpoint, on rank 0, the logits of each rank's first prompt and all greedy tokens, in
    prompt order. `placement`: each layer's slot order of the experts (--ep-placement)."""
    import dataclasses

    parallel = dataclasses.replace(parallel, expert_only=True, placement=placement)
    mine = list(range(parallel.rank, len(PROMPTS), parallel.world_size))
    out = {}
    for name, path in paths.items():
        model, _ = load_model(path, dtype=torch.float32, ops="torch", parallel=parallel)
        logits = forward_full(model, torch.tensor([PROMPTS[mine[0]]]))[0]
        engine = Engine(model, EngineConfig(max_num_seqs=4, kv_cache_tokens=512))
        ids = {i: engine.add_request(PROMPTS[i], SamplingParams(), max_tokens=MAX_TOKENS) for i in mine}
        while engine.has_unfinished:
            engine.step()
        engine.wait_for_peers()
        every: list = [None] * parallel.world_size
        dist.all_gather_object(every, ({i: engine.request(r).output for i, r in ids.items()}, logits))
        tokens = {i: t for outputs, _ in every for i, t in outputs.items()}
        out[name] = ([lg for _, lg in every], [tokens[i] for i in range(len(PROMPTS))])
    return out


@pytest.mark.parametrize("ep", [2, 3, "2, placed"])
def test_ep_gives_one_process_greedy_tokens_and_logits(checkpoints, ep):
    """--ep 3 of a 4-expert model is refused; with 6 experts it would run: here 3 checks the refusal.
    "placed": every layer's experts in another order across the ranks (each rank's experts no longer
    contiguous, the router's outputs permuted alike), which must change nothing."""
    paths = {k: checkpoints[k] for k in EP_CHECKPOINTS}
    if ep == 3:
        with pytest.raises(ConfigError, match="--ep 3 does not divide the model's 4 experts"):
            check_checkpoint(paths["hf-mxfp4"], 3, expert_only=True)
        return
    placement = ((3, 0, 2, 1), (1, 3, 0, 2)) if ep == "2, placed" else None
    got = launch(run_ep, paths, placement, tp=2)
    for name, path in paths.items():
        model, _ = load_model(path, dtype=torch.float32, ops="torch")
        logits, tokens = got[name]
        assert tokens == _greedy(SINGLE, model), name
        for r, lg in enumerate(logits):
            ref = forward_full(model, torch.tensor([PROMPTS[r]]))[0]
            torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)


def test_generate_with_ep_2_prints_and_writes_what_one_process_does(tiny_checkpoint, capfd, tmp_path):
    argv = ["generate", "-m", str(tiny_checkpoint), "-p", "Tell me a story", "--max-tokens", "6", "--temp", "0"]
    assert main(argv) == 0
    one = capfd.readouterr().out.splitlines()
    assert main([*argv, "--ep", "2"]) == 0
    assert capfd.readouterr().out.splitlines()[:2] == one[:2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Story number {i}:"}) + "\n" for i in range(5)))
    outputs = {}
    for flags in ([], ["--ep", "2"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        base = ["generate", "-m", str(tiny_checkpoint), "--prompts-file", str(prompts), "--out", str(out)]
        assert main([*base, "--max-tokens", "5", "--temp", "0", *flags]) == 0
        outputs[len(flags)] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in outputs[2]] == [r["text"] for r in outputs[0]] and len(outputs[0]) == 5


def test_ep_with_tp_is_refused_in_one_line(tiny_checkpoint, capsys):
    assert main(["generate", "-m", str(tiny_checkpoint), "-p", "hi", "--tp", "2", "--ep", "2"]) == 2
    assert "--tp and --ep together are not supported" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--ep", "2"], ["--tp", "2", "--draft-model", "ngram"]])
def test_bench_with_ep_2_or_drafting_under_tp_2_measures(tiny_checkpoint, tmp_path, flags):
    out = tmp_path / "bench.json"
    argv = ["bench", "-m", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--batch", "1,2", *flags, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"][flags[0].removeprefix("--")] == 2
    row = report["rows"][0]
    assert not row.get("error") and row["model"] == "tiny"
    if flags[0] == "--ep":  # every (token, expert) pair is counted once, on the rank whose expert took it
        routed = row["routed_per_rank"]
        assert len(routed) == 2 and all(n > 0 for n in routed) and sum(routed) % 4 == 0  # top-4: pairs of 4


def test_balanced_placement_evens_the_ranks_load_and_reads_every_form(tmp_path, tiny_checkpoint):
    from ossq.engine.parallel import balanced_placement, read_placement

    placed = balanced_placement([[10, 9, 1, 0], [0, 0, 5, 5]], 2)
    assert placed == ((0, 3, 1, 2), (0, 2, 1, 3))  # loads 10 + 0 against 9 + 1; 0 + 5 against 0 + 5
    config = Checkpoint(tiny_checkpoint).config
    L, E = config.num_hidden_layers, config.num_local_experts
    routed = [[(7 * layer + e) % 5 for e in range(E)] for layer in range(L)]
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"rows": [{"routed_per_expert": routed}]}))
    assert read_placement(report, config, 2) == balanced_placement(routed, 2)
    explicit = tmp_path / "placement.json"
    explicit.write_text(json.dumps({"placement": [list(reversed(range(E)))] * L}))
    assert read_placement(explicit, config, 2) == (tuple(reversed(range(E))),) * L
    for bad in ({"placement": [[0] * E] * L}, {"routed": [[1] * (E + 1)] * L}, [1, 2]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="--ep-placement"):
            read_placement(tmp_path / "bad.json", config, 2)


def test_generate_with_a_placement_from_bench_prints_what_one_process_prints(tiny_checkpoint, capfd, tmp_path):
    report = tmp_path / "bench.json"
    argv = ["bench", "-m", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--ep", "2", "--json", str(report)]) == 0
    capfd.readouterr()
    prompt = ["generate", "-m", str(tiny_checkpoint), "-p", "Tell me a story", "--max-tokens", "6", "--temp", "0"]
    assert main(prompt) == 0
    one = capfd.readouterr().out.splitlines()
    assert main([*prompt, "--ep", "2", "--ep-placement", str(report)]) == 0
    assert capfd.readouterr().out.splitlines()[:2] == one[:2]
    assert main([*prompt, "--ep-placement", str(report)]) == 2
    assert "pass --ep too" in capfd.readouterr().err
