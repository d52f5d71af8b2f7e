"""`Engine.abort`, as the server uses it when a client goes away: a waiting or running request leaves at
once, its blocks are free before the next step, and the requests beside it produce exactly what they
would have produced without it."""

from __future__ import annotations

import pytest
import torch

from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.kv import BLOCK_TOKENS
from tests.conftest import random_model


@pytest.fixture(scope="module")
def model():
    return random_model()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens_alone(model, p: list[int], n: int) -> list[int]:
    engine = Engine(model, EngineConfig(kv_cache_tokens=4096, prefix_cache=False))
    rid = engine.add_request(p, max_tokens=n)
    while engine.has_unfinished:
        engine.step()
    return engine.request(rid).output


def test_aborting_a_running_request_frees_its_blocks_at_once_and_the_others_go_on(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=4096, prefix_cache=False))
    keep = engine.add_request(prompt(40, 1), max_tokens=12)
    gone = engine.add_request(prompt(70, 2), max_tokens=200)
    for _ in range(4):
        engine.step()
    held = len(engine.request(gone).blocks)
    assert held >= 70 // BLOCK_TOKENS and engine.blocks.num_used == held + len(engine.request(keep).blocks)
    engine.abort(gone)
    engine.release(gone)
    assert engine.blocks.num_used == len(engine.request(keep).blocks)  # before any further step
    assert gone not in engine.requests and gone not in engine.stats.times
    assert [r.id for r in engine.scheduler.running] == [keep]
    while engine.has_unfinished:
        assert all(out.request_id == keep for out in engine.step())
    assert engine.request(keep).output == tokens_alone(model, prompt(40, 1), 12)


def test_aborting_a_waiting_request_takes_it_out_of_the_queue(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=4096, max_num_seqs=1, prefix_cache=False))
    first = engine.add_request(prompt(20, 3), max_tokens=5)
    waiting = engine.add_request(prompt(20, 4), max_tokens=5)
    engine.step()
    assert [r.id for r in engine.scheduler.waiting] == [waiting] and not engine.request(waiting).blocks
    used = engine.blocks.num_used
    engine.abort(waiting)
    engine.release(waiting)
    assert not engine.scheduler.waiting and engine.blocks.num_used == used
    while engine.has_unfinished:
        engine.step()
    assert engine.blocks.num_used == 0
    assert engine.request(first).output == tokens_alone(model, prompt(20, 3), 5)


def test_an_aborted_requests_full_blocks_stay_in_the_prefix_cache(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=4096))
    p = prompt(3 * BLOCK_TOKENS + 5, 5)
    rid = engine.add_request(p, max_tokens=50)
    engine.step()
    engine.abort(rid)
    engine.release(rid)
    assert engine.blocks.num_used == 0
    again = engine.add_request(p, max_tokens=2)
    engine.step()
    assert engine.request(again).cached_tokens == 3 * BLOCK_TOKENS
