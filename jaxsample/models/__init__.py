"""Qwen2 / Llama decoders in JAX: config, Flax Linen network, KV cache, checkpoints, tokenizer.

    lm = jaxsample.models.load("smollm2-135m-instruct")   # or an HF directory / .gguf file
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    logits = lm.logits(jnp.asarray(ids))
"""

from jaxsample.models import lora
from jaxsample.models.checkpoint import save_pretrained
from jaxsample.models.config import Llama3RopeScaling, ModelConfig
from jaxsample.models.decoder import (
    DecodeStep,
    KVCache,
    LayerFunctions,
    apply_layer,
    decode_step,
    default_mlp_chunks,
    embed,
    final_logits,
    final_norm,
    forward,
    init_cache,
    init_params,
    prefill,
    unembed,
)
from jaxsample.models.intervention import Intervention
from jaxsample.models.layout import stack_layers, unstack_layers
from jaxsample.models.lora import LoraAdapters, init_lora, load_adapters, merge, save_adapters
from jaxsample.models.loading import load, make_language_model
from jaxsample.models.registry import register_model, registered_models
from jaxsample.models.tokenizer import Tokenizer

__all__ = [
    "DecodeStep",
    "Intervention",
    "KVCache",
    "LayerFunctions",
    "Llama3RopeScaling",
    "LoraAdapters",
    "ModelConfig",
    "Tokenizer",
    "apply_layer",
    "decode_step",
    "default_mlp_chunks",
    "embed",
    "final_logits",
    "final_norm",
    "forward",
    "init_cache",
    "init_lora",
    "init_params",
    "load",
    "load_adapters",
    "lora",
    "make_language_model",
    "merge",
    "prefill",
    "register_model",
    "registered_models",
    "save_adapters",
    "save_pretrained",
    "stack_layers",
    "unembed",
    "unstack_layers",
]
