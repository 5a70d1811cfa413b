"""Tiny randomly initialised Flax decoders on the sorting task's vocabulary, for trainer tests."""

import jax
import jax.numpy as jnp

from jaxsample.models import ModelConfig, init_params, make_language_model
from jaxsample.tasks import sorting


def tiny_config(hidden_size=16, layers=1):
    return ModelConfig(
        model_type="llama", vocab_size=sorting.VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        max_position_embeddings=32, eos_token_ids=(sorting.EOS,), pad_token_id=sorting.PAD,
    )


def tiny_model(seed=0, dtype=jnp.float32, **kwargs):
    config = tiny_config(**kwargs)
    return make_language_model(config, init_params(jax.random.key(seed), config, dtype), name=f"tiny-{seed}")
