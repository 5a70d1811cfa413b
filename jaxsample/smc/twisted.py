"""Twisted SMC (Zhao, Brekelmans, Makhzani, Grosse, ICML 2024) on the landed SMC kernel.

Target σ(s) ∝ p(s | prompt) φ(s) over complete sequences, with a terminal potential
φ = exp(log_potential_fn(tokens, length)) applied once, at the stop token or at
`max_new_tokens`. Intermediate targets π_t ∝ p(s_{1:t}) ψ_t(s_{1:t}), with ψ_0 = 1 and ψ_T = φ.

Twisted SMC is one configuration of `jaxsample.smc.build_kernel`, not a second loop:
- proposal: the twist-induced q(v | s_<t) ∝ p(v | s_<t) ψ_t(s_<t, v) (a `Proposal` with a
  `Twist`; the decode loop records log ψ of each sampled token);
- intermediate value: `ProposalTwist()`, i.e. the stored value of a particle is log ψ of its
  last token (0 before the first and after termination);
- reward: the terminal log-potential, 0 until the particle finishes (`terminal_potential`).

The kernel's increment α Σ(log p − log q) + (r_t − r_{t−1}) + log ψ_t − log ψ_{t−1} then is,
per token, w_t = N_ψ(s_<t) / ψ_{t−1}(s_<t) with N_ψ = Σ_v p(v | s_<t) ψ_t(s_<t, v): it does
not depend on the token drawn, and at the last token it is p φ / (ψ_{T−1} q). The kernel
resamples at block ends, after the block's last token is drawn; since that token's weight
does not depend on it, this is resampling on weights computed before sampling, applied to
the already extended particles (statistically equivalent targets, slightly more variance
than the fully adapted order). The KV cache is gathered with the particles as in reward SMC.

With the optimal twist ψ*_t(s_{1:t}) = E_p[φ | s_{1:t}] every increment after the first is 1
and the first is Z: every final log-weight equals log Z and the ESS is N at every step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel, token_ids
from jaxsample.sampling import Proposal, Twist
from jaxsample.smc.lookahead import ProposalTwist
from jaxsample.smc.resampling import Resampler
from jaxsample.smc.sampler import SMCResult, _run, check_arguments, execute
from jaxsample.smc.target import make_target

Array = jax.Array
LogTwistFn = Callable[[Any, Array, Array, Array], Array]
LogPotentialFn = Callable[[Array, Array], Array]


def _terminal_log_potential(log_potential_fn, stop_ids, tokens, length):
    finished = (length >= tokens.shape[0]) | (
        (length > 0) & jnp.isin(tokens[jnp.maximum(length - 1, 0)], stop_ids)
    )
    return jnp.where(finished, log_potential_fn(tokens, length), 0.0)


def terminal_potential(lm: LanguageModel, log_potential_fn: LogPotentialFn) -> Partial:
    """A reward `(tokens [S], length []) -> f32 []` equal to log φ on finished sequences (stop
    token or S tokens) and 0 on unfinished prefixes, so that with λ = 1 the SMC target's
    difference potential applies φ exactly once, at termination. Arrays carried by a
    `Partial` potential stay traced."""
    if not callable(log_potential_fn):
        raise ArgumentError(f"log_potential_fn must be a function, got {log_potential_fn!r}")
    if not isinstance(log_potential_fn, Partial):
        log_potential_fn = Partial(log_potential_fn)
    return Partial(_terminal_log_potential, log_potential_fn,
                   jnp.asarray(lm.eos_token_ids, jnp.int32))


def twisted_proposal(log_twist_fn: Optional[LogTwistFn], twist_params: Any) -> Proposal:
    """The twist-induced proposal q ∝ p ψ (p itself when `log_twist_fn` is None)."""
    if log_twist_fn is None:
        return Proposal(temperature=1.0).validated()
    if not callable(log_twist_fn):
        raise ArgumentError(f"log_twist_fn must be a function or None, got {log_twist_fn!r}")
    return Proposal(temperature=1.0, twist=Twist(log_twist_fn, twist_params)).validated()


def _check_reference(lm: LanguageModel, sample, max_new_tokens: int) -> Array:
    if np.shape(sample) != (max_new_tokens,):
        raise ArgumentError(
            f"conditional_sample must have shape [max_new_tokens] = [{max_new_tokens}] (pad "
            f"after its stop token), got {np.shape(sample)}"
        )
    return token_ids("conditional_sample", sample, lm.vocab_size)


def twisted_smc(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array | Sequence[Array],
    log_twist_fn: Optional[LogTwistFn],
    twist_params: Any,
    log_potential_fn: LogPotentialFn,
    *,
    num_particles: int,
    max_new_tokens: int,
    block_size: int = 1,
    ess_threshold: float | Array = 0.5,
    resampler: str | Resampler | None = None,
    conditional_sample: Optional[Array] = None,
    progress: bool = False,
) -> SMCResult | list[SMCResult]:
    """Samples σ(s) ∝ p(s | prompt) φ(s) with twisted SMC; log Z_hat estimates Σ_s p(s) φ(s).

    Args:
      key: PRNG key.
      lm: the (frozen) model.
      prompt_tokens: int32 `[T]`, or P prompts with P keys: P runs in one loop, as
        `smc_decode` runs them (one `SMCResult` each).
      log_twist_fn: `(twist_params, tokens [S], length [], features [D]) -> log ψ [V]`, the
        twist of every candidate next token after `tokens[:length]` (pure; a new function
        object recompiles). `features` f32 `[lm.feature_size]` are the model's hidden
        features at the prefix's last position (the logits for `from_logits_fn` toys).
        `None`: no twist (ψ = 1, q = p).
      twist_params: the twist's parameters (traced; e.g. `jaxsample.smc.TwistHead` params).
      log_potential_fn: `(tokens [S], length []) -> f32 []`, log φ of a finished sequence
        (`-inf` allowed); a `jax.tree_util.Partial` keeps its arrays traced.
      num_particles: N.
      max_new_tokens: S; a sequence without a stop token is scored by φ at S tokens.
      block_size: tokens between reweightings / resamplings.
      ess_threshold: κ: resample when ESS < κ N (traced).
      resampler: a scheme name or function; `None` picks "systematic", or with
        `conditional_sample` "multinomial" (the only scheme conditional SMC allows).
      conditional_sample: optional int32 `[S]` exact draw from σ (pad after its stop token):
        conditional SMC with particle 0 clamped to it, whose log Z_hat is biased up
        (E log Z_hat ≥ log Z), while plain SMC's is biased down.
      progress: tqdm bar over blocks.

    Returns:
      `SMCResult`: `.tokens .lengths .log_weights` (normalised) `.log_z .ess` (per step) and
      `.rewards` = log φ of each final particle.
    """
    prompts, num_particles, block_size = check_arguments(
        key, lm, prompt_tokens, num_particles, max_new_tokens, block_size, ess_threshold)
    max_new_tokens = prompts.max_new_tokens
    target = make_target(1.0, 1.0, terminal_potential(lm, log_potential_fn))
    proposal = twisted_proposal(log_twist_fn, twist_params)
    reference = None
    if conditional_sample is not None:
        if prompts.batched:
            raise ArgumentError("conditional_sample clamps one reference sequence: pass one prompt [T], not a batch")
        reference = _check_reference(lm, conditional_sample, max_new_tokens)
        resampler = "multinomial" if resampler is None else resampler
    run = partial(
        _run, prompts.keys, lm, prompts.tokens, prompts.lengths, target, proposal,
        jnp.asarray(ess_threshold, jnp.float32), reference,
        num_particles=num_particles, max_new_tokens=max_new_tokens, block_size=block_size,
        resampler="systematic" if resampler is None else resampler, num_rejuvenation_steps=0,
        lookahead=None if log_twist_fn is None else ProposalTwist(), progress=progress,
    )
    return execute(lm, run, prompts.batched, max_new_tokens, block_size, progress, "twisted_smc blocks")
