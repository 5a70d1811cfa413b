"""Baselines for power sampling, in the same API and result type.

- `base_sample`: ancestral sampling from p (or any τ / top-k / top-p).
- `temperature_sample`: low-temperature sampling, τ = 1/α — the "power of sums"
  distribution, not p^α (spec §1).
- `best_of_n`: per chain, the candidate with the highest mean log-likelihood, optionally
  under a token budget so that it matches a power-sampling run's compute.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsample import parallel
from jaxsample.decoding import (DecodeState, Prompts, check_finite_log_p, check_per_prompt, extend, init_decode,
                                prompt_row_keys, prompts_and_keys)
from jaxsample.lm import LanguageModel
from jaxsample.mcmc.kernel import PowerMHInfo
from jaxsample.mcmc.result import PowerSampleResult
from jaxsample.sampling import Proposal
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_int_array, check_real

Array = jax.Array


@partial(jax.jit, static_argnames=("num_rows", "max_new_tokens", "mesh"))
def _decode(keys, lm, prompt, proposal, num_rows, max_new_tokens, mesh) -> DecodeState:
    """The decoded rows (`num_rows` per prompt), without their cache and next logits
    (replicated over `mesh`)."""
    tokens, length = prompt
    state = init_decode(lm, tokens, keys.shape[0] * num_rows, max_new_tokens, prompt_lengths=length)
    row_keys = prompt_row_keys(keys, num_rows)
    state = extend(row_keys, lm, parallel.constrain_rows(state, mesh), max_new_tokens, proposal)[0]
    return parallel.replicate(state._replace(cache=None, next_logits=None, prompt_cache=None), mesh)


def _without_mcmc(tokens, lengths, done, log_p, tokens_decoded) -> PowerSampleResult:
    num_chains = lengths.shape[0]
    return PowerSampleResult(
        tokens=tokens,
        lengths=lengths,
        done=done,
        log_p=log_p,
        info=PowerMHInfo.idle((1, 0, num_chains), log_p.dtype),
        active=jnp.ones((1, num_chains), bool),
        tokens_decoded=tokens_decoded,
    )


def _sample(lm, prompts: Prompts, num_rows, temperature, top_k, top_p, rows, mesh):
    """Decodes `num_rows` rows per prompt (`prompts_and_keys`) from the proposal and checks their log p."""
    proposal = Proposal(temperature=temperature, top_k=top_k, top_p=top_p).validated()
    check_per_prompt(prompts, temperature=proposal.temperature, top_p=proposal.top_p)
    parallel.check_rows(mesh, prompts.num_prompts * num_rows, f"the {rows} count" + (" × prompts" if prompts.batched else ""))
    inputs = (prompts.keys, parallel.shard_model(lm, mesh), (prompts.tokens, prompts.lengths), proposal)
    state = _decode(*parallel.place_inputs(inputs, mesh), num_rows, prompts.max_new_tokens, mesh)
    check_finite_log_p(lm, state.log_p, state.length, rows=rows)
    return state


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, to) == to
    except ValueError:
        return False


def base_sample(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    *,
    num_chains: int = 1,
    max_new_tokens: int = 3072,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    mesh: Mesh | None = None,
) -> PowerSampleResult:
    """C independent completions from the proposal (default: the base model p).

    Args:
      key: PRNG key; for a batch of P prompts, P keys (`jax.random.split(key, P)`).
      lm: the model.
      prompt_tokens: int32 `[T]`, T ≥ 1, or a batch of P prompts (a list of `[T_p]` prompts,
        or `[P, T]`) with C completions each, as in `power_sample`: P·C rows, prompt-major,
        prompt p's those of a call on it alone with key p.
      num_chains: C, completions (per prompt) decoded as one batch.
      max_new_tokens: N (default 3072, `power_sample`'s); the prompt plus N must fit the
        model's positions.
      temperature, top_k, top_p: the proposal (see `Proposal`); traced, except top_k; τ and
        top-p one, or one per prompt of a batch (`[P]`).
      mesh: a `jaxsample.parallel` mesh (chains over its data axis, the model over its
        model axis), as in `power_sample`.

    Returns:
      `PowerSampleResult` with no MH steps (`info` leaves `[1, 0, C]`, or `[1, 0, P·C]`);
      `tokens_decoded` = `lengths`.
    """
    num_chains = check_int("num_chains", num_chains, 1)
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    return _completions(lm, prompts, num_chains, temperature, top_k, top_p, mesh)


def temperature_sample(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    alpha: float | Array = 4.0,
    *,
    num_chains: int = 1,
    max_new_tokens: int = 3072,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    mesh: Mesh | None = None,
) -> PowerSampleResult:
    """C independent completions at temperature τ = 1/α (power sampling's proposal, the
    "power of sums" baseline); `base_sample` with `temperature=1/alpha`, α > 0 (one, or one per
    prompt of a batch `[P]`)."""
    check_real("alpha", alpha, "(0, inf)")
    num_chains = check_int("num_chains", num_chains, 1)
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    check_per_prompt(prompts, alpha=alpha)
    return _completions(lm, prompts, num_chains, 1.0 / jnp.asarray(alpha, jnp.float32), top_k, top_p, mesh)


def _completions(lm, prompts: Prompts, num_chains, temperature, top_k, top_p, mesh) -> PowerSampleResult:
    """`base_sample`'s result: `num_chains` completions per prompt from the proposal."""
    state = _sample(lm, prompts, num_chains, temperature, top_k, top_p, "chain", mesh)
    return _without_mcmc(state.tokens, state.length, state.done, state.log_p, state.length)


@jax.jit
def _select_best(state: DecodeState, token_budget: Array) -> PowerSampleResult:
    num_chains = token_budget.shape[0]
    num_candidates = state.length.shape[0] // num_chains

    def per_candidate(x):
        return x.reshape((num_chains, num_candidates) + x.shape[1:])

    lengths = per_candidate(state.length)
    # Candidates are drawn in order; one is affordable while the tokens so far fit the
    # budget. The first is always kept so that every chain returns a completion.
    spent = jnp.cumsum(lengths, axis=1)
    affordable = (spent <= token_budget[:, None]) | (jnp.arange(num_candidates) == 0)
    score = jnp.sum(per_candidate(state.log_p), axis=-1) / lengths
    best = jnp.argmax(jnp.where(affordable, score, -jnp.inf), axis=1)

    def pick(x):
        return jnp.take_along_axis(
            per_candidate(x), best.reshape((num_chains, 1) + (1,) * (x.ndim - 1)), axis=1
        )[:, 0]

    return _without_mcmc(pick(state.tokens), pick(state.length), pick(state.done),
                         pick(state.log_p), jnp.sum(jnp.where(affordable, lengths, 0), axis=1))


def best_of_n(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    num_candidates: int,
    *,
    num_chains: int = 1,
    max_new_tokens: int = 3072,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    token_budget: Array | int | None = None,
    mesh: Mesh | None = None,
) -> PowerSampleResult:
    """Per chain, the best of `num_candidates` samples by mean log-likelihood per token.

    The mean is Σ log p / length over the completion, its stop token included.
    Compute matching: pass `token_budget` (int32 scalar or `[C]`, e.g. a power-sampling
    result's `tokens_decoded`; for P prompts, anything that broadcasts to `[P, C]`); candidates are then taken in sampling order while their
    cumulative tokens fit the budget (at least one per chain), so `num_candidates` is only
    an upper bound — make it large enough (budget / shortest plausible completion).
    `tokens_decoded` counts the candidates kept; all `num_candidates` are decoded.
    `mesh`: candidates over the data axis (P × C × num_candidates must be a multiple of it).
    The other arguments and the result are as in `base_sample`.
    """
    num_chains = check_int("num_chains", num_chains, 1)
    num_candidates = check_int("num_candidates", num_candidates, 1)
    if token_budget is not None:
        check_int_array("token_budget", token_budget, 0, np.iinfo(np.int32).max + 1, "the int32 range")
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    chains = (prompts.num_prompts, num_chains)
    budget = jnp.iinfo(jnp.int32).max if token_budget is None else token_budget
    if not _broadcasts(np.shape(budget), chains):
        raise ArgumentError(f"token_budget must broadcast to [P, C] = {list(chains)} (prompts, chains), "
                            f"got shape {np.shape(budget)}")
    budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), chains).reshape(-1)
    # Every candidate is checked, kept or not: a NaN model is an error, not a low score.
    state = _sample(lm, prompts, num_chains * num_candidates, temperature, top_k, top_p, "candidate", mesh)
    return _select_best(state, parallel.place_inputs(budget, mesh))
