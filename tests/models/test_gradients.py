"""Gradients of the forward, `score`, LoRA adapters and intervention params agree with
central finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample import models
from jaxsample.models import lora
from tests.models.test_kv_cache import random_params

CONFIG = models.ModelConfig(
    model_type="qwen2", vocab_size=17, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=16,
    rope_theta=100.0, qkv_bias=True, eos_token_ids=(0,),
)
# Central differences: the truncation error O(eps^2 f3) scales as measured here (about 1e-5
# absolute at eps = 1e-4, 4e-10 at eps = 1e-6) plus f64 rounding of about 1e-16/eps = 1e-10;
# a wrong term would be off by O(1).
STEP = 1e-6
RTOL = 1e-6


def add_vector(layer, h, params):
    return h + params[layer]


def _directional_check(fn, tree, seed):
    """`⟨∇fn(tree), u⟩` against (fn(tree + εu) − fn(tree − εu)) / 2ε for a random u."""
    # Jitted pieces: run eagerly, every leaf shape would compile its own small programs.
    fn = jax.jit(fn)
    u = jax.jit(_random_direction)(tree, jax.random.key(seed))
    analytic = jax.jit(_tree_vdot)(jax.grad(fn)(tree), u)
    shifted = lambda sign: fn(jax.jit(_shift)(tree, u, sign))  # noqa: E731
    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * STEP)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=RTOL)
    assert abs(float(analytic)) > 1e-3  # a non-trivial direction


def _random_direction(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _shift(tree, u, sign):
    return jax.tree.map(lambda x, d: x + sign * STEP * d, tree, u)


def test_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), random_params(CONFIG, 0))
        lm = models.make_language_model(CONFIG, params)
        tokens = jnp.asarray([[1, 4, 9, 16, 5, 2]])
        completions = jnp.asarray([[3, 7, 11], [2, 2, 5]])
        lengths = jnp.asarray([3, 2])
        prompt = jnp.asarray([6, 1, 8])
        weights = jax.random.normal(jax.random.key(1), (1, 6, CONFIG.vocab_size), jnp.float64)

        # forward, w.r.t. params
        _directional_check(lambda p: jnp.sum(weights * lm.replace(params=p).logits(tokens)), params, 2)
        adapters = lora.init_lora(jax.random.key(4), CONFIG, 2, 4.0, ("q_proj", "v_proj", "down_proj"), jnp.float64)
        adapters = adapters.replace(weights=jax.tree.map(lambda x: x + 0.5, adapters.weights))  # B != 0
        adapted = lm.with_adapters(adapters)
        # score, w.r.t. the whole model (params, adapters, intervention params) at once
        steered = adapted.with_intervention(
            js.Intervention(add_vector, jnp.full((2, CONFIG.hidden_size), 0.1, jnp.float64), (1,), "last")
        )
        _directional_check(lambda model: js.score(model, prompt, completions, lengths).sum(), steered, 6)
