"""Incremental decode through the KV cache equals a full forward; windowed layers stay bounded."""

from __future__ import annotations

import pytest
import torch

from ossq.engine.model import GptOss
from ossq.errors import PromptTooLong
from tests.conftest import small_config

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    config = small_config()
    m = GptOss(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("inv_freq"):
                continue
            std = 1.0 if "embed" in name or "sinks" in name else b.shape[-1] ** -0.5
            b.copy_((1.0 if "norm" in name else 0.0) + std * torch.randn(b.shape, generator=gen))
    return m


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def run_chunks(model: GptOss, ids: torch.Tensor, chunks: list[int], **cache_kwargs) -> torch.Tensor:
    cache = model.make_cache(max_tokens=ids.shape[1], chunk=max(chunks), **cache_kwargs)
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start : start + n], cache))
        start += n
    assert start == ids.shape[1]
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_token_by_token_decode_equals_full_forward_past_the_window(model):
    ids = tokens(40)
    full = model(ids)
    steps = run_chunks(model, ids, [5] + [1] * 35)
    assert (steps - full).abs().max() < TOL


@torch.no_grad()
def test_uneven_prefill_chunks_equal_full_forward(model):
    ids = tokens(50, seed=1)
    full = model(ids)
    chunked = run_chunks(model, ids, [7, 7, 3, 7, 7, 7, 7, 5])
    assert (chunked - full).abs().max() < TOL


@torch.no_grad()
def test_max_kv_size_caps_full_layers_and_decode_agrees_with_one_shot(model):
    ids = tokens(40, seed=2)
    one_shot = run_chunks(model, ids, [40], max_kv_size=12)
    stepped = run_chunks(model, ids, [4] + [1] * 36, max_kv_size=12)
    assert (stepped - one_shot).abs().max() < TOL
    uncapped = model(ids)
    assert (one_shot[:, :12] - uncapped[:, :12]).abs().max() < TOL  # identical until the cap bites
    assert (one_shot[:, -1] - uncapped[:, -1]).abs().max() > 1e-3  # and then it does change the answer


def test_windowed_layers_do_not_grow_with_context(model):
    small = model.make_cache(max_tokens=100, chunk=16)
    large = model.make_cache(max_tokens=10_000, chunk=16)
    window = model.config.sliding_window
    for i, (a, b) in enumerate(zip(small.layers, large.layers, strict=True)):
        if model.config.window(i):
            assert a.k.shape == b.k.shape and a.k.shape[1] == window + 16 - 1
        else:
            assert b.k.shape[1] == 10_000
    capped = model.make_cache(max_tokens=10_000, chunk=16, max_kv_size=64)
    assert max(kv.k.shape[1] for kv in capped.layers) == 64 + 16 - 1


@torch.no_grad()
def test_cache_refuses_more_tokens_than_it_was_made_for(model):
    cache = model.make_cache(max_tokens=10, chunk=8)
    model(tokens(8), cache)
    with pytest.raises(PromptTooLong, match="10"):
        model(tokens(3), cache)
