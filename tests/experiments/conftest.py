import jax
import pytest

from jaxsample import models
from jaxsample.models.registry import resolve


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory):
    """A tiny random decoder with SmolLM2's tokenizer and chat template, saved as a checkpoint:
    the real-model experiment paths at a size CI can run."""
    tokenizer = models.Tokenizer.from_gguf(resolve("smollm2-135m-instruct"))
    config = models.ModelConfig.from_hf_dict({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tokenizer),
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 96, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    })
    path = tmp_path_factory.mktemp("tiny-smollm2-tokenizer")
    models.save_pretrained(models.init_params(jax.random.key(0), config), config, path, tokenizer=tokenizer)
    return path
