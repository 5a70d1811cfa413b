"""The reward-tilted power target and the per-particle state SMC carries for it.

Target over complete sequences (ended by a stop token, or truncated at `max_new_tokens`):

    π(y) ∝ p(y)^α · exp(λ r(y)),

with intermediate (prefix-only) targets γ_t(y_{1:t}) = p(y_{1:t})^α · exp(λ r(y_{1:t})): the
difference potential G_t = exp(λ (r_t − r_{t−1})) telescopes to exp(λ r(y)). `r` of the empty
prefix is taken as 0, so γ_0 = 1 and log Z_hat estimates log Σ_y p(y)^α exp(λ r(y)) itself.
A sequence truncated at `max_new_tokens` receives its terminal potential there, like one that
stopped; under top-k / top-p proposals the weights keep the full p, so SMC targets π
restricted to the sequences the proposal can reach.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.tree_util import Partial

from jaxsample.decoding import DecodeState
from jaxsample.errors import ArgumentError
from jaxsample.rows import expand_groups
from jaxsample.validation import check_real

Array = jax.Array
RewardFn = Callable[[Array, Array], Array]


class Particles(NamedTuple):
    """Everything SMC keeps per particle; resampling gathers all of it together.

    Attributes:
      decode: a `DecodeState` with one row per particle: tokens, per-token log p / log q /
        entropy, length, done, KV cache and next-token logits.
      reward: f32 `[N]`, r of each particle's current prefix (0 before the first token).
      log_value: f32 `[N]`, the stored log V_hat of the lookahead target (0 without lookahead
        and once a particle is finished: V = 1 at termination).
    """

    decode: DecodeState
    reward: Array
    log_value: Array


@struct.dataclass
class RewardTarget:
    """π ∝ p^α exp(λ r): α and λ traced; `reward_fn` a `jax.tree_util.Partial`.

    A reward given as `Partial(fn, *arrays)` carries its arrays as traced leaves: a new
    problem's reward (say, another reference answer of the same shape) reuses the compiled
    sampler. A plain function is wrapped in an argument-free `Partial` (static: a new
    function object recompiles).

    Per-prompt rewards (`make_target` with a sequence of P rewards): `reward_fn` is one
    `Partial` whose arrays are stacked `[P, ...]`, and the rows are P groups, prompt-major;
    group p is scored with prompt p's arrays.

    Attributes:
      alpha: α > 0, the exponent on the base model's probability: one for every row, or one
        per prompt `[P]` (the rows P groups, prompt-major: `jaxsample.rows.expand_groups`).
      lam: λ, the reward's inverse temperature (any sign); one, or one per prompt as α.
      reward_fn: `(tokens int32 [S], length int32 []) -> f32 []`, a pure function that scores
        any prefix (tokens after `length` are pad); `None` means r = 0.
    """

    alpha: Array
    lam: Array
    reward_fn: Optional[Partial] = None
    per_prompt: bool = struct.field(pytree_node=False, default=False)

    def reward(self, decode: DecodeState) -> Array:
        """r of every row's current prefix, `[B]` in the dtype of `decode.log_p` (f32 in the
        samplers; the exact float64 checks of `jaxsample.testing` pass float64 traces), 0
        without a reward function."""
        batch = decode.length.shape[0]
        if self.reward_fn is None:
            return jnp.zeros((batch,), decode.log_p.dtype)
        if self.per_prompt:
            num_prompts = jax.tree.leaves(self.reward_fn)[0].shape[0]
            grouped = lambda x: x.reshape(num_prompts, -1, *x.shape[1:])  # noqa: E731
            score_group = lambda fn, tokens, length: jax.vmap(fn)(tokens, length)  # noqa: E731
            reward = jax.vmap(score_group)(
                self.reward_fn, grouped(decode.tokens), grouped(decode.length)).reshape(-1)
        else:
            reward = jax.vmap(self.reward_fn)(decode.tokens, decode.length)
        if jnp.shape(reward) != (batch,):
            raise ArgumentError(
                "reward_fn(tokens [S], length []) must return one scalar per sequence; "
                f"vmapped over {batch} rows it returned shape {jnp.shape(reward)}"
            )
        # Not the reward's own dtype: a float64 reward (under x64) in float32 particles would
        # change the SMC loop carry's type.
        return reward.astype(decode.log_p.dtype)

    def log_potential(self, reward: Array) -> Array:
        """λ r, the log-potential of prefixes with rewards r `[B]`; exactly 0 when λ = 0."""
        lam = expand_groups(self.lam, reward.shape[0])
        return jnp.where(lam == 0, 0.0, lam * reward)

    def log_potential_change(self, old_reward: Array, new_reward: Array) -> Array:
        """λ (r_new − r_old) `[B]`; exactly 0 when λ = 0 (no 0 · inf = NaN for hard constraints)."""
        lam = expand_groups(self.lam, new_reward.shape[0])
        return jnp.where(lam == 0, 0.0, lam * (new_reward - old_reward))

    def log_weight(self, log_p: Array, log_q: Array, start: Array, stop: Array) -> Array:
        """Σ_{start ≤ j < stop} (α log p_j − log q_j) per row, f32 `[B]`.

        Args:
          log_p, log_q: f32 `[B, S]` per-position log-probabilities.
          start, stop: int32 `[B]` generated-position range.
        """
        position = jnp.arange(log_p.shape[-1])
        inside = (position >= start[:, None]) & (position < stop[:, None])
        alpha = expand_groups(self.alpha, log_p.shape[0])[:, None]
        return jnp.sum(jnp.where(inside, alpha * log_p - log_q, 0.0), axis=-1)


def make_target(alpha, lam, reward_fn: Optional[RewardFn] | Sequence[RewardFn]) -> RewardTarget:
    """Validates concrete α, λ and returns the target with float32 leaves.

    `reward_fn` may be one function for every prompt, or a sequence of P, one per prompt of
    a batch (`stack_rewards`)."""
    check_real("alpha", alpha, "(0, inf)")
    check_real("lam", lam, "(-inf, inf)")
    per_prompt = isinstance(reward_fn, (list, tuple))
    if per_prompt:
        reward_fn = stack_rewards(reward_fn)
        per_prompt = bool(jax.tree.leaves(reward_fn))  # argument-free: one reward for all
    elif reward_fn is not None and not callable(reward_fn):
        raise ArgumentError(
            f"reward_fn must be a function (tokens, length) -> float, got {reward_fn!r}"
        )
    if reward_fn is None and not isinstance(lam, jax.core.Tracer) and float(lam) != 0:
        raise ArgumentError(f"lam={float(lam)} has no effect without a reward_fn")
    if reward_fn is not None and not isinstance(reward_fn, Partial):
        reward_fn = Partial(reward_fn)
    return RewardTarget(jnp.asarray(alpha, jnp.float32), jnp.asarray(lam, jnp.float32), reward_fn, per_prompt)


def stack_rewards(reward_fns: Sequence[RewardFn]) -> Partial:
    """One `Partial` whose arrays are the P rewards' arrays stacked `[P, ...]`.

    Each reward must be `jax.tree_util.Partial(fn, *arrays)` of the same `fn` with arrays of
    the same shapes and dtypes (pad per-problem data, such as reference answers, to one
    width), so that one compiled sampler scores every prompt's rows with its own arrays.
    """
    if not reward_fns:
        raise ArgumentError("reward_fn: the sequence of per-prompt rewards is empty")
    for index, fn in enumerate(reward_fns):
        if not isinstance(fn, Partial):
            raise ArgumentError(
                f"reward_fn[{index}] must be a jax.tree_util.Partial(fn, *arrays): per-prompt "
                f"rewards batched together share one fn and differ in their arrays; got {fn!r}")
    first = jax.tree.structure(reward_fns[0])
    first_shapes = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(reward_fns[0])]
    for index, fn in enumerate(reward_fns[1:], 1):
        if jax.tree.structure(fn) != first:
            raise ArgumentError(
                f"reward_fn[{index}] is not a Partial of the same function and arguments as "
                f"reward_fn[0]: {fn.func!r} with {len(fn.args)} arrays against "
                f"{reward_fns[0].func!r} with {len(reward_fns[0].args)}")
        shapes = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(fn)]
        if shapes != first_shapes:
            raise ArgumentError(
                f"reward_fn[{index}]'s arrays have shapes and dtypes {shapes}, reward_fn[0]'s "
                f"{first_shapes}: pad per-prompt arrays to one shape")
    return jax.tree.map(lambda *arrays: jnp.stack(arrays), *reward_fns)
