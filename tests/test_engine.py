"""The engine for many sequences: batched equals alone, chunked prefill equals one forward, prefix caching
computes only what is new, preemption changes nothing, windows release blocks correctly, refusals
disturb nothing, and a decode step never synchronises with the host."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ossq.engine.batch import Batch, SeqChunk
from ossq.engine.engine import (
    GRAPH_CHUNK_TOKENS,
    PREFILL_CHUNK_TOKENS,
    Engine,
    EngineConfig,
    _token_rows,
    forward_full,
)
from ossq.engine.kv import BLOCK_TOKENS, KVPool, blocks_for
from ossq.engine.sampling import SamplingParams
from ossq.errors import InvalidArgument, PromptTooLong
from tests.conftest import random_model

TOL = 1e-5
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)


@pytest.fixture(scope="module")
def model():
    return random_model()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: list[dict], arrivals: list[int] | None = None) -> dict[int, dict]:
    """Add `requests[i]` at step `arrivals[i]` and step to the end → per request index: tokens, the logits
    of every position from the last prompt token on, and the request's cached-token count."""
    arrivals = arrivals or [0] * len(requests)
    ids: dict[int, int] = {}
    result = {i: {"tokens": [], "logits": []} for i in range(len(requests))}
    for step in range(max(arrivals) + 1):
        for i, r in enumerate(requests):
            if arrivals[i] == step:
                rid = engine.add_request(
                    r["prompt"], r.get("params"), max_tokens=r["max_tokens"], logits_from=len(r["prompt"]) - 1
                )
                ids[rid] = i
        collect(engine.step(), ids, result)
    while engine.has_unfinished:
        collect(engine.step(), ids, result)
    for rid, i in ids.items():
        result[i]["cached"] = engine.request(rid).cached_tokens
        result[i]["logits"] = torch.cat(result[i]["logits"])
    return result


def collect(outputs: list, ids: dict[int, int], result: dict[int, dict]) -> None:
    for out in outputs:
        i = ids[out.request_id]
        if out.logits is not None:
            result[i]["logits"].append(out.logits)
        if out.token is not None:
            result[i]["tokens"].append(out.token)


def alone(model, request: dict, **config) -> dict:
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024, max_num_seqs=1, prefix_cache=False, **config))
    return run(engine, [request])[0]


REQUESTS = [
    {"prompt": prompt(n, seed=n), "max_tokens": m, "params": SAMPLED if n % 2 else None}
    for n, m in [
        (1, 6),
        (5, 9),
        (7, 3),
        (8, 12),
        (9, 5),
        (15, 7),
        (16, 8),
        (17, 4),
        (31, 10),
        (32, 6),
        (33, 9),
        (47, 5),
        (64, 3),
        (100, 8),
        (211, 6),
        (300, 5),
    ]
]


def test_sixteen_requests_batched_equal_each_request_run_alone(model):
    arrivals = [0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 9, 12, 15, 20]
    engine = Engine(model, EngineConfig(kv_cache_tokens=4096, max_batch_tokens=128, prefix_cache=False))
    batched = run(engine, REQUESTS, arrivals)
    for i, request in enumerate(REQUESTS):
        expected = alone(model, request)
        assert batched[i]["tokens"] == expected["tokens"], f"request {i}"
        assert len(batched[i]["tokens"]) == request["max_tokens"]
        assert (batched[i]["logits"] - expected["logits"]).abs().max() < TOL


def test_chunked_prefill_and_decode_equal_one_full_forward(model):
    ids = prompt(70, seed=5)
    engine = Engine(model, EngineConfig(kv_cache_tokens=256, max_batch_tokens=9))
    rid = engine.add_request(ids, max_tokens=1, logits_from=0)
    stepped = torch.cat([out.logits for out in _drain(engine) if out.request_id == rid])
    full = forward_full(model, torch.tensor([ids]))[0]
    assert stepped.shape == full.shape
    assert (stepped - full).abs().max() < TOL


def test_a_prompt_replayed_as_one_token_rows_gives_the_logits_of_its_chunk(model):
    """A short prompt goes to a decode graph as one-token rows (engine._token_rows); eagerly here, those
    rows give the logits the prompt's chunk gives, past the sliding window and across blocks."""
    ids = prompt(90, seed=3)
    table = range(blocks_for(len(ids)))
    chunk = SeqChunk(ids, 0, table, logits_from=0)
    rows, wanted = _token_rows([chunk], torch.device("cpu"))
    assert len(rows) == len(ids) and wanted is None

    def logits(chunks: list[SeqChunk]) -> torch.Tensor:
        kv = KVPool.allocate(model.config, num_blocks=len(table), dtype=model.dtype, device=model.device)
        return model(Batch.build(chunks, device=model.device), kv)

    as_rows = [SeqChunk(r.tokens, r.start, r.block_table, logits_from=r.start) for r in rows]
    assert (logits(as_rows) - logits([chunk])).abs().max() < TOL


def test_a_step_goes_to_the_graphs_as_rows_while_its_rows_read_few_keys():
    def rows(n: int, start: int):
        chunk = SeqChunk([1] * n, start, range(blocks_for(start + n)), logits_from=start + n - 1)
        return _token_rows([chunk], torch.device("cpu"))

    first = rows(PREFILL_CHUNK_TOKENS, 0)  # a whole first prompt chunk, only its last row's logits wanted
    assert first is not None and first[1].tolist() == [PREFILL_CHUNK_TOKENS - 1]
    assert rows(PREFILL_CHUNK_TOKENS, PREFILL_CHUNK_TOKENS) is None  # its rows would read 393k keys
    assert rows(GRAPH_CHUNK_TOKENS, 100_000) is not None  # a verification: at any context
    assert rows(GRAPH_CHUNK_TOKENS + 1, 100_000) is None


def _drain(engine: Engine) -> list:
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    return outs


@pytest.mark.parametrize("shared", [5, 16, 24, 40, 75])  # under a block, one block, mid-block, past the window
def test_a_shared_prefix_is_computed_once_and_changes_no_logit(model, shared):
    base = prompt(shared, seed=11)
    first, second = base + prompt(9, seed=12), base + prompt(13, seed=13)
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    run(engine, [{"prompt": first, "max_tokens": 4}])
    before = engine.stats.computed_tokens
    cached = run(engine, [{"prompt": second, "max_tokens": 4}])[0]
    reused = shared // BLOCK_TOKENS * BLOCK_TOKENS
    assert cached["cached"] == reused
    assert engine.stats.computed_tokens - before == len(second) - reused + 3  # + 3 decode steps
    expected = alone(model, {"prompt": second, "max_tokens": 4})
    assert cached["tokens"] == expected["tokens"]
    assert (cached["logits"] - expected["logits"]).abs().max() < TOL


def test_a_repeated_prompt_recomputes_only_its_last_block(model):
    ids = prompt(48, seed=3)
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    run(engine, [{"prompt": ids, "max_tokens": 2}])
    again = run(engine, [{"prompt": ids, "max_tokens": 2}])[0]
    assert again["cached"] == 32  # its last token must be computed, so the block holding it is not shared
    assert again["tokens"] == alone(model, {"prompt": ids, "max_tokens": 2})["tokens"]


def test_generated_tokens_are_cached_for_the_next_turn_of_a_chat(model):
    ids = prompt(20, seed=4)
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    reply = run(engine, [{"prompt": ids, "max_tokens": 30}])[0]["tokens"]
    next_turn = ids + reply + prompt(5, seed=6)
    assert run(engine, [{"prompt": next_turn, "max_tokens": 2}])[0]["cached"] == 48  # 49 tokens were computed


def test_unreferenced_blocks_are_evicted_least_recently_used_first(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=10 * BLOCK_TOKENS))
    a, b, c = prompt(65, seed=21), prompt(65, seed=22), prompt(65, seed=23)
    for ids in (a, b):
        run(engine, [{"prompt": ids, "max_tokens": 1}])
    assert run(engine, [{"prompt": b, "max_tokens": 1}])[0]["cached"] == 64  # b: most recent, still there
    run(engine, [{"prompt": c, "max_tokens": 1}])  # needs 5 blocks: evicts a's, the least recently used
    assert run(engine, [{"prompt": a, "max_tokens": 1}])[0]["cached"] == 0
    expected = alone(model, {"prompt": a, "max_tokens": 1})
    assert run(engine, [{"prompt": a, "max_tokens": 1}])[0]["tokens"] == expected["tokens"]


def test_no_prefix_cache_reuses_nothing(model):
    ids = prompt(40, seed=8)
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024, prefix_cache=False))
    run(engine, [{"prompt": ids, "max_tokens": 2}])
    assert run(engine, [{"prompt": ids, "max_tokens": 2}])[0]["cached"] == 0


def test_preempted_requests_finish_with_the_outputs_of_an_unconstrained_run(model):
    requests = [{"prompt": prompt(30 + 7 * i, seed=40 + i), "max_tokens": 40, "params": SAMPLED} for i in range(6)]
    small = Engine(model, EngineConfig(kv_cache_tokens=12 * BLOCK_TOKENS, max_batch_tokens=64))
    constrained = run(small, requests)
    assert small.preemptions > 0
    roomy = run(Engine(model, EngineConfig(kv_cache_tokens=4096, prefix_cache=False)), requests)
    for i in range(len(requests)):
        assert constrained[i]["tokens"] == roomy[i]["tokens"]
        assert len(constrained[i]["tokens"]) == 40


def test_max_kv_size_releases_blocks_and_equals_a_capped_full_forward(model):
    ids = prompt(120, seed=9)
    engine = Engine(model, EngineConfig(kv_cache_tokens=6 * BLOCK_TOKENS, max_kv_size=24, max_batch_tokens=10))
    rid = engine.add_request(ids, max_tokens=1, logits_from=0)  # 120 positions in a pool of 96
    stepped = torch.cat([out.logits for out in _drain(engine) if out.request_id == rid])
    capped = forward_full(model, torch.tensor([ids]), max_kv_size=24)[0]
    assert (stepped - capped).abs().max() < TOL
    uncapped = forward_full(model, torch.tensor([ids]))[0]
    assert (capped[:24] - uncapped[:24]).abs().max() < TOL  # identical until the cap bites
    assert (capped[-1] - uncapped[-1]).abs().max() > 1e-3  # and then it changes the answer


def test_a_request_that_cannot_fit_alone_is_refused_and_the_others_run_on(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=8 * BLOCK_TOKENS))
    ok = engine.add_request(prompt(20, seed=1), max_tokens=5)
    with pytest.raises(PromptTooLong, match="kv_cache_tokens"):
        engine.add_request(prompt(120, seed=2), max_tokens=20)
    with pytest.raises(PromptTooLong, match="context"):
        Engine(model, EngineConfig(kv_cache_tokens=8192)).add_request(prompt(10, seed=1), max_tokens=5000)
    with pytest.raises(InvalidArgument, match="empty"):
        engine.add_request([], max_tokens=5)
    with pytest.raises(InvalidArgument, match="token ids"):
        engine.add_request([512], max_tokens=5)
    outs = [o for o in _drain(engine) if o.request_id == ok]
    assert [o.token for o in outs] == alone(model, {"prompt": prompt(20, seed=1), "max_tokens": 5})["tokens"]


def test_stop_tokens_end_a_request_and_abort_frees_its_blocks(model):
    ids = prompt(10, seed=7)
    first = alone(model, {"prompt": ids, "max_tokens": 5})["tokens"]
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024, prefix_cache=False))
    rid = engine.add_request(ids, max_tokens=5, stop=[first[2]])
    outs = [o for o in engine.stream(rid) if o.token is not None]
    assert [o.token for o in outs] == first[: first.index(first[2]) + 1]
    assert outs[-1].finish_reason == "stop"
    other = engine.add_request(ids, max_tokens=50)
    engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(other)
    assert engine.blocks.num_used == 0 and not engine.has_unfinished


def test_interleaved_streams_each_get_their_own_tokens(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    a, b = prompt(12, seed=30), prompt(25, seed=31)
    sa = engine.stream(engine.add_request(a, max_tokens=6))
    sb = engine.stream(engine.add_request(b, max_tokens=4))
    got_a = [next(o for o in sa if o.token is not None).token]
    got_b = [o.token for o in sb if o.token is not None]  # steps a too: its tokens wait in its inbox
    got_a += [o.token for o in sa if o.token is not None]
    assert got_a == alone(model, {"prompt": a, "max_tokens": 6})["tokens"]
    assert got_b == alone(model, {"prompt": b, "max_tokens": 4})["tokens"]


OVERLAP_REQUESTS = [
    (prompt(9 + 7 * i, seed=80 + i), 4 + 3 * (i % 4), SAMPLED if i % 3 == 0 else None) for i in range(10)
]
OVERLAP_ARRIVALS = [0, 0, 0, 1, 3, 3, 6, 9, 10, 14]


def drive(model, *, overlap: bool, stops: dict[int, int], abort: tuple[int, int] | None = None, longer: int = 1,
          **config):  # fmt: skip
    """OVERLAP_REQUESTS (their max_tokens times `longer`) added at the calls of OVERLAP_ARRIVALS (request
    `abort[0]` aborted before call `abort[1]`), stepped to the end → (each request's tokens, the engine)."""
    engine = Engine(model, EngineConfig(max_num_seqs=6, overlap=overlap, **config))
    ids, tokens, call = {}, {i: [] for i in range(len(OVERLAP_REQUESTS))}, 0
    while call <= max(OVERLAP_ARRIVALS) or engine.has_unfinished:
        for i, (ids_, max_tokens, params) in enumerate(OVERLAP_REQUESTS):
            if OVERLAP_ARRIVALS[i] == call:
                stop = [stops[i]] if i in stops else []
                ids[engine.add_request(ids_, params, max_tokens=max_tokens * longer, stop=stop)] = i
        if abort is not None and call == abort[1]:
            engine.abort(next(rid for rid, i in ids.items() if i == abort[0]))
        for out in engine.step():
            if out.token is not None:
                tokens[ids[out.request_id]].append(out.token)
        call += 1
    return tokens, engine


@pytest.mark.parametrize(
    "config",
    [
        dict(kv_cache_tokens=2048),
        dict(kv_cache_tokens=12 * BLOCK_TOKENS, prefix_cache=False, longer=4),  # outputs that outgrow the pool
        dict(max_kv_size=40),
    ],
    ids=["roomy", "preempting", "windowed"],
)
def test_overlapped_steps_give_the_synchronous_engines_tokens(model, config):
    """Steps launched before the step before them is booked (forced on, on the CPU), with requests that
    arrive mid-run, stop tokens and lengths that end requests whose next row is already launched, sampled
    and greedy rows, a pool small enough to preempt and windows that release blocks: the same tokens as
    the synchronous engine's, and every block back at the end."""
    plain, _ = drive(model, overlap=False, stops={}, **config)
    stops = {i: plain[i][2] for i in (1, 4, 5, 8) if len(plain[i]) > 3}  # requests that stop early
    expected, _ = drive(model, overlap=False, stops=stops, **config)
    got, engine = drive(model, overlap=True, stops=stops, **config)
    assert got == expected
    assert all(len(expected[i]) == plain[i].index(plain[i][2]) + 1 for i in stops)  # the stops did end them
    assert engine.stats.overlapped > 0 and (engine.preemptions > 0) == ("longer" in config)
    assert engine.blocks.num_used == 0
    assert not engine.has_unfinished


def test_an_abort_while_the_next_step_runs_changes_no_other_request(model):
    expected, _ = drive(model, overlap=False, stops={}, kv_cache_tokens=2048, abort=(3, 5))
    got, engine = drive(model, overlap=True, stops={}, kv_cache_tokens=2048, abort=(3, 5))
    assert got == expected and len(got[3]) < OVERLAP_REQUESTS[3][1]
    assert engine.stats.overlapped > 0 and not engine.has_unfinished


class SyncProbe(TorchFunctionMode):
    """Records the torch calls that read a tensor's value back to the host."""

    SYNCING = {"item", "tolist", "__bool__", "nonzero", "cpu", "numpy", "unique", "__int__", "__float__"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING or (name == "where" and len(args) == 1):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_a_decode_step_of_forward_and_sampling_never_reads_the_device(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    for i in range(4):
        engine.add_request(prompt(10 + i, seed=i), SAMPLED if i % 2 else None, max_tokens=8)
    engine.step()  # the prefills
    plan = engine.scheduler.schedule()
    assert all(n == 1 for _, n in plan)
    from ossq.engine.engine import _Planned

    planned = [_Planned(req, req.num_computed, req.num_computed + n) for req, n in plan]
    batch = engine._batch(engine._chunks(planned))
    with torch.inference_mode(), SyncProbe() as probe:
        logits = model(batch, engine.kv)
        engine._sample(logits, planned)
    assert probe.seen == []


def test_the_sync_probe_sees_the_host_reads_of_a_prefill_step(model):
    """The probe can fail: a 40-token step groups tokens by expert, which reads the routing back."""
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    engine.add_request(prompt(40, seed=1), max_tokens=2)
    from ossq.engine.engine import _Planned

    ((req, n),) = engine.scheduler.schedule()
    batch = engine._batch(engine._chunks([_Planned(req, 0, n)]))
    with torch.inference_mode(), SyncProbe() as probe:
        model(batch, engine.kv)
    assert "unique" in probe.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_decode_step_of_forward_and_sampling_runs_under_sync_debug_mode_error():
    from ossq.engine.engine import _Planned

    model = random_model().cuda()
    engine = Engine(model, EngineConfig(kv_cache_tokens=1024))
    for i in range(4):
        engine.add_request(prompt(10 + i, seed=i), SAMPLED if i % 2 else None, max_tokens=8)
    engine.step()
    planned = [_Planned(req, req.num_computed, req.num_computed + n) for req, n in engine.scheduler.schedule()]
    batch = engine._batch(engine._chunks(planned))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            engine._sample(model(batch, engine.kv), planned)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_engine_gives_the_cpu_engines_tokens(model):
    """Through `step`, whose token read on CUDA is a non-blocking copy that the bookkeeping overlaps."""
    requests = [{"prompt": prompt(20 + 9 * i, seed=60 + i), "max_tokens": 12} for i in range(4)]
    on_cpu = run(Engine(model, EngineConfig(kv_cache_tokens=1024)), requests)
    on_gpu = run(Engine(random_model().cuda(), EngineConfig(kv_cache_tokens=1024)), requests)
    for i in range(len(requests)):
        assert on_gpu[i]["tokens"] == on_cpu[i]["tokens"]
        assert (on_gpu[i]["logits"].cpu() - on_cpu[i]["logits"]).abs().max() < 1e-3
