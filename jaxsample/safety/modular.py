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

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsample.errors import ArgumentError
from jaxsample.models import ModelConfig, forward, init_params, make_language_model
from jaxsample.models.lora import init_lora
from jaxsample.safety.lipschitz import LipschitzBound, sampled_lipschitz_bound, unembedding_lipschitz_bound
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


def final_features(config: ModelConfig, params, tokens: Array) -> Array:
    """Final-norm hidden state at the last position: int32 `[N, T]` → float32 `[N, D]`."""
    return make_language_model(config, params).features(tokens)[:, -1]


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
    task_features = final_features(config, params, task.tokens)
    canary_features = final_features(config, params, task.canaries)
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


class LoraProblem(NamedTuple):
    """Simulator 3: `problem` over LoRA weights (`LoraAdapters.weights`), `size` parameters, and
    `bound_fn(kappa)`, the estimated (conditional) local bound at a centre."""

    problem: SelfImprovementProblem
    size: int
    bound_fn: Callable


LORA_REWARD_PROMPTS = 128  # lora_problem's default reward subset (of the p² prompts)


def lora_problem(
    key: Array,
    config: ModelConfig,
    params,
    task: CanaryTask,
    rank: int = 2,
    *,
    probe_radius: float = 0.05,
    num_probes: int = 8,
    reward_prompts: int = LORA_REWARD_PROMPTS,
) -> LoraProblem:
    """Self-improvement of LoRA adapters on q_proj and v_proj (B starts at 0: θ_0 is the base model).

    The reward is the log-likelihood on a fixed random subset of `reward_prompts` prompts (the
    full forward per step is the loop's cost; the unembedding simulator uses every prompt).

    The bound is κ · max ‖∇s‖ over the centre and `num_probes` points within `probe_radius`
    (`sampled_lipschitz_bound`): s is not piecewise linear in the adapters, so no analytic
    constant is used and the chain's guarantee is conditional on the estimate.
    """
    rank = check_int("rank", rank, 1)
    check_real("probe_radius", probe_radius, "(0, inf)")
    reward_prompts = check_int("reward_prompts", reward_prompts, 1, task.tokens.shape[0])
    lora_key, probe_key, subset_key = jax.random.split(key, 3)
    subset = jax.random.choice(subset_key, task.tokens.shape[0], (reward_prompts,), replace=False)
    reward_tokens, reward_answers = task.tokens[subset], task.answers[subset]
    adapters = init_lora(lora_key, config, rank=rank, alpha=2.0 * rank)
    lm = make_language_model(config, params)
    j = task.forbidden

    def logits(weights, tokens):
        return lm.with_adapters(adapters.replace(weights=weights)).logits(tokens)[:, -1]

    def reward(weights):
        return _log_likelihood(logits(weights, reward_tokens), reward_answers)

    def safety(weights):
        return task.logit_limit - jnp.max(logits(weights, task.canaries)[:, j])

    w0 = jax.tree.map(lambda x: x.astype(jnp.float32), adapters.weights)
    size = sum(x.size for x in jax.tree.leaves(w0))

    def bound_fn(kappa: float) -> Callable:
        return sampled_lipschitz_bound(safety, probe_key, w0, probe_radius, num_probes, kappa)

    # The scale of proposals: r_0 from the κ = 1 estimate at θ_0.
    radius = float(safety(w0) / bound_fn(1.0)(w0).value)
    temptation = jax.tree.map(jnp.negative, jax.grad(safety)(w0))
    propose = gradient_proposal(reward, temptation, **_proposal_scales(radius))
    return LoraProblem(SelfImprovementProblem(w0, propose, reward, safety), size, bound_fn)
