"""The in-memory random quantized model that benchmarks gpt-oss-120b without a checkpoint on disk."""

from __future__ import annotations

import pytest
import torch

from ossq.engine.engine import forward_full
from ossq.engine.model import Linear
from ossq.engine.ops import dequantize
from ossq.quant.recipe import experts_mxfp4, plan, tiered
from ossq.synth import random_quantized_model
from tests.conftest import small_config


@pytest.mark.parametrize("recipe", [tiered(32), experts_mxfp4(4, 32)], ids=["tiered", "mxfp4-experts"])
def test_random_quantized_model_is_stored_as_the_recipe_says_with_scaled_weights(recipe):
    config = small_config()
    model = random_quantized_model(config, recipe, device="cpu", dtype=torch.float32, ops="torch")
    assert model.specs == plan(recipe, config).specs
    for path, spec in model.specs.items():
        lin = model.get_submodule(path)
        assert isinstance(lin, Linear) and lin.spec == spec
        w = dequantize(lin)
        rms, target = w.pow(2).mean().sqrt().item(), w.shape[-1] ** -0.5
        assert 0.7 * target < rms < 1.4 * target, (path, rms, target)
        assert w.std() > 0.5 * target  # drawn, not constant
    logits = forward_full(model, torch.tensor([[1, 2, 3, 4, 5]]))
    assert logits.isfinite().all() and logits.std() > 0.1
