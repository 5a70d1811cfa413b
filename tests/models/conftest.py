"""Fixtures for the model-port tests: random tiny transformers checkpoints and their logits."""

import json
from pathlib import Path

import jax
import pytest
import torch

from jaxsample.testing import rerandomize_torch_model, transformers_logits, transformers_model


@pytest.fixture(scope="module", autouse=True)
def highest_matmul_precision():
    """Full-f32 dots (on GPU/TPU the default may use TF32 / bf16 passes)."""
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", previous)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`make(name, hf_config, seed, rewrite=None) -> directory`: a random transformers model
    saved with `save_pretrained`; `rewrite(dict) -> dict` edits its config.json afterwards."""

    def make(name, hf_config, seed=0, rewrite=None):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        rerandomize_torch_model(model, seed)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        if rewrite is not None:
            path = Path(directory) / "config.json"
            path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
        return directory

    return make


@pytest.fixture(scope="session")
def reference_logits():
    """`(directory, tokens, **from_pretrained kwargs) -> logits [B, T, V]` of transformers' f32 model."""
    return lambda directory, tokens, **kwargs: transformers_logits(transformers_model(directory, **kwargs), tokens)
