"""Learning twists: a V-way twist head, contrastive twist learning (CTL) and TRI-TSMC.

A twist head reads the frozen model's features at a prefix and returns log ψ of every
candidate next token in one pass; its output layer starts at 0 (ψ = 1, q = p). Both methods
learn from an SIS pass (twisted SMC without resampling) under the current twist:

- **CTL** (Zhao et al. 2024, as in Silent-Zebra/twisted-smc-lm `losses.py`): minimise
  Σ_t KL(σ_t ‖ π^θ_t) with the gradient Σ_t E_{π_t}[∇ log ψ_t] − E_σ[∇ log ψ_t], estimated on
  the SIS particles: positives weighted by softmax(lw_T), negatives at each position t by
  softmax(lw_t); the weights are held out of the gradient (`stop_gradient`). No trust region.
- **TRI-TSMC** (Wang, Yang, Deng, Xu, arXiv 2605.25123). **Reconstruction from the abstract**
  (shared/specs/smc.md §3): (1) SIS under Q_θk gives path log-weights lw = log p + log φ −
  log q_θk; (2) β = `solve_trust_region_beta(lw, ε)`, W̄ = softmax(β lw) (the closed-form
  KL-constrained update Q̃ ∝ Q_k^{1−β} σ^β on the samples); (3) θ ← argmax Σ_i W̄_i log q_θ(X^i)
  by a few optax steps warm-started at θ_k (forward-KL projection onto the twist-induced
  family), with log q_θ(x) = Σ_t [log p + log ψ_θ(x_≤t) − log N_θ(x_<t)] whose normaliser is
  the exact sum over the vocabulary from the V-way head; (4) repeat. The paper's choices of
  ε, iteration counts and amortisation are not in the abstract; ours are documented defaults.

The projection fits the proposal q_θ only: log ψ_θ(x_<t, ·) + c(x_<t) gives the same q for
any c, so the twist's level (which sets intermediate resampling weights, not the final ones)
is not identified by TRI's objective; the final weights p φ / q_θ are.

Features: the frozen model's final-norm hidden state at the prefix's last position
(`lm.feature_size`; for `from_logits_fn` toys the logits), the same in the decode loop
(`record_features`) and in the teacher-forced pass of the learning step.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jaxsample.decoding import check_prompt
from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.lm import LanguageModel
from jaxsample.sampling.proposal import twisted_log_probs
from jaxsample.smc.trust_region import bisect_beta, tempered_log_weights, trust_region_kl
from jaxsample.smc.twisted import LogPotentialFn, LogTwistFn, twisted_smc
from jaxsample.smc.weights import ess, log_evidence
from jaxsample.validation import check_int, check_real

Array = jax.Array
METHODS = ("tri", "ctl")
# One optimizer object (its learning rate lives in the state, traced): no recompilation
# when the learning rate changes.
_ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


def init_adam(params: Any, learning_rate) -> tuple[optax.GradientTransformation, Any]:
    """`(optimizer, state)`: the shared Adam and its state for `params` at `learning_rate`.

    The rate lives in the state, so a jitted fit that takes the optimizer as a static
    argument compiles once for every learning rate. The diffusion twist fit shares it.
    """
    state = _ADAM.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return _ADAM, state


class TwistHead(nn.Module):
    """log ψ [V] from features [D] and the prefix length (one-hot over the S positions).

    Attributes:
      vocab_size: V.
      max_new_tokens: S.
      hidden_size: width of the hidden layer.
    """

    vocab_size: int
    max_new_tokens: int
    hidden_size: int = 64

    @nn.compact
    def __call__(self, features: Array, length: Array) -> Array:
        position = jax.nn.one_hot(jnp.minimum(length, self.max_new_tokens - 1), self.max_new_tokens)
        x = jnp.concatenate([nn.LayerNorm()(features.astype(jnp.float32)), position], axis=-1)
        x = nn.gelu(nn.Dense(self.hidden_size)(x))
        return nn.Dense(self.vocab_size, kernel_init=nn.initializers.zeros)(x)


@functools.lru_cache(maxsize=None)
def twist_head_fn(vocab_size: int, max_new_tokens: int, hidden_size: int = 64) -> LogTwistFn:
    """The `log_twist_fn(params, tokens, length, features)` of a `TwistHead` (one function
    object per configuration, so runs with new parameters reuse compiled programs)."""
    head = TwistHead(vocab_size, max_new_tokens, hidden_size)

    def log_twist_fn(params, tokens, length, features):
        del tokens
        return head.apply(params, features, length)

    return log_twist_fn


def init_twist_head(
    key: Array, lm: LanguageModel, max_new_tokens: int, hidden_size: int = 64
) -> tuple[LogTwistFn, Any]:
    """`(log_twist_fn, params)` of a twist head on `lm`'s features ([`lm.feature_size`]);
    log ψ = 0 at init."""
    head = TwistHead(lm.vocab_size, max_new_tokens, hidden_size)
    params = head.init(key, jnp.zeros((lm.feature_size,), jnp.float32), jnp.int32(0))
    return twist_head_fn(lm.vocab_size, max_new_tokens, hidden_size), params


class Paths(NamedTuple):
    """N sampled paths of P prompts, teacher-forced through the frozen model.

    Attributes:
      tokens: int32 `[P, N, S]` generated tokens (pad after length).
      lengths: int32 `[P, N]`.
      features: f32 `[P, N, S, D]` features before generated position j.
      log_p: f32 `[P, N, S, V]` log p(· | prompt, x_<j).
      log_potential: f32 `[P, N]` log φ of each path.
      pad_token_id: int32 `[P]`, the model's pad id: what a twist sees after each prefix.
    """

    tokens: Array
    lengths: Array
    features: Array
    log_p: Array
    log_potential: Array
    pad_token_id: Array


@jax.jit
def _teacher_forced(lm: LanguageModel, prompt: Array, tokens: Array) -> tuple[Array, Array]:
    num, slots = tokens.shape
    sequences = jnp.concatenate([jnp.broadcast_to(prompt, (num, prompt.shape[0])), tokens], 1)
    logits, features = lm.logits_and_features(sequences)
    window = slice(prompt.shape[0] - 1, prompt.shape[0] - 1 + slots)
    return features[:, window], jax.nn.log_softmax(logits[:, window], axis=-1)


def _twist_values(log_twist_fn, params, paths: Paths) -> Array:
    """log ψ_θ of every candidate at every position, f32 `[P, N, S, V]`.

    At position j the twist sees the prefix x_<j with pad after it, as in the decode loop
    (`Twist`): a twist that reads past `length` must not see the path's future tokens.
    """
    positions = jnp.arange(paths.tokens.shape[-1])

    def per_path(tokens, features, pad):
        prefixes = jnp.where(positions[None, :] < positions[:, None], tokens[None, :], pad)  # [S, S]
        return jax.vmap(log_twist_fn, in_axes=(None, 0, 0, 0))(params, prefixes, positions, features)

    per_prompt = jax.vmap(per_path, in_axes=(0, 0, None))
    return jax.vmap(per_prompt)(paths.tokens, paths.features, paths.pad_token_id).astype(jnp.float32)


def _mask(paths: Paths) -> Array:
    return jnp.arange(paths.tokens.shape[-1]) < paths.lengths[..., None]


def _at_token(values: Array, tokens: Array) -> Array:
    return jnp.take_along_axis(values, tokens[..., None], axis=-1)[..., 0]


def path_log_q(log_twist_fn: LogTwistFn, params: Any, paths: Paths) -> tuple[Array, Array]:
    """Per-token log q_θ and log ψ_θ of the sampled tokens under the twist-induced proposal.

    Returns:
      `(log_q, log_psi)`, f32 `[P, N, S]`, 0 after each path's length. log q_θ(x_j) =
      log p(x_j) + log ψ_θ(x_≤j) − log Σ_v p(v) ψ_θ(x_<j, v): the exact vocabulary sum,
      and log p(x_j) where ψ_θ vanishes on every candidate (the sampler's `twisted_log_probs`).
    """
    log_psi = _twist_values(log_twist_fn, params, paths)
    log_q = _at_token(twisted_log_probs(paths.log_p, log_psi), paths.tokens)
    mask = _mask(paths)
    return jnp.where(mask, log_q, 0.0), jnp.where(mask, _at_token(log_psi, paths.tokens), 0.0)


def path_log_weights(log_twist_fn, params, paths: Paths) -> Array:
    """SIS path log-weights lw = log p(x) + log φ(x) − log q_θ(x), f32 `[P, N]`."""
    log_q, _ = path_log_q(log_twist_fn, params, paths)
    log_p = jnp.where(_mask(paths), _at_token(paths.log_p, paths.tokens), 0.0)
    return jnp.sum(log_p - log_q, axis=-1) + paths.log_potential


def tri_loss(params, log_twist_fn, paths: Paths, weights: Array) -> Array:
    """Weighted negative log-likelihood −Σ_i W̄_i log q_θ(X^i), averaged over prompts.

    Args:
      weights: f32 `[P, N]` tempered path weights (each prompt's row sums to 1).
    """
    log_q, _ = path_log_q(log_twist_fn, params, paths)
    return -jnp.mean(jnp.sum(weights * jnp.sum(log_q, axis=-1), axis=-1))


def ctl_loss(params, log_twist_fn, paths: Paths, frozen_params) -> Array:
    """Contrastive twist loss: Σ_t (E_{π_t}[log ψ_t] − E_σ[log ψ_t]) with SIS weights
    (computed at `frozen_params`, outside the gradient), averaged over prompts."""
    mask = _mask(paths)
    log_q_k, log_psi_k = path_log_q(log_twist_fn, frozen_params, paths)
    log_p = jnp.where(mask, _at_token(paths.log_p, paths.tokens), 0.0)
    running = jnp.cumsum(log_p - log_q_k, axis=-1)
    # Negatives: π_t ∝ p ψ_θ,t at every position, a path's last token included (there the
    # head's ψ stands for φ in the proposal). Positives: σ ∝ p φ, the final SIS weights.
    log_w = jax.lax.stop_gradient(jnp.where(mask, running + log_psi_k, -jnp.inf))
    final = jax.lax.stop_gradient(running[..., -1] + paths.log_potential)
    positive = jax.nn.softmax(final, axis=-1)                       # [P, N]
    alive = jnp.any(mask, axis=-2, keepdims=True)                   # [P, 1, S]
    negative = jnp.where(alive, jax.nn.softmax(jnp.where(alive, log_w, 0.0), axis=-2), 0.0)
    _, log_psi = path_log_q(log_twist_fn, params, paths)

    def expectation(weights):
        # A zero weight drops its term even where ψ = 0 (0 · −inf would be NaN).
        return jnp.sum(jnp.where(weights > 0, weights * log_psi, 0.0), axis=(-2, -1))

    positive_term = expectation(jnp.broadcast_to(positive[..., None], log_psi.shape))
    negative_term = expectation(jnp.where(mask, negative, 0.0))
    return jnp.mean(negative_term - positive_term)


class TwistInfo(NamedTuple):
    """One learning iteration (means over prompts).

    Attributes:
      beta: tempering β (1 for CTL).
      kl: KL(Q̃_β ‖ Q_k) = log N − H(softmax(β lw)) actually spent.
      ess: ESS of the SIS path weights under the current twist (before the update).
      log_z: SIS log Z_hat.
      mean_log_potential: mean log φ of the sampled paths (unweighted: the proposal's quality).
      loss: the method's loss at the last fit step, before its update.
    """

    beta: Array
    kl: Array
    ess: Array
    log_z: Array
    mean_log_potential: Array
    loss: Array


@functools.partial(jax.jit, static_argnames=("log_twist_fn", "method", "num_fit_steps"))
def _update(params, opt_state, paths: Paths, kl_budget, *, log_twist_fn, method, num_fit_steps):
    log_w = path_log_weights(log_twist_fn, params, paths)
    if method == "tri":
        beta = jax.vmap(bisect_beta, in_axes=(0, None))(log_w, kl_budget)
    else:
        beta = jnp.ones(log_w.shape[:1], jnp.float32)
    kl = jax.vmap(trust_region_kl)(log_w, beta)
    weights = jnp.exp(jax.vmap(tempered_log_weights)(log_w, beta))
    frozen = params

    def loss_fn(p):
        if method == "tri":
            return tri_loss(p, log_twist_fn, paths, weights)
        return ctl_loss(p, log_twist_fn, paths, frozen)

    params, opt_state, losses = fit_steps(loss_fn, _ADAM, params, opt_state, num_fit_steps)
    info = TwistInfo(
        beta=jnp.mean(beta), kl=jnp.mean(kl), ess=jnp.mean(jax.vmap(ess)(log_w)),
        log_z=jnp.mean(jax.vmap(log_evidence)(log_w)),
        mean_log_potential=jnp.mean(paths.log_potential), loss=losses[-1],
    )
    return params, opt_state, info


def fit_steps(loss_fn, optimizer: optax.GradientTransformation, params, opt_state, num_steps: int):
    """`num_steps` optimiser steps on `loss_fn(params)` in one `lax.scan`.

    Returns `(params, opt_state, losses [num_steps])`; the twist fits of the autoregressive
    and the diffusion paths share it.
    """

    def fit_step(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, opt_state), losses = jax.lax.scan(fit_step, (params, opt_state), None, num_steps)
    return params, opt_state, losses


def teacher_forced_paths(
    lm: LanguageModel, prompt: Array, tokens: Array, lengths: Array, log_potential: Array
) -> Paths:
    """`Paths` (P = 1) of given sequences: int32 `[T]` prompt, `[N, S]` tokens, `[N]` lengths,
    f32 `[N]` log φ; one batched forward of the frozen model gives features and log p."""
    features, log_p = _teacher_forced(lm, jnp.asarray(prompt, jnp.int32), jnp.asarray(tokens))
    return Paths(jnp.asarray(tokens)[None], jnp.asarray(lengths)[None], features[None],
                 log_p[None], jnp.asarray(log_potential, jnp.float32)[None],
                 jnp.full((1,), lm.pad_token_id, jnp.int32))


def sample_paths(
    key: Array,
    lm: LanguageModel,
    prompts: Sequence[Array],
    potentials: Sequence[LogPotentialFn],
    log_twist_fn: LogTwistFn,
    params: Any,
    *,
    num_particles: int,
    max_new_tokens: int,
) -> Paths:
    """One SIS pass (twisted SMC with κ = 0: no resampling) per prompt, teacher-forced."""
    per_prompt = []
    for index, (prompt, potential) in enumerate(zip(prompts, potentials)):
        result = twisted_smc(
            jax.random.fold_in(key, index), lm, prompt, log_twist_fn, params, potential,
            num_particles=num_particles, max_new_tokens=max_new_tokens, ess_threshold=0.0,
        )
        per_prompt.append(teacher_forced_paths(lm, prompt, result.tokens, result.lengths,
                                               result.rewards))
    return jax.tree.map(lambda *rows: jnp.concatenate(rows), *per_prompt)


def _checkpointer(directory: Optional[Path]):
    if directory is None:
        return None
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        Path(directory).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )


def learn_twist(
    key: Array,
    lm: LanguageModel,
    prompts: Sequence[Array] | Array,
    log_potential_fn: LogPotentialFn | Sequence[LogPotentialFn],
    *,
    method: str = "tri",
    num_iterations: int,
    kl_budget: float = 0.5,
    num_particles: int,
    max_new_tokens: int,
    learning_rate: float = 1e-2,
    num_fit_steps: int = 20,
    log_twist_fn: Optional[LogTwistFn] = None,
    twist_params: Any = None,
    hidden_size: int = 64,
    checkpoint_dir: Optional[str | Path] = None,
    progress: bool = False,
) -> tuple[Any, list[dict]]:
    """Learns a twist for σ ∝ p φ by TRI-TSMC (`method="tri"`) or CTL (`"ctl"`).

    Each iteration: an SIS pass of N particles per prompt under the current twist, then
    `num_fit_steps` Adam steps on the method's loss (see the module docstring; TRI is a
    reconstruction from the paper's abstract).

    Args:
      key: PRNG key; iteration k uses `fold_in(key, k)` (a resumed run repeats the same keys).
      lm: the frozen model.
      prompts: int32 `[T]` prompts (a list, or `[P, T]`); one twist is shared (amortised).
      log_potential_fn: log φ `(tokens [S], length []) -> f32 []`, one for all prompts or a
        sequence with one per prompt (a `Partial` over per-prompt arrays avoids recompiling).
      method: "tri" or "ctl".
      num_iterations: K ≥ 1 outer iterations (in total, counting a resumed run's).
      kl_budget: TRI's ε > 0 per iteration (ignored by CTL).
      num_particles: N paths per prompt and iteration.
      max_new_tokens: S.
      learning_rate: Adam step size.
      num_fit_steps: optimiser steps per iteration.
      log_twist_fn, twist_params: a custom twist and its initial parameters (e.g. a table in
        tests); default a `TwistHead` (`twist_head_fn(lm.vocab_size, S, hidden_size)`) at 0.
      hidden_size: the default head's width.
      checkpoint_dir: orbax checkpoints of params, optimiser state and history after every
        iteration (the last 2 kept); an existing checkpoint is resumed from iteration
        min(latest, num_iterations), an `ArgumentError` when that one is no longer kept.
      progress: tqdm bar over iterations.

    Returns:
      `(twist_params, history)`: history holds one dict per iteration with `iteration`,
      `beta`, `kl`, `ess`, `log_z`, `mean_log_potential`, `loss` (means over prompts) and
      `tokens_decoded`, the tokens the iteration's SIS pass sampled, summed over prompts
      (Σ of the paths' lengths: without resampling this is `twisted_smc`'s `num_decoded`).

    Raises:
      NumericalError: an iteration left NaN statistics or non-finite twist parameters.
    """
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {METHODS}, got {method!r}")
    num_iterations = check_int("num_iterations", num_iterations, 1)
    num_particles = check_int("num_particles", num_particles, 2)
    num_fit_steps = check_int("num_fit_steps", num_fit_steps, 1)
    check_real("kl_budget", kl_budget, "(0, inf)")
    check_real("learning_rate", learning_rate, "(0, inf)")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    checked = []
    for index, prompt in enumerate(prompts):
        try:  # on the ids as given: an int32 cast first would truncate floats, wrap int64s
            checked.append(check_prompt(lm, prompt, max_new_tokens)[0])
        except ArgumentError as error:
            raise ArgumentError(f"prompts[{index}]: {error}") from None
    prompts = checked
    if not prompts:
        raise ArgumentError("prompts must hold at least one prompt")
    potentials = (list(log_potential_fn) if isinstance(log_potential_fn, (list, tuple))
                  else [log_potential_fn] * len(prompts))
    if len(potentials) != len(prompts):
        raise ArgumentError(f"{len(potentials)} potentials given for {len(prompts)} prompts")
    if (log_twist_fn is None) != (twist_params is None):
        raise ArgumentError("give both log_twist_fn and twist_params, or neither")
    if log_twist_fn is None:
        log_twist_fn, twist_params = init_twist_head(
            jax.random.fold_in(key, 2**31 - 1), lm, max_new_tokens, hidden_size)

    _, opt_state = init_adam(twist_params, learning_rate)
    params, history, start = twist_params, [], 0
    manager = _checkpointer(checkpoint_dir)
    if manager is not None and manager.latest_step() is not None:
        import orbax.checkpoint as ocp

        start = min(manager.latest_step(), num_iterations)
        if start not in manager.all_steps():
            # restoring a later step would hand back a twist trained for more iterations
            raise ArgumentError(
                f"checkpoint_dir {checkpoint_dir} holds iterations {sorted(manager.all_steps())}, past "
                f"num_iterations={num_iterations}, but not iteration {num_iterations} itself; use a "
                "new checkpoint_dir or num_iterations ≥ the latest"
            )
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            history=ocp.args.JsonRestore()))
        params, opt_state = restored.state["params"], restored.state["opt_state"]
        history = list(restored.history)

    for iteration in tqdm(range(start, num_iterations), desc=f"learn_twist ({method})",
                          disable=not progress):
        paths = sample_paths(jax.random.fold_in(key, iteration), lm, prompts, potentials,
                             log_twist_fn, params, num_particles=num_particles,
                             max_new_tokens=max_new_tokens)
        params, opt_state, info = _update(
            params, opt_state, paths, jnp.float32(kl_budget), log_twist_fn=log_twist_fn,
            method=method, num_fit_steps=num_fit_steps)
        record = {k: float(v) for k, v in info._asdict().items()}
        if any(v != v for v in record.values()) or not all(
                bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params)):
            raise NumericalError(
                f"learn_twist iteration {iteration}: NaN or infinite twist parameters or statistics "
                f"({record}); a twist that is -inf (ψ = 0) on a path σ weights makes the loss infinite")
        # Paths stop at their stop token, so the cost is the lengths' sum, not N·S.
        history.append({"iteration": iteration, **record,
                        "tokens_decoded": int(jnp.sum(paths.lengths))})
        if manager is not None:
            import orbax.checkpoint as ocp

            manager.save(iteration + 1, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                history=ocp.args.JsonSave(history)))
            manager.wait_until_finished()
    return params, history
