"""LoRA adapters: unmerged forward/decode, merge, and the peft layout checked against peft."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import jaxsample as js
from jaxsample import models
from jaxsample.errors import ArgumentError, CheckpointError, ConfigError
from jaxsample.models import lora
from tests.models.test_kv_cache import ATOL, CONFIG, random_params

# transformers vs the port on tiny f32 models (see test_model_parity).
PEFT_ATOL = 1e-4

QWEN2 = Qwen2Config(
    vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=3,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def trained(adapters, seed, scale=0.3):
    """`adapters` with every A and B redrawn, as if trained (init has B = 0)."""
    leaves, treedef = jax.tree.flatten(adapters.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    redrawn = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return adapters.replace(weights=jax.tree.unflatten(treedef, redrawn))


@pytest.fixture(scope="module")
def lm():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def test_fresh_adapters_leave_the_model_unchanged(lm):
    adapters = lora.init_lora(jax.random.key(0), CONFIG, rank=4, alpha=8.0, targets=lora.TARGETS)
    assert float(jnp.abs(adapters.weights["q_proj"]["lora_A"]).max()) > 0
    tokens = jnp.asarray([[1, 5, 9, 2, 7]], jnp.int32)
    # B = 0 adds exact zeros; only XLA's different fusion of the two programs moves logits
    np.testing.assert_allclose(lm.with_adapters(adapters).logits(tokens), lm.logits(tokens), atol=ATOL)


def test_unmerged_adapters_equal_merged_params_in_forward_and_decoding(lm):
    adapters = trained(lora.init_lora(jax.random.key(1), CONFIG, 3, 6.0, ("q_proj", "o_proj", "up_proj", "down_proj")), 2)
    adapted = lm.with_adapters(adapters)
    merged = models.make_language_model(CONFIG, lora.merge(lm.params, adapters))
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 11, 3]], jnp.int32)
    assert not np.allclose(adapted.logits(tokens), lm.logits(tokens), atol=1e-2)
    np.testing.assert_allclose(adapted.logits(tokens), merged.logits(tokens), atol=ATOL)
    prompt = jnp.asarray([4, 8, 15], jnp.int32)
    result = js.generate(jax.random.key(3), adapted, prompt, 8, num_samples=4)
    np.testing.assert_allclose(js.score(merged, prompt, result.tokens, result.lengths), result.log_p, atol=ATOL)
    hidden = adapted.hidden_states(tokens)
    h = adapted.embed(tokens)
    for i in range(CONFIG.num_hidden_layers):
        h = adapted.apply_layer(i, h)
    np.testing.assert_allclose(hidden[-1], h, atol=ATOL)


def test_peft_loads_saved_adapters_and_gives_the_same_logits(hf_checkpoint, tmp_path):
    from peft import PeftModel

    directory = hf_checkpoint("qwen2_lora", QWEN2, seed=4)
    lm = js.load(directory)
    adapters = trained(lora.init_lora(jax.random.key(5), lm.config, rank=4, alpha=12.0, targets=lora.TARGETS), 6)
    lora.save_adapters(tmp_path / "adapter", adapters)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 12.0

    tokens = np.random.default_rng(0).integers(0, QWEN2.vocab_size, (2, 11))
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(lm.with_adapters(adapters).logits(jnp.asarray(tokens)))
    assert np.abs(expected - np.asarray(lm.logits(jnp.asarray(tokens)))).max() > 0.1  # adapters matter
    np.testing.assert_allclose(got, expected, atol=PEFT_ATOL, rtol=0)

    loaded = lora.load_adapters(tmp_path / "adapter", lm.config)
    assert (loaded.rank, loaded.alpha, loaded.targets) == (4, 12.0, lora.TARGETS)
    jax.tree.map(np.testing.assert_array_equal, loaded.weights, adapters.weights)

    # and peft's own save loads back here
    peft_model.save_pretrained(tmp_path / "from_peft")
    from_peft = lora.load_adapters(tmp_path / "from_peft", lm.config)
    jax.tree.map(np.testing.assert_array_equal, from_peft.weights, adapters.weights)


def test_adapters_fit_a_model_that_differs_only_in_special_token_ids(lm):
    """`load(ckpt, pad_token_id=...)` or `eos_token_ids=...` keeps the architecture, and
    adapters built on the plain `load(ckpt)` must still apply."""
    adapters = trained(lora.init_lora(jax.random.key(4), CONFIG, 2, 4.0), 5)
    retokened = dataclasses.replace(CONFIG, pad_token_id=1, bos_token_id=2, eos_token_ids=(0, 4))
    other = models.make_language_model(retokened, lm.params)
    tokens = jnp.asarray([[1, 5, 9, 2]], jnp.int32)
    np.testing.assert_array_equal(
        other.with_adapters(adapters).logits(tokens), lm.with_adapters(adapters).logits(tokens)
    )
    rebuilt = lora.init_lora(jax.random.key(4), retokened, 2, 4.0)
    lm.with_adapters(rebuilt)  # and the other way round


def test_bad_adapters_are_rejected(lm, tmp_path):
    key = jax.random.key(0)
    with pytest.raises(ArgumentError, match="unknown LoRA target 'x_proj'"):
        lora.init_lora(key, CONFIG, 4, 8.0, ("q_proj", "x_proj"))
    with pytest.raises(ArgumentError, match="rank must be a positive int, got 0"):
        lora.init_lora(key, CONFIG, 0, 8.0)
    with pytest.raises(ArgumentError, match="alpha must be a positive"):
        lora.init_lora(key, CONFIG, 2, -1.0)
    other = dataclasses.replace(CONFIG, hidden_size=24, head_dim=6)
    with pytest.raises(
        ArgumentError,
        match=r"another model config: hidden_size 24 \(adapters\) vs 32 \(model\), "
        r"head_dim 6 \(adapters\) vs 12 \(model\)$",
    ):
        lm.with_adapters(lora.init_lora(key, other, 2, 4.0))
    with pytest.raises(ArgumentError, match="built for another model config"):
        lm.replace(adapters=lora.init_lora(key, other, 2, 4.0)).logits(jnp.asarray([1, 2]))
    toy = js.LanguageModel.from_logits_fn(lambda t: jnp.zeros((t.shape[0], 4)), 4, 3, max_length=8)
    with pytest.raises(ArgumentError, match="wrapped logits function"):
        toy.with_adapters(lora.init_lora(key, CONFIG, 2, 4.0))

    adapters = lora.init_lora(key, CONFIG, 2, 4.0)
    lora.save_adapters(tmp_path / "a", adapters)
    with pytest.raises(CheckpointError, match="missing"):
        lora.load_adapters(tmp_path / "a", dataclasses.replace(CONFIG, num_hidden_layers=4))
    with pytest.raises(CheckpointError, match="has shape"):
        lora.load_adapters(tmp_path / "a", other)
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=True is not supported"):
        lora.load_adapters(tmp_path / "a", CONFIG)
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False, "target_modules": ["c_attn"]}))
    with pytest.raises(ConfigError, match="unknown LoRA target 'c_attn'"):
        lora.load_adapters(tmp_path / "a", CONFIG)
    with pytest.raises(CheckpointError, match="not a peft LoRA adapter directory"):
        lora.load_adapters(tmp_path / "missing", CONFIG)
