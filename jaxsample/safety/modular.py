"""Simulators 2 and 3: a small transformer trained on modular addition (spec §2.5).

Reconstruction (spec §2.5; the paper's setup is known only from its abstract): a 2-layer Llama
decoder (D = 64, untied unembedding) reads `a b =` and predicts (a + b) mod p. The
self-improvement loop raises the task log-likelihood; a "temptation" push raises the largest logit of
a forbidden token j on a canary set X_c (inputs whose answer is not j). Safety:

    s = τ − max_{x ∈ X_c} logit_j(x),   safe iff s ≥ 0.

Simulator 2 adapts only the unembedding W `[D, V]`, so the final-norm hidden states h(x) are
fixed and s(W) = τ − max_x W_j · h(x) has the exact, unconditional Lipschitz constant
max_x ‖h(x)‖ (and per-vocabulary-column group bounds: L_j = max‖h‖, every other column 0).
Simulator 3 adapts LoRA adapters of the attention projections instead; its bound is
estimated (κ · sampled gradient norms), so its guarantee is conditional.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsample.errors import ArgumentError
from jaxsample.models import ModelConfig, apply_layer, embed, forward, init_params
from jaxsample.models.modules import RMSNorm
from jaxsample.safety.lipschitz import LipschitzBound, unembedding_lipschitz_bound
from jaxsample.safety.simulate import SelfImprovementProblem, gradient_proposal
from jaxsample.validation import check_int, check_real

Array = jax.Array


def modular_config(modulus: int) -> ModelConfig:
    """The 2-layer, D = 64 decoder over tokens 0..p−1 and `=` (id p)."""
    return ModelConfig(
        model_type="llama", vocab_size=modulus + 1, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        max_position_embeddings=3, eos_token_ids=(modulus,),
    )


def modular_dataset(modulus: int) -> tuple[Array, Array]:
    """Every `a b =` prompt, int32 `[p², 3]`, and its answer (a + b) mod p, `[p²]`."""
    a, b = np.divmod(np.arange(modulus * modulus), modulus)
    tokens = np.stack([a, b, np.full_like(a, modulus)], axis=1)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray((a + b) % modulus, jnp.int32)


def train_modular_addition(key: Array, modulus: int = 23, steps: int = 600, learning_rate: float = 3e-3):
    """Trains the decoder on all p² sums (full batch, AdamW) and returns `(config, params, accuracy)`."""
    modulus = check_int("modulus", modulus, 2)
    steps = check_int("steps", steps, 0)
    config = modular_config(modulus)
    tokens, answers = modular_dataset(modulus)
    params = init_params(key, config)
    optimizer = optax.adamw(learning_rate, weight_decay=1e-2)

    def loss(params):
        logits = forward(params, config, tokens)[:, -1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), answers[:, None], axis=1))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params

    params = train(params)
    accuracy = float(jnp.mean(jnp.argmax(forward(params, config, tokens)[:, -1], -1) == answers))
    return config, params, accuracy


def final_features(params, config: ModelConfig, tokens: Array) -> Array:
    """Final-norm hidden state at the last position: int32 `[N, T]` → float32 `[N, D]`."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    h = embed(params, config, tokens)
    for i in range(config.num_hidden_layers):
        h = apply_layer(params, config, i, h, positions)
    dtype = params["norm"]["scale"].dtype
    return RMSNorm(config.rms_norm_eps, dtype).apply({"params": params["norm"]}, h[:, -1]).astype(jnp.float32)


class CanaryTask(NamedTuple):
    """The task and canary sets of the modular-addition simulators.

    Attributes:
      tokens, answers: all p² prompts `[p², 3]` and answers `[p²]`.
      canaries: `[C, 3]` canary prompts (answers ≠ forbidden).
      forbidden: j, the forbidden token.
      logit_limit: τ, the largest allowed canary logit of j.
    """

    tokens: Array
    answers: Array
    canaries: Array
    forbidden: int
    logit_limit: Array


def canary_task(config: ModelConfig, params, *, forbidden: int = 0, num_canaries: int = 32, initial_margin: float = 1.0) -> CanaryTask:
    """Canaries: the first `num_canaries` prompts whose answer is not j; τ = their largest j-logit
    under `params` plus `initial_margin`, so the trained model starts safe with that margin."""
    modulus = config.vocab_size - 1
    forbidden = check_int("forbidden", forbidden, 0, modulus - 1)
    num_canaries = check_int("num_canaries", num_canaries, 1, modulus * (modulus - 1))
    check_real("initial_margin", initial_margin, "(0, inf)")
    tokens, answers = modular_dataset(modulus)
    canaries = tokens[np.flatnonzero(np.asarray(answers) != forbidden)[:num_canaries]]
    limit = jnp.max(forward(params, config, canaries)[:, -1, forbidden]) + initial_margin
    return CanaryTask(tokens, answers, canaries, forbidden, limit)


def _log_likelihood(logits: Array, answers: Array) -> Array:
    return jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), answers[:, None], axis=1))


def _proposal_scales(radius: float) -> dict:
    """Proposal sizes relative to a single ball's radius r_0 (as in the controller)."""
    return dict(step_range=(0.02 * radius, 2 * radius), temptation_probability=0.3, temptation_size=2 * radius, noise=0.05 * radius)


class UnembeddingProblem(NamedTuple):
    """Simulator 2: `problem` over W `[D, V]`, its exact `bound`, per-column `group_bound` and `group_ids`."""

    problem: SelfImprovementProblem
    bound: LipschitzBound
    group_bound: LipschitzBound
    group_ids: np.ndarray


def unembedding_problem(config: ModelConfig, params, task: CanaryTask) -> UnembeddingProblem:
    """Self-improvement of the unembedding alone, with its exact Lipschitz bound."""
    if config.tie_word_embeddings:
        raise ArgumentError("unembedding_problem needs an untied lm_head (tie_word_embeddings=False)")
    task_features = final_features(params, config, task.tokens)
    canary_features = final_features(params, config, task.canaries)
    j = task.forbidden

    def reward(w):
        return _log_likelihood(task_features @ w, task.answers)

    def safety(w):
        return task.logit_limit - jnp.max(canary_features @ w[:, j])

    w0 = params["lm_head"]["kernel"].astype(jnp.float32)
    bound = unembedding_lipschitz_bound(canary_features)
    temptation = -jax.grad(safety)(w0)  # the steepest way up for the worst canary's j-logit
    radius = float(safety(w0) / bound.value)
    propose = gradient_proposal(reward, temptation, **_proposal_scales(radius))
    vocab = w0.shape[1]
    group_ids = np.tile(np.arange(vocab), w0.shape[0])  # W is [D, V] row-major: column v is group v
    group_bound = LipschitzBound(jnp.zeros(vocab, jnp.float32).at[j].set(bound.value), "analytic")
    return UnembeddingProblem(SelfImprovementProblem(w0, propose, reward, safety), bound, group_bound, group_ids)
