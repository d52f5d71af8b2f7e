"""`ossq serve --dp N` (serve/app.py): N engine replicas behind one endpoint, each request routed to the
replica whose prefix cache holds most of its prompt. A real server with two CPU replicas of the tiny
checkpoint must give every request what one process gives it, and send a conversation's next turn to
the replica that ran its first; the routing rule itself is checked on stand-in replicas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ossq.cli import main
from ossq.serve.app import _State

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from tests.test_serve import GREEDY, MODEL, _alone, ossq_serve  # noqa: E402 (needs openai)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, "--dp", "2", "--max-num-seqs", "2", "--kv-cache-tokens", "4096")
    yield s
    s.stop()


def test_two_replicas_give_every_request_what_one_process_gives(server, oracle):
    prompts = [f"Replica check {i}: count to {i + 3}." for i in range(6)]
    client = server.async_client()

    async def together():
        calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY) for p in prompts]
        return await asyncio.gather(*calls)

    outs = asyncio.run(together())
    assert [o.choices[0].text for o in outs] == [_alone(oracle, p, 6) for p in prompts]
    metrics = server.metrics()
    assert metrics["ossq_requests_in_flight"] == 0
    generated = sum(o.usage.completion_tokens for o in outs)
    assert metrics["ossq_generation_tokens_total"] == generated  # both replicas' counts, summed


def test_a_conversations_next_turn_goes_to_the_replica_that_holds_its_prefix(server):
    client = server.client()
    history = "The long first turn of one conversation, " * 12  # several 16-token blocks
    before = server.metrics().get("ossq_cached_prompt_tokens_total", 0)
    client.completions.create(model=MODEL, prompt=history, max_tokens=2, **GREEDY)
    client.completions.create(model=MODEL, prompt=history + " and its second turn.", max_tokens=2, **GREEDY)
    cached = server.metrics()["ossq_cached_prompt_tokens_total"] - before
    assert cached >= 16 * 4  # the second turn found the first's blocks: it ran on the same replica


def _stand_ins(cached: list[int], in_flight: list[int], max_num_seqs: int = 4) -> _State:
    engine = SimpleNamespace(config=SimpleNamespace(max_num_seqs=max_num_seqs))
    replicas = [
        SimpleNamespace(engine=engine, in_flight=n, cached_blocks=lambda _p, c=c: c)
        for c, n in zip(cached, in_flight, strict=True)
    ]
    return _State(replicas, tokenizer=None, config=None)


def test_routing_prefers_the_cached_prefix_unless_that_replica_is_a_batch_busier():
    state = _stand_ins(cached=[0, 5, 2], in_flight=[0, 3, 0])
    assert state.route([1, 2, 3]) is state.replicas[1]  # 3 more in flight than the idlest: still fair
    state = _stand_ins(cached=[0, 5, 2], in_flight=[0, 4, 0])
    assert state.route([1, 2, 3]) is state.replicas[2]  # a whole batch busier: the best of the others
    state = _stand_ins(cached=[0, 0], in_flight=[2, 1])
    assert state.route([1]) is state.replicas[1]  # nothing cached anywhere: the idler


def test_dp_with_tp_or_more_replicas_than_gpus_is_refused_in_one_line(tiny_checkpoint, capsys):
    assert main(["serve", "-m", str(tiny_checkpoint), "--dp", "2", "--tp", "2"]) == 2
    assert "--dp with --tp is not supported yet" in capsys.readouterr().err
