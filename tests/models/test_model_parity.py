"""Logit parity with transformers' PyTorch Qwen2 / Llama on random tiny checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from jaxsample import models
from jaxsample.models.modules import rope_inverse_frequencies

# Tiny f32 models: observed |Δ| is ~1e-6; 1e-4 leaves room for summation-order differences
# between XLA and ATen while still catching any wrong term (those move logits by ≳ 1e-2).
ATOL = 1e-4
VOCAB = 97


def _llama3_rope(theta, factor, low, high, original):
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _to_4x_style(d):
    """Rewrites a 5.x config.json the way transformers 4.x files spell it."""
    d = dict(d)
    rope = d.pop("rope_parameters")
    for key in ("head_dim", "num_key_value_heads", "rms_norm_eps", "dtype"):
        d.pop(key)
    d["torch_dtype"] = "float32"
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    return d


# name: (transformers config, sequence length, config.json rewrite)
CASES = {
    "qwen2_untied_gqa": (
        Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=3,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        40,
        None,
    ),
    # use_sliding_window with a window of 8 < T, but no layer at or past max_window_layers:
    # transformers attends fully in every layer, and the port must accept it as such.
    "qwen2_tied_g3": (
        Qwen2Config(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=[3, 5],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            use_sliding_window=True, sliding_window=8, max_window_layers=2, hidden_act="swish",
        ),
        40,
        None,
    ),
    # theta 100 and O = 64 make the llama3 remap change most frequencies; T = 300 covers
    # positions past 256 (where bf16 angles would already be wrong) within max_pos 320.
    "llama3_head_dim": (
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=320,
            rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=3,
            rope_parameters=_llama3_rope(100.0, 8.0, 1.0, 4.0, 64),
        ),
        300,
        None,
    ),
    # Hand-written 4.x keys (rope_theta + rope_scaling.type, no head_dim / kv heads / eps),
    # with Llama's optional attention and MLP biases.
    "llama_4x_style_biases": (
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=96,
            rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
            eos_token_id=3, rope_parameters=_llama3_rope(500.0, 4.0, 1.0, 2.0, 32),
        ),
        80,
        _to_4x_style,
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, hf_checkpoint, reference_logits):
    name = request.param
    hf_config, length, rewrite = CASES[name]
    directory = hf_checkpoint(name, hf_config, seed=len(name), rewrite=rewrite)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, length))
    return name, directory, tokens, reference_logits(directory, tokens)


def test_logits_match_transformers(case):
    name, directory, tokens, expected = case
    lm = models.load(directory)
    logits = np.asarray(lm.logits(jnp.asarray(tokens)))
    # A fixture with near-constant logits would make the comparison vacuous.
    assert expected.std() > 1.0, f"{name}: reference logit std {expected.std():.2f}"
    delta = np.abs(logits - expected).max()
    log_p_delta = np.abs(jax.nn.log_softmax(logits) - jax.nn.log_softmax(expected)).max()
    print(f"\n{name}: max|Δlogit| = {delta:.2e}, max|Δlog p| = {log_p_delta:.2e}, std {expected.std():.2f}")
    assert delta <= ATOL
    assert log_p_delta <= ATOL


def test_config_parsing_matches_transformers(case):
    name, directory, _, _ = case
    config = models.load(directory).config
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    expected_inv_freq = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inverse_frequencies(config), expected_inv_freq, rtol=1e-6)
    attention = hf.model.layers[0].self_attn
    assert config.head_dim == attention.head_dim
    assert config.num_key_value_heads == hf.config.num_key_value_heads
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    if name.startswith("llama3"):
        # The fixture only tests the remap if it moves most frequencies.
        plain = rope_inverse_frequencies(
            models.ModelConfig(**{**config.__dict__, "rope_scaling": None})
        )
        assert np.mean(~np.isclose(plain, expected_inv_freq)) > 0.5


@pytest.mark.parametrize("name", ["qwen2_tied_g3", "llama3_head_dim"])
def test_save_pretrained_round_trip(name, hf_checkpoint, reference_logits, tmp_path):
    hf_config, length, rewrite = CASES[name]
    source = models.load(hf_checkpoint(name, hf_config, seed=len(name), rewrite=rewrite))
    models.save_pretrained(source.params, source.config, tmp_path)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, min(length, 64)))

    np.testing.assert_allclose(
        reference_logits(tmp_path, tokens), source.logits(jnp.asarray(tokens)), atol=ATOL, rtol=0
    )
    reloaded = models.load(tmp_path)
    assert reloaded.config == source.config
    assert reloaded.eos_token_ids == source.eos_token_ids
    identical = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), reloaded.params, source.params)
    assert all(jax.tree.leaves(identical))
