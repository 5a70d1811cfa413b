"""Greedy `js.generate` against transformers' greedy `generate` on the random tiny checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models, testing

from .test_model_parity import CASES, VOCAB

NEW_TOKENS = 24


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "qwen2_tied_g3", "llama3_head_dim"])
def test_greedy_generate_matches_transformers(name, hf_checkpoint):
    hf_config, _, rewrite = CASES[name]
    directory = hf_checkpoint(name, hf_config, seed=len(name), rewrite=rewrite)
    lm = models.load(directory)
    reference = testing.transformers_model(directory)
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(0, VOCAB, size=7 + 5 * seed)
        ours = js.generate(jax.random.key(seed), lm, jnp.asarray(prompt), NEW_TOKENS, top_k=1)
        theirs = testing.transformers_greedy(reference, prompt, NEW_TOKENS, lm.pad_token_id, lm.eos_token_ids)
        n = int(ours.lengths[0])
        assert n == len(theirs), (name, seed)
        np.testing.assert_array_equal(np.asarray(ours.tokens[0, :n]), theirs)
