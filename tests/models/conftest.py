"""Fixtures for the model-port tests: random tiny transformers checkpoints and their logits."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def highest_matmul_precision():
    """Full-f32 dots (on GPU/TPU the default may use TF32 / bf16 passes)."""
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", previous)


def rerandomize(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: HF's init (zero biases, unit gains) would hide bugs in them.

    Matrices get std 1/sqrt(fan_in) so activations stay O(1) (the untied LM head 3/sqrt(fan_in),
    so logits have std ≳ 1 either way); norm gains are 1 + N(0, 0.3²) and biases N(0, 0.3²),
    both visibly away from their init.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(3.0 * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`make(name, hf_config, seed, rewrite=None) -> directory`: a random transformers model
    saved with `save_pretrained`; `rewrite(dict) -> dict` edits its config.json afterwards."""

    def make(name, hf_config, seed=0, rewrite=None):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        rerandomize(model, seed)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        if rewrite is not None:
            path = Path(directory) / "config.json"
            path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
        return directory

    return make


def hf_logits(directory, tokens: np.ndarray, **kwargs) -> np.ndarray:
    """transformers' float32 logits `[B, T, V]` of the checkpoint in `directory`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def reference_logits():
    return hf_logits
