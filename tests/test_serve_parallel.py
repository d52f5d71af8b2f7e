"""`ossq serve --tp 2` (serve/mirror.py): rank 0 serves HTTP and rank 1 replays its engine's calls, so
both engines step alike and the forward's collectives line up.

A real server process on the tiny checkpoint (two gloo ranks on the CPU) is driven as in test_serve.py,
with `ossq.generate` in this process as the oracle; a batch whose requests differ (greedy, seeded and
unseeded sampling, a response_format constraint, a cut stream) must give each request what one process
gives it, or the ranks fell out of step. The mirror alone runs under `launch`, where the follower's
engine can be compared with rank 0's. Starting a server costs ~10 s on 2 cores, so there are three."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import threading
import time

import pytest
import torch.distributed as dist

from ossq.cli import main
from ossq.engine.constrain import FinalJson
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import load
from ossq.engine.launch import launch
from ossq.engine.sampling import SamplingParams
from ossq.serve.mirror import Mirror, _Detached, follow
from ossq.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from tests.test_serve import API_KEY, GREEDY, MODEL, _alone, ossq_serve  # noqa: E402 (needs openai)

SERVE_TP = ("--tp", "2", "--max-num-seqs", "4", "--kv-cache-tokens", "4096")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, *SERVE_TP)
    yield s
    s.stop()


def test_concurrent_requests_under_tp_2_give_what_one_process_gives(server, oracle):
    """Six requests for four sequence slots (so some wait), greedy and seeded, beside an unseeded sampled
    one and a response_format one: every checked text is the oracle's."""
    prompts = [f"Request {i}: the number {i * 37 % 101}." for i in range(6)]
    lengths = [4 + 2 * i for i in range(6)]
    seeded = dict(temperature=1.0, seed=11)
    json_chat = dict(messages=[{"role": "user", "content": "JSON please"}], response_format={"type": "json_object"})
    client = server.async_client()

    async def together():
        greedy = [
            client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY)
            for p, n in zip(prompts, lengths, strict=True)
        ]
        others = [
            client.completions.create(model=MODEL, prompt="Seeded", max_tokens=10, **seeded),
            client.completions.create(model=MODEL, prompt="Unseeded", max_tokens=10, temperature=1.0),
            client.chat.completions.create(model=MODEL, max_tokens=8, **json_chat, **GREEDY),
        ]
        return await asyncio.gather(*greedy, *others)

    *greedy, seeded_out, unseeded_out, json_out = asyncio.run(together())
    assert [o.choices[0].text for o in greedy] == [_alone(oracle, p, n) for p, n in zip(prompts, lengths, strict=True)]
    import ossq

    model, tokenizer = oracle
    sampled = ossq.generate(model, tokenizer, "Seeded", max_tokens=10, sampling=SamplingParams(**seeded))
    assert seeded_out.choices[0].text == sampled
    assert unseeded_out.usage.completion_tokens == 10 and json_out.usage.completion_tokens == 8
    assert server.metrics()["ossq_requests_in_flight"] == 0


def test_a_stream_cut_mid_way_leaves_the_ranks_in_step(server, oracle):
    """A client leaves a long stream while another request runs beside it: the abort reaches rank 1
    before the next step, so the request beside it and one after it still give the oracle's text."""
    body = {"prompt": "Write a long story.", "max_tokens": 2000, "stream": True}
    beside: dict[str, str] = {}

    def run_beside() -> None:
        out = server.client().completions.create(model=MODEL, prompt="Beside it", max_tokens=40, **GREEDY)
        beside["text"] = out.choices[0].text

    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()  # kept: closing this generator would close the response
        assert next(lines).startswith("data: ")
        thread = threading.Thread(target=run_beside)
        thread.start()
        server.wait_metric("ossq_requests_running", lambda v: v == 2)
    server.wait_metric('ossq_requests_finished_total{reason="cancelled"}', lambda v: v >= 1)
    thread.join(60)
    assert beside["text"] == _alone(oracle, "Beside it", 40)
    after = server.client().completions.create(model=MODEL, prompt="And after", max_tokens=12, **GREEDY)
    assert after.choices[0].text == _alone(oracle, "And after", 12)
    server.wait_metric("ossq_kv_blocks_used", lambda v: v == 0)


def test_sigterm_under_tp_2_lets_the_request_in_flight_finish_and_every_rank_exit(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, *SERVE_TP, api_key=None)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 30, "stream": True, **GREEDY}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            ranks = _ranks(s.proc.pid)
            s.proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes the stop to rank 0
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert s.proc.wait(30) == 0, s.log
        assert "Application shutdown complete" in s.log
        assert len(ranks) == 2 and not any(_alive(pid) for pid in ranks)
    finally:
        s.stop()


def test_a_rank_that_dies_ends_the_server_with_a_clear_error(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, *SERVE_TP)
    try:
        ranks = _ranks(s.proc.pid)
        os.kill(ranks[1], signal.SIGKILL)
        assert s.proc.wait(30) == 2
        assert "ossq serve: error: rank 1 of 2 died (SIGKILL)" in s.log
        assert not _alive(ranks[0])
    finally:
        s.stop()


def _ranks(parent: int) -> list[int]:
    """The launcher's spawned ranks, by rank (they start in order)."""
    ps = subprocess.run(["ps", "-ww", "--ppid", str(parent), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return sorted(int(line.split()[0]) for line in ps.splitlines() if "spawn_main" in line)


def _alive(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


# ---- the mirror alone ---------------------------------------------------------------------------------------
IDLE_S = 3.0  # longer than the collective timeout below: followers wait in the receive all that time


def _mirrored(parallel, path: str) -> list[dict]:
    """Rank 0 drives a Mirror after an idle spell (a greedy request, an unseeded sampled one, a
    constrained one aborted mid-way); rank 1 follows. → every rank's requests and their tokens."""
    model, tokenizer = load(path, device="cpu", parallel=parallel)
    engine = Engine(model, EngineConfig(max_num_seqs=4, kv_cache_tokens=1024))
    if parallel.rank:
        follow(engine, tokenizer, parallel)
    else:
        mirror = Mirror(engine, parallel)
        time.sleep(IDLE_S)
        mirror.add_request([1, 5, 9, 30, 100], SamplingParams(temperature=0), max_tokens=8)
        mirror.add_request([300, 2, 8], SamplingParams(temperature=1.0), max_tokens=8)
        constraint = FinalJson.for_schema(tokenizer, {"type": "object"})
        cut = mirror.add_request([77] * 20, SamplingParams(), max_tokens=50, constraint=constraint)
        for step in range(100):
            if not engine.has_unfinished:
                break
            mirror.step()
            if step == 2:
                mirror.abort(cut)
        mirror.close()
    outputs = {rid: req.output for rid, req in engine.requests.items()}
    every: list = [None] * parallel.world_size
    dist.all_gather_object(every, outputs)
    return every


def test_the_mirror_replays_rank_0s_calls_on_rank_1_after_an_idle_spell(tiny_checkpoint, oracle):
    ranks = launch(_mirrored, str(tiny_checkpoint), tp=2, timeout_s=IDLE_S - 1)
    assert ranks[0] == ranks[1] and sorted(ranks[0]) == [0, 1]  # the aborted one is gone on both
    assert all(len(tokens) == 8 for tokens in ranks[0].values())
    engine = Engine(oracle[0], EngineConfig(kv_cache_tokens=1024))
    rid = engine.add_request([1, 5, 9, 30, 100], SamplingParams(temperature=0), max_tokens=8)
    while engine.has_unfinished:
        engine.step()
    assert ranks[0][0] == engine.request(rid).output


def test_a_constraint_travels_without_its_tokenizer_and_behaves_the_same():
    tokenizer = Tokenizer.o200k_harmony()
    original = FinalJson.for_schema(tokenizer, {"type": "object"})
    for name in ("<|channel|>", "final", "<|message|>"):
        original.advance(tokenizer.token_id(name) if name.startswith("<|") else tokenizer.encode(name)[0])
    wire = pickle.dumps(_Detached.of(original))
    assert len(wire) < 2000  # the vocabulary stays home
    copy = pickle.loads(wire).attach(tokenizer)
    assert copy.token_bytes == tokenizer.token_bytes and copy.state == original.state is not None
    probes = [*tokenizer.encode('{"a": 1} x'), tokenizer.token_id("<|return|>")]
    assert [copy.allows(t) for t in probes] == [original.allows(t) for t in probes]


# ---- what is refused -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tp", "2", "--draft-model", "ngram"], "--tp above 1 is not supported yet"),
        (["--tp", "3"], "--tp 3 does not divide the model's"),
    ],
)
def test_serve_refuses_what_tp_cannot_do_in_one_line(tiny_checkpoint, capsys, flags, says):
    assert main(["serve", "-m", str(tiny_checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ossq serve: error: ") and says in err
