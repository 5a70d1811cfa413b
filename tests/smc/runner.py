"""Many independent SMC runs at once: the public kernel, `lax.scan` over blocks, `vmap` over
keys."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxsample.sampling import Proposal
from jaxsample.smc import build_kernel, init, make_target


@partial(jax.jit, static_argnames=("num_particles", "max_new_tokens", "block_size",
                                   "reward_fn", "resampler", "num_rejuvenation_steps", "lookahead"))
def _runs(keys, lm, prompt, alpha, lam, temperature, ess_threshold, *,
          num_particles, max_new_tokens, block_size, reward_fn, resampler,
          num_rejuvenation_steps, lookahead):
    target = make_target(alpha, lam, reward_fn)
    proposal = Proposal(temperature=temperature)
    step = build_kernel(lm, proposal, target, block_size=block_size, ess_threshold=ess_threshold,
                        resampler=resampler, num_rejuvenation_steps=num_rejuvenation_steps,
                        lookahead=lookahead)
    num_blocks = -(-max_new_tokens // block_size)

    def one(key):
        state = init(lm, prompt, num_particles, max_new_tokens)
        return jax.lax.scan(lambda s, k: step(k, s), state, jax.random.split(key, num_blocks))

    return jax.vmap(one)(keys)


def run_smc(seeds, lm, prompt, *, alpha=1.0, lam=0.0, temperature=None, ess_threshold=0.5,
            reward_fn=None, resampler=None, num_rejuvenation_steps=0, lookahead=None,
            num_particles, max_new_tokens, block_size):
    """`(final SMCState, SMCInfo per step)`, both with a leading axis over `seeds`."""
    from jaxsample.smc import systematic

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    temperature = 1.0 / alpha if temperature is None else temperature
    return _runs(keys, lm, prompt, jnp.float32(alpha), jnp.float32(lam), jnp.float32(temperature),
                 jnp.float32(ess_threshold), num_particles=num_particles,
                 max_new_tokens=max_new_tokens, block_size=block_size, reward_fn=reward_fn,
                 resampler=resampler or systematic, num_rejuvenation_steps=num_rejuvenation_steps,
                 lookahead=lookahead)
