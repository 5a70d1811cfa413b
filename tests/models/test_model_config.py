"""`ModelConfig.from_hf_dict` / `to_hf_dict`: 4.x and 5.x keys, defaults, rejections."""

import dataclasses

import pytest

from jaxsample.errors import ConfigError
from jaxsample.models import Llama3RopeScaling, ModelConfig

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}
LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_defaults_for_missing_keys():
    config = ModelConfig.from_hf_dict({"model_type": "qwen2", **BASE})
    assert (config.head_dim, config.num_key_value_heads) == (8, 8)
    assert (config.rms_norm_eps, config.rope_theta, config.rope_scaling) == (1e-6, 10000.0, None)
    assert not config.tie_word_embeddings
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, False, False)
    assert config.max_position_embeddings == 32768  # transformers' Qwen2 default
    assert config.eos_token_ids == ()


def test_llama3_scaling_new_and_old_spellings_agree():
    new = ModelConfig.from_hf_dict(
        {"model_type": "llama", **BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}}
    )
    old_type = ModelConfig.from_hf_dict(
        {"model_type": "llama", **BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}}
    )
    old_rope_type = ModelConfig.from_hf_dict(
        {"model_type": "llama", **BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    )
    assert new == old_type == old_rope_type
    assert new.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert new.rope_theta == 5e5


def test_rope_scaling_takes_precedence_as_in_transformers_and_original_context_defaults_to_max_positions():
    # transformers 4.x reads only rope_scaling and 5.x prefers it to rope_parameters
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "llama", **BASE, "max_position_embeddings": 512, "rope_theta": 1.0,
            "rope_scaling": {"rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
            "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
        }
    )
    assert config.rope_theta == 1.0
    assert config.rope_scaling.original_max_position_embeddings == 512
    with pytest.raises(ConfigError, match="'rope_scaling.type' is 'yarn'"):
        ModelConfig.from_hf_dict({
            "model_type": "qwen2", **BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        })


def test_top_level_original_context_is_read_and_must_agree_with_the_rope_block():
    block = {"rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}}
    top_only = {"model_type": "llama", **BASE, "rope_scaling": block, "original_max_position_embeddings": 16}
    assert ModelConfig.from_hf_dict(top_only).rope_scaling.original_max_position_embeddings == 16
    both = {**top_only, "rope_scaling": {**block, "original_max_position_embeddings": 64}}
    with pytest.raises(ConfigError, match="'original_max_position_embeddings' is 16 at the top level but 64 in rope_scaling"):
        ModelConfig.from_hf_dict(both)
    # transformers 4.x never reads rope_parameters: 5.x's top-level priority decides
    five = {"model_type": "llama", **BASE, "original_max_position_embeddings": 16,
            "rope_parameters": {**block, "original_max_position_embeddings": 64}}
    assert ModelConfig.from_hf_dict(five).rope_scaling.original_max_position_embeddings == 16


def test_token_ids_and_biases():
    config = ModelConfig.from_hf_dict(
        {"model_type": "llama", **BASE, "eos_token_id": [5, 6, 7], "bos_token_id": 4, "pad_token_id": None,
         "attention_bias": True, "mlp_bias": True, "head_dim": 16}
    )
    assert config.eos_token_ids == (5, 6, 7) and config.bos_token_id == 4 and config.pad_token_id is None
    assert (config.qkv_bias, config.o_bias, config.mlp_bias, config.head_dim) == (True, True, True, 16)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(model_type="qwen2", vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                    qkv_bias=True, tie_word_embeddings=True, eos_token_ids=(3, 4), pad_token_id=0),
        ModelConfig(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=10, max_position_embeddings=64,
                    rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16),
                    qkv_bias=True, o_bias=True, mlp_bias=True, eos_token_ids=(3,), bos_token_id=1),
    ],
    ids=["qwen2", "llama"],
)
def test_hf_dict_round_trip(config):
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    assert hash(config) == hash(dataclasses.replace(config))


@pytest.mark.parametrize(
    "update, message",
    [
        ({"model_type": "gemma"}, r"'model_type' is 'gemma'"),
        ({"model_type": None}, r"'model_type' is None"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"'rope_scaling.type' is 'dynamic'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"'rope_parameters.rope_type' is 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
         r"'rope_parameters.low_freq_factor' is missing"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, r"per-layer-type"),
        ({"use_sliding_window": True, "max_window_layers": 0}, r"'use_sliding_window' is true and layers 0\.\."),
        ({"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]},
         r"layers 1\.\.1 would slide \(layer_types\)"),
        ({"partial_rotary_factor": 0.5}, r"'partial_rotary_factor'"),
        ({"hidden_act": "gelu"}, r"'hidden_act' is 'gelu'"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers must be a positive integer"),
        ({"num_hidden_layers": 2.5}, r"'num_hidden_layers' must be an integer"),
        ({"eos_token_id": [1, "2"]}, r"'eos_token_id' must be an integer or a list"),
        ({"eos_token_id": 500}, r"eos_token_id 500 is outside the vocabulary"),
        ({"tie_word_embeddings": "yes"}, r"'tie_word_embeddings' must be true or false"),
        ({"head_dim": 7}, r"head_dim must be even"),
        ({"num_attention_heads": 7}, r"'head_dim' is missing and hidden_size 64 is not a multiple of 7"),
    ],
)
def test_rejections_name_the_key(update, message):
    d = {"model_type": "qwen2", **BASE, **update}
    with pytest.raises(ConfigError, match=rf"my/config.json: .*{message}"):
        ModelConfig.from_hf_dict(d, source="my/config.json")


def test_inconsistent_bias_flags_are_rejected():
    fields = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, max_position_embeddings=8)
    with pytest.raises(ConfigError, match="qwen2 always has q/k/v biases"):
        ModelConfig(model_type="qwen2", **fields)
    with pytest.raises(ConfigError, match="attention_bias covers q, k, v and o"):
        ModelConfig(model_type="llama", qkv_bias=True, **fields)
    with pytest.raises(ConfigError, match="high_freq_factor > low_freq_factor"):
        Llama3RopeScaling(8.0, 4.0, 4.0, 16)


def test_published_config_files_parse():
    """config.json of Qwen2.5-0.5B-Instruct and Llama-3.2-1B-Instruct as published (4.x keys)."""
    qwen = ModelConfig.from_hf_dict({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    })
    assert (qwen.head_dim, qwen.num_queries_per_kv, qwen.rope_theta, qwen.eos_token_ids) == (64, 7, 1e6, (151645,))
    llama = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    })
    assert llama.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert (llama.rope_theta, llama.eos_token_ids, llama.qkv_bias) == (5e5, (128001, 128008, 128009), False)
