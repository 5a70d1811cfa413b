"""The samplers under `JAX_ENABLE_X64=1`: they run, and a key gives the same draws as without x64.

x64 is process-wide and fixed at import, so one subprocess runs every x64 check and prints
its draws; this process (x64 off) recomputes them for the comparison.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample import testing
from jaxsample.diffusion.sampler import choose_positions
from jaxsample.models import ModelConfig, init_params, make_language_model
from jaxsample.sampling import categorical
from jaxsample.smc.resampling import multinomial

CONFIG = ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                     max_position_embeddings=16, qkv_bias=True, eos_token_ids=(15,))
LOGITS = np.log([0.1, 0.2, 0.3, 0.4]).astype(np.float32)


def tabular():
    return testing.random_tabular_lm(4, 4, seed=0), jnp.array([0])


def draws():
    """`{name: int list}`: `categorical` over 16 keys, a resampler's and the diffusion
    sampler's draws and `generate`'s tokens on the tabular toy."""
    key = jax.random.key(0)
    lm, prompt = tabular()
    out = {
        "categorical": jax.vmap(categorical, (0, None))(jax.random.split(key, 16), jnp.asarray(LOGITS)),
        "multinomial": multinomial(key, np.exp(LOGITS), 16),
        "choose_positions": choose_positions(key, jnp.ones((4, 8), bool), 3),
        "generate": js.generate(key, lm, prompt, 4, num_samples=4).tokens,
    }
    return {name: np.asarray(value).tolist() for name, value in out.items()}


def run_x64():
    """The subprocess: generate and SMC (float64 reward, rejuvenation) on a Flax model, the
    resampler on float64 weights, then the draws as JSON."""
    assert jax.config.jax_enable_x64
    key = jax.random.key(0)

    def reward(tokens, length):  # float64 under x64, as `testing.random_reward` is
        return 0.1 * jnp.sum(jnp.where(jnp.arange(tokens.shape[0]) < length, tokens, 0)).astype(jnp.float64)

    # 3x the init scale: the default 0.02-scale init gives near-uniform logits.
    flax_lm = make_language_model(CONFIG, jax.tree.map(lambda x: 3.0 * x, init_params(jax.random.key(0), CONFIG)))
    flax_prompt = jnp.array([1, 2, 3])
    # every sampler decodes through the same step (power_sample and best_of_n crashed with generate)
    js.generate(key, flax_lm, flax_prompt, 4, num_samples=4)
    result = js.smc_decode(key, flax_lm, flax_prompt, reward, num_particles=4, max_new_tokens=4, alpha=2.0, lam=1.0,
                           block_size=2, num_rejuvenation_steps=1)
    assert result.tokens.shape == (4, 4)
    # float64 weights below float32's range reach the resampler traced, as float64.
    ancestors = jax.jit(lambda k, w: multinomial(k, w, 8))(key, np.exp([-200.0, -199.0, -np.inf]))
    assert np.asarray(ancestors).max() < 2, ancestors  # not the identity fallback
    print(json.dumps(draws()))


def test_samplers_run_and_draw_the_same_under_x64():
    env = dict(os.environ, JAX_ENABLE_X64="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_x64; test_x64.run_x64()"
    child = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = draws()  # while the subprocess runs
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.splitlines()[-1]) == expected
