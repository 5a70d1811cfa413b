"""`smc_decode`: reward-guided SMC decoding of one prompt, or a batch of them, end to end."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsample import parallel
from jaxsample.decoding import check_per_prompt, first_non_finite, prompts_and_keys, raise_on_non_finite, split_keys
from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.lm import LanguageModel
from jaxsample.mcmc import uniform
from jaxsample.progress import progress_bar, report
from jaxsample.sampling import Proposal
from jaxsample.smc.kernel import build_kernel, init
from jaxsample.smc.lookahead import LookaheadSpec, check_lookahead, finished
from jaxsample.smc.resampling import Resampler
from jaxsample.smc.target import RewardFn, RewardTarget, make_target
from jaxsample.smc.weights import log_evidence, normalize_log_weights
from jaxsample.validation import check_int, check_real

Array = jax.Array


class SMCResult(NamedTuple):
    """The weighted particles of one SMC run (N particles, S = max_new_tokens, K steps run).

    Attributes:
      tokens: int32 `[N, S]`; the pad id after a particle's stop token.
      lengths: int32 `[N]` generated tokens, a final stop token included.
      done: bool `[N]` ended with a stop token (else truncated at S).
      rewards: f32 `[N]` r of each final sequence (0 without a reward function).
      log_weights: f32 `[N]` normalised log-weights (log W, LSE = 0); estimates under π are
        Σ_i W_i f(y_i). All `-inf` when every weight is zero.
      log_z: f32 `[]` log Z_hat, an unbiased estimate of Z = Σ_y p(y)^α exp(λ r(y)) on the
        exponential scale (biased low in log space); `-inf` when every weight is zero.
      sample_index: int32 `[]` one particle drawn ∝ W: the sampler's single output.
      ess: f32 `[K]` ESS after each step's reweighting (before resampling).
      num_unique: int32 `[K]` distinct ancestors at each step (N when not resampled).
      resampled: bool `[K]`.
      acceptance_rate: f32 `[K]` rejuvenation acceptance rate (NaN where no move ran).
      log_z_history: f32 `[K]` log Z_hat after each step.
      num_decoded: int `[]` tokens sampled: extension, lookahead rollouts and rejuvenation
        proposals (the compute to match against best-of-n).
      all_zero: bool, every weight became zero (a target with no mass on the particles).
    """

    tokens: Array
    lengths: Array
    done: Array
    rewards: Array
    log_weights: Array
    log_z: Array
    sample_index: Array
    ess: Array
    num_unique: Array
    resampled: Array
    acceptance_rate: Array
    log_z_history: Array
    num_decoded: Array
    all_zero: Array

    @property
    def sample(self) -> Array:
        """int32 `[S]` tokens of the particle drawn ∝ W."""
        return self.tokens[self.sample_index]


@partial(
    jax.jit,
    static_argnames=(
        "num_particles", "max_new_tokens", "block_size", "resampler",
        "num_rejuvenation_steps", "lookahead", "progress", "mesh",
    ),
)
def _run(
    keys, lm, prompts, prompt_lengths, target: RewardTarget, proposal: Proposal, ess_threshold,
    conditional_sample=None, *,
    num_particles, max_new_tokens, block_size, resampler, num_rejuvenation_steps, lookahead,
    progress, mesh=None,
):
    """P independent SMC runs in one loop, one per key (`prompts` `[T]` for P = 1, else
    `[P, T]`). Returns `(steps [P], history [P, K], log_p [P, N, S], SMCResult)` with every
    result field given a leading axis P."""
    num_prompts = keys.shape[0]
    run_keys, sample_keys = split_keys(keys, 2)
    step = build_kernel(
        lm, proposal, target, block_size=block_size, ess_threshold=ess_threshold,
        resampler=resampler, num_rejuvenation_steps=num_rejuvenation_steps,
        lookahead=lookahead, cut_law=uniform, conditional_sample=conditional_sample,
    )
    # A twist reads the model's features; they are recorded only when it needs them.
    state = init(
        lm, prompts, num_particles, max_new_tokens, prompt_lengths,
        record_twist=proposal.twist is not None, record_features=proposal.twist is not None,
    )
    state = state._replace(particles=parallel.constrain_rows(state.particles, mesh))
    num_blocks = -(-max_new_tokens // block_size)
    by_prompt = lambda x: x.reshape(num_prompts, num_particles, *x.shape[1:])  # noqa: E731
    step_keys = lambda state: jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, state.step)  # noqa: E731
    info_shape = jax.eval_shape(step, step_keys(state), state)[1]
    history = jax.tree.map(lambda x: jnp.zeros((num_blocks,) + x.shape, x.dtype), info_shape)

    def unfinished(state):  # bool [P]: alone, the prompt's run would go on
        return ~jnp.all(by_prompt(finished(state.particles.decode)), axis=1)

    def running(carry):
        state, history, _ = carry
        # A NaN weight ends every run: the call raises.
        last_invalid = jnp.any(history.nan_or_inf[jnp.maximum(state.step - 1, 0)])
        return (state.step < num_blocks) & jnp.any(unfinished(state)) & ~last_invalid

    def body(carry):
        state, history, steps = carry
        steps = steps + unfinished(state)
        new_state, info = step(step_keys(state), state)
        history = jax.tree.map(lambda h, x: h.at[state.step].set(x), history, info)
        if progress:
            report(new_state.step)
        return new_state, history, steps

    steps = jnp.zeros((num_prompts,), jnp.int32)
    state, history, steps = jax.lax.while_loop(running, body, (state, history, steps))
    history = jax.tree.map(lambda h: jnp.swapaxes(h, 0, 1), history)
    log_weights, _ = normalize_log_weights(by_prompt(state.log_weights))
    all_zero = jnp.all(jnp.isneginf(log_weights), axis=1)

    def draw(key, log_weights, all_zero):
        drawn = jax.random.categorical(key, jnp.where(all_zero, 0.0, log_weights))
        return jnp.where(all_zero, 0, drawn).astype(jnp.int32)

    decode = state.particles.decode
    return parallel.replicate((steps, history, by_prompt(decode.log_p), SMCResult(
        tokens=by_prompt(decode.tokens),
        lengths=by_prompt(decode.length),
        done=by_prompt(decode.done),
        rewards=by_prompt(state.particles.reward),
        log_weights=log_weights,
        log_z=log_evidence(by_prompt(state.log_weights)),
        sample_index=jax.vmap(draw)(sample_keys, log_weights, all_zero),
        ess=history.ess,
        num_unique=history.num_unique,
        resampled=history.resampled,
        acceptance_rate=history.acceptance_rate,
        log_z_history=history.log_z,
        num_decoded=jnp.sum(history.num_decoded, axis=1),
        all_zero=all_zero,
    )), mesh)


def smc_decode(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array | Sequence[Array],
    reward_fn: Optional[RewardFn] | Sequence[RewardFn] = None,
    *,
    num_particles: int,
    max_new_tokens: int,
    alpha: float | Array = 1.0,
    lam: float | Array = 0.0,
    block_size: int = 1,
    ess_threshold: float | Array = 0.5,
    resampler: str | Resampler = "systematic",
    num_rejuvenation_steps: int = 0,
    lookahead: LookaheadSpec = None,
    temperature: Optional[float | Array] = None,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> SMCResult | list[SMCResult]:
    """Samples π(y) ∝ p(y | prompt)^α exp(λ r(y)) with block-wise SMC in one jitted loop.

    Special cases: λ = 0, α > 1 with the default τ = 1/α is Power-SMC (every increment is
    then log Σ_v p(v|prefix)^α, independent of the sampled token); N = 1 and λ = 0 is plain
    sampling from the proposal (the single weight never triggers a resampling).

    A batch of P prompts (a list, or a `[P, T]` array) with P keys (`jax.random.split(key,
    P)`) runs P independent SMC runs in one loop: P·N rows per model step, each prompt
    prefilled once and shared by its N particles, which are weighted, resampled and
    rejuvenated among themselves. Run p returns what `smc_decode(keys[p], lm,
    prompts[p], rewards[p], ...)` returns (floats up to the rounding of a batched matmul)
    and stops where that run would; the loop runs until the last one stops.

    Args:
      key: PRNG key; the same key gives the same result. P keys for P prompts.
      lm: the model.
      prompt_tokens: int32 `[T]`, T ≥ 1; or P prompts (a sequence of `[T_p]`, or `[P, T]`).
      reward_fn: `(tokens int32 [S], length int32 []) -> f32 []`, pure, scoring any prefix
        (pad after `length`); it is evaluated after every block, and its value on the final
        sequence is the terminal reward (truncated sequences included). A new function
        object recompiles; `jax.tree_util.Partial(fn, *arrays)` passes the arrays as traced
        arguments, so per-problem rewards of one shape share a compilation. `None`: r = 0.
        With P prompts: one reward for all, or a sequence of P such `Partial`s of one `fn`
        with arrays of one shape (`jaxsample.smc.target.stack_rewards`).
      num_particles: N, per prompt.
      max_new_tokens: S.
      alpha: α > 0 (traced); with P prompts one α, or one per prompt (`[P]`).
      lam: λ, finite (traced); must be 0 without `reward_fn`; one, or one per prompt.
      block_size: B ≤ S tokens between reweightings / resamplings.
      ess_threshold: κ in [0, 1]: resample when ESS < κ N (traced).
      resampler: "systematic", "stratified", "residual", "multinomial" or a resampler function.
      num_rejuvenation_steps: K MH moves after each resampling (0 = none).
      lookahead: `None` (prefix-only SMC), `Lookahead(num_rollouts, horizon)` (Monte Carlo
        future value) or a `log_value_fn(tokens, length) -> log V`.
      temperature: proposal τ > 0; default 1/α (the Power-SMC proposal); one, or one per prompt.
      top_k, top_p: proposal truncation (top-p one, or one per prompt). The weights keep the
        full p, so with truncation SMC targets π restricted to the sequences the proposal
        can reach.
      progress: show a tqdm bar of SMC blocks while the jitted loop runs (static).
      mesh: a `jaxsample.parallel` mesh: particles split over its data axis (P·N must be a
        multiple of it), the model over its model axis; same key, same particles (in bf16
        up to rare roundings on a model axis: see `jaxsample.parallel`).

    Returns:
      `SMCResult`; a list of P for P prompts.

    Raises:
      ArgumentError: an argument out of range.
      NumericalError: a particle's log p is not finite at a generated position (naming the
        prompt of a batch, the particle and position), or a log-weight became NaN or +inf
        (e.g. from the reward).
    """
    prompts, num_particles, block_size = check_arguments(
        key, lm, prompt_tokens, num_particles, max_new_tokens, block_size, ess_threshold)
    max_new_tokens = prompts.max_new_tokens
    if isinstance(reward_fn, (list, tuple)) and len(reward_fn) != prompts.num_prompts:
        raise ArgumentError(
            f"reward_fn: {len(reward_fn)} per-prompt rewards for {prompts.num_prompts} prompts")
    num_rejuvenation_steps = check_int("num_rejuvenation_steps", num_rejuvenation_steps, 0)
    check_lookahead(lookahead)  # before jit hashes it as a static argument
    target = make_target(alpha, lam, reward_fn)
    proposal = Proposal(
        temperature=1.0 / target.alpha if temperature is None else temperature,
        top_k=top_k,
        top_p=top_p,
    ).validated()
    check_per_prompt(prompts, alpha=target.alpha, lam=target.lam, temperature=proposal.temperature,
                     top_p=proposal.top_p)

    parallel.check_rows(mesh, num_particles * prompts.num_prompts, "num_particles × prompts")
    inputs = (prompts.keys, parallel.shard_model(lm, mesh), prompts.tokens, prompts.lengths, target, proposal,
              jnp.asarray(ess_threshold, jnp.float32))
    run = partial(
        _run, *parallel.place_inputs(inputs, mesh),
        num_particles=num_particles, max_new_tokens=max_new_tokens, block_size=block_size,
        resampler=resampler, num_rejuvenation_steps=num_rejuvenation_steps,
        lookahead=lookahead, progress=progress, mesh=mesh,
    )
    return execute(lm, run, prompts.batched, max_new_tokens, block_size, progress, "smc_decode blocks")


def check_arguments(key, lm, prompt_tokens, num_particles, max_new_tokens, block_size, ess_threshold):
    """Validates the arguments every SMC entry point shares; returns them normalised:
    `(Prompts, num_particles, block_size)` (`jaxsample.decoding.prompts_and_keys`)."""
    num_particles = check_int("num_particles", num_particles, 1)
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    block_size = check_int("block_size", block_size, 1, prompts.max_new_tokens)
    check_real("ess_threshold", ess_threshold, "[0, 1]")
    if jnp.shape(ess_threshold):
        raise ArgumentError(f"ess_threshold must be one number, got shape {jnp.shape(ess_threshold)}")
    return prompts, num_particles, block_size


def execute(lm, run, batched, max_new_tokens, block_size, progress, label) -> SMCResult | list[SMCResult]:
    """Runs a partially applied `_run`, raises `NumericalError` on a non-finite log p or a
    NaN / +inf log-weight and trims each run's per-step histories to the steps it ran; one
    `SMCResult`, or a list of P for a batch of prompts."""
    if progress:
        with progress_bar(-(-max_new_tokens // block_size), label):
            num_steps, history, log_p, result = jax.block_until_ready(run())
    else:
        num_steps, history, log_p, result = run()
    num_steps = np.asarray(num_steps)
    ran = np.arange(history.nan_or_inf.shape[1]) < num_steps[:, None]
    # Errors name the prompt of a batch: its index leads the reported position.
    named = (lambda x: x) if batched else (lambda x: x[0])  # noqa: E731
    prompt_axis = ("prompt",) if batched else ()
    first_bad = first_non_finite(log_p.reshape(-1, log_p.shape[-1]), result.lengths.reshape(-1))
    raise_on_non_finite(lm, named(first_bad.reshape(log_p.shape[:2])), rows="particle", steps=prompt_axis)
    non_finite = np.where(ran[:, :, None], np.asarray(history.non_finite), -1)
    raise_on_non_finite(lm, named(non_finite), rows="particle", steps=(*prompt_axis, "SMC step"))
    invalid = np.argwhere(ran & np.asarray(history.nan_or_inf))
    if invalid.size:
        prompt, step = (int(i) for i in invalid[0])
        raise NumericalError(
            f"a log-weight became NaN or +inf at SMC step {step}{f' of prompt {prompt}' if batched else ''} "
            f"(tokens up to {min((step + 1) * block_size, max_new_tokens)}); check the "
            "reward / potential / twist functions and the model's logits for NaN / inf"
        )

    def run_of(prompt):
        trim = lambda x: x[prompt, :num_steps[prompt]]  # noqa: E731
        return jax.tree.map(lambda x: x[prompt], result)._replace(
            ess=trim(result.ess),
            num_unique=trim(result.num_unique),
            resampled=trim(result.resampled),
            acceptance_rate=trim(result.acceptance_rate),
            log_z_history=trim(result.log_z_history),
        )

    runs = [run_of(prompt) for prompt in range(num_steps.shape[0])]
    return runs if batched else runs[0]
