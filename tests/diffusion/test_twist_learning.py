"""TRI-TSMC over the unmasking path: path reconstruction, the proposal's log q, the trust region."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsample import diffusion as jd
from .test_diffusion import SEQ_LEN, VOCAB, log_potential, tiny_model


def test_paths_and_untwisted_log_q():
    model = tiny_model(num_steps=SEQ_LEN)
    params = jd.init_linear_twist(model)
    result, infos = jd.twisted_diffusion_smc(jax.random.key(3), model, log_potential, num_particles=8,
                                             log_twist_fn=jd.linear_log_twist, twist_params=params,
                                             ess_threshold=0.0, return_infos=True)
    assert not np.any(result.resampled)
    parents, choices = map(np.asarray, jd.reconstruct_paths(model, result.tokens, infos.position))
    assert np.all(parents[0] == model.config.mask_id)
    rows = np.arange(8)
    for t in range(SEQ_LEN):
        child = parents[t + 1] if t + 1 < SEQ_LEN else np.asarray(result.tokens)
        expected = parents[t].copy()
        expected[rows, choices[t] // VOCAB] = choices[t] % VOCAB
        np.testing.assert_array_equal(expected, child)
    # With ψ ≡ 1 the twisted steps propose from the model: log q = Σ_t log(1/#masked) + log p(v | x_t).
    paths = jd.UnmaskingPaths(jnp.asarray(parents), jnp.asarray(choices), result.log_weights, result.log_weights)
    log_p = np.asarray(model.log_probs(jnp.asarray(parents)))
    direct = sum(-np.log(SEQ_LEN - t) + log_p[t, rows, choices[t] // VOCAB, choices[t] % VOCAB]
                 for t in range(SEQ_LEN - 1))
    np.testing.assert_allclose(jd.twist_learning.path_log_q(model, jd.linear_log_twist, params, paths), direct,
                               rtol=1e-5, atol=1e-5)


def test_tri_iteration_spends_the_kl_budget():
    model = tiny_model(num_steps=SEQ_LEN)
    params = jd.init_linear_twist(model)
    optimizer = optax.adam(1e-2)
    budget = 0.02
    new_params, _, info = jd.tri_iteration(jax.random.key(4), model, log_potential, params, optimizer.init(params),
                                           log_twist_fn=jd.linear_log_twist, optimizer=optimizer,
                                           kl_budget=budget, num_particles=32, num_fit_steps=3)
    assert 0 < float(info.beta) < 1
    assert abs(float(info.kl) - budget) < 1e-4
    assert float(jnp.abs(new_params["w"]).max()) > 0


def test_a_new_learning_rate_does_not_recompile_the_fit():
    model = tiny_model(num_steps=SEQ_LEN)

    def learn(learning_rate):
        params, _ = jd.learn_diffusion_twist(jax.random.key(5), model, log_potential, num_iterations=1,
                                             num_particles=8, num_fit_steps=2, learning_rate=learning_rate)
        return params

    slow = learn(1e-2)
    compiled = jd.twist_learning._fit._cache_size()
    fast = learn(2e-2)
    assert jd.twist_learning._fit._cache_size() == compiled
    assert not np.allclose(slow["w"], fast["w"])  # the rate is used


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(num_steps=2)
    loaded = jd.load(jd.save(tmp_path / "m", model))
    assert loaded.config == model.config
    tokens = jnp.array([[0, 3, 2, 3]])
    np.testing.assert_array_equal(loaded.log_probs(tokens), model.log_probs(tokens))


def test_shipped_toy_diffusion_loads():
    model = jd.load("toy-diffusion")
    problem = jd.load_problem("toy-diffusion")
    assert model.config.seq_len == problem.correct_trace.shape[0] == model.config.num_steps
    assert model.config.vocab_size == 13
    assert model.log_probs(jnp.full((1, model.config.seq_len), model.config.mask_id)).shape == (1, 8, 13)
