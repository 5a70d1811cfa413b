"""Block-wise power MH with the chains in lockstep: the reference `power_sample` must equal.

`jaxsample.mcmc.power_sample` lets each chain start its next move as soon as its proposal
ends. Written with the public kernel (`init_decode`, `extend`, `build_kernel` steps in a
`lax.scan`), every MH step instead decodes for as long as the batch's longest proposal. The
keys of each move are the same in both, so both give the same chains; `bench_power.py`
times this loop as the obvious alternative.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxsample.decoding import extend, init_decode, pad_prompt
from jaxsample.lm import LanguageModel
from jaxsample.mcmc.cuts import as_jit_argument, resolve_cut_law
from jaxsample.mcmc.kernel import PowerMHInfo, PowerMHState, build_kernel
from jaxsample.mcmc.result import PowerSampleResult
from jaxsample.sampling import Proposal


def lockstep_power_sample(key, lm: LanguageModel, prompt_tokens, alpha: float = 4.0, *, cut="uniform",
                          num_chains: int = 1, block_size: int = 192, num_mcmc_steps: int = 10,
                          max_new_tokens: int = 3072, temperature: float | None = None, top_k: int = 0,
                          top_p: float = 1.0, freeze_finished: bool = False) -> PowerSampleResult:
    """`power_sample`'s chains, moved in lockstep (same arguments, unchecked; no mesh)."""
    alpha = jnp.asarray(alpha, jnp.float32)
    proposal = Proposal(
        temperature=1.0 / alpha if temperature is None else temperature, top_k=top_k, top_p=top_p
    ).validated()
    prompt, prompt_length = pad_prompt(lm, jnp.asarray(prompt_tokens, jnp.int32), max_new_tokens)
    return _lockstep(key, lm, prompt, prompt_length, alpha, proposal, as_jit_argument(resolve_cut_law(cut)),
                     num_chains, block_size, num_mcmc_steps, max_new_tokens, jnp.asarray(freeze_finished))


@partial(jax.jit, static_argnames=("num_chains", "block_size", "num_mcmc_steps", "max_new_tokens"))
def _lockstep(key, lm, prompt, prompt_length, alpha, proposal, cut_law, num_chains, block_size,
              num_mcmc_steps, max_new_tokens, freeze_finished):
    step = build_kernel(lm, cut_law, proposal)
    decode = init_decode(lm, prompt, num_chains, max_new_tokens, prompt_lengths=prompt_length)

    def run_block(decode, block, active):
        cap = (block + 1) * block_size
        extend_key, mh_key = jax.random.split(jax.random.fold_in(key, block))
        decode, extended = extend(extend_key, lm, decode, cap, proposal)
        state, info = jax.lax.scan(
            lambda state, index: step(jax.random.fold_in(mh_key, index), state, alpha, cap, active),
            PowerMHState(decode), jnp.arange(num_mcmc_steps))
        return state.decode, info, extended

    def skip_block(decode, block, active):
        del block, active
        idle = PowerMHInfo.idle((num_mcmc_steps, num_chains), decode.log_p.dtype)
        return decode, idle, jnp.zeros((num_chains,), jnp.int32)

    def one_block(decode, block):
        active = ~(decode.done & freeze_finished)
        decode, info, extended = jax.lax.cond(jnp.any(active), run_block, skip_block, decode, block, active)
        return decode, (info, active, extended)

    decode, (info, active, extended) = jax.lax.scan(one_block, decode, jnp.arange(max_new_tokens // block_size))
    return PowerSampleResult(
        tokens=decode.tokens, lengths=decode.length, done=decode.done, log_p=decode.log_p, info=info,
        active=active, tokens_decoded=jnp.sum(extended, axis=0) + jnp.sum(info.tokens_decoded, axis=(0, 1)),
    )
