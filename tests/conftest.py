"""Fixtures shared across test directories."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32) as a `LanguageModel`, loaded once."""
    from jaxsample import models

    return models.load("smollm2-135m-instruct")
