"""Qwen2 / Llama decoders in JAX: config, Flax Linen network, KV cache, checkpoints, tokenizer.

    lm = jaxsample.models.load("smollm2-135m-instruct")   # or an HF directory / .gguf file
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    logits = lm.logits(jnp.asarray(ids))
"""

from jaxsample.models.checkpoint import save_pretrained
from jaxsample.models.config import Llama3RopeScaling, ModelConfig
from jaxsample.models.decoder import (
    KVCache,
    apply_layer,
    decode_step,
    embed,
    final_logits,
    forward,
    init_cache,
    init_params,
    prefill,
)
from jaxsample.models.loading import load, make_language_model
from jaxsample.models.registry import register_model, registered_models
from jaxsample.models.tokenizer import Tokenizer

__all__ = [
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "Tokenizer",
    "apply_layer",
    "decode_step",
    "embed",
    "final_logits",
    "forward",
    "init_cache",
    "init_params",
    "load",
    "make_language_model",
    "prefill",
    "register_model",
    "registered_models",
    "save_pretrained",
]
