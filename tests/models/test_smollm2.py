"""The real SmolLM2-135M-Instruct GGUF against transformers' GGUF loader, and a greedy smoke test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample import models, testing
from jaxsample.models.registry import resolve

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant who answers questions about geography, "
                                  "citing rivers, seas and mountain ranges by their English names."},
    {"role": "user", "content": "Name three rivers that flow through Europe, say which sea each one reaches, "
                                "and list two capital cities that lie on the banks of each river."},
]


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM from the same GGUF (dequantized f32 weights)."""
    path = resolve("smollm2-135m-instruct")
    return testing.transformers_model(path.parent, gguf_file=path.name)


def test_config_from_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.rope_theta, c.rope_scaling, c.tie_word_embeddings) == (100000.0, None, True)
    assert smollm2.eos_token_ids == (2,) and smollm2.pad_token_id == 2
    assert "lm_head" not in smollm2.params


def test_logits_match_transformers_gguf(smollm2, reference):
    ids = smollm2.tokenizer.apply_chat_template(MESSAGES)
    assert len(ids) >= 64
    tokens = np.asarray(ids[:64])[None]
    expected = testing.transformers_logits(reference, tokens)
    delta = np.abs(np.asarray(smollm2.logits(jnp.asarray(tokens))) - expected).max()
    print(f"\nSmolLM2-135M GGUF, 64 tokens: max|Δlogit| = {delta:.2e} (logit std {expected.std():.1f})")
    # f32 on both sides over 30 layers: observed ~1e-4 (the spec's NumPy port: 9.2e-5).
    assert delta <= 1e-3


def test_greedy_answer(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert len(ids) == 37 and ids[:3] == [1, 9690, 198]  # <|im_start|>system\n (default system prompt)
    logits, cache = smollm2.prefill(jnp.asarray([ids]), jnp.asarray([len(ids)]), smollm2.init_cache(1, 64))
    answer = []
    while len(answer) < 16:
        token = int(jnp.argmax(logits[0]))
        answer.append(token)
        if token in smollm2.eos_token_ids:
            break
        logits, cache = smollm2.decode(jnp.asarray([token]), cache)
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"


def test_tokenizer_round_trips_and_saves(smollm2, tmp_path):
    tokenizer = smollm2.tokenizer
    text = "Power sampling: α-sharpened traces, λ = 0.5 — naïve café ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.pad_token_id) == (1, (2,), 2)

    # A tiny random model with SmolLM2's vocabulary: the tokenizer travels with save_pretrained.
    config = models.ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_ids=(2,),
    )
    models.save_pretrained(models.init_params(jax.random.key(0), config), config, tmp_path, tokenizer)
    reloaded = models.load(tmp_path).tokenizer
    assert reloaded.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)
    assert reloaded.encode(text) == tokenizer.encode(text)


def test_greedy_generate_matches_transformers_for_32_tokens(smollm2, reference):
    import jaxsample as js

    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
    ours = js.generate(jax.random.key(0), smollm2, jnp.asarray(ids), 32, top_k=1)
    theirs = testing.transformers_greedy(reference, ids, 32, smollm2.pad_token_id)
    n = int(ours.lengths[0])
    assert n == len(theirs)
    np.testing.assert_array_equal(np.asarray(ours.tokens[0, :n]), theirs)
