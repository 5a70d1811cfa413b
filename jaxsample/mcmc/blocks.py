"""Block-wise power sampling (Karan & Du, Algorithm 1, with the exact kernel).

For block k = 0..K−1 (K = max_new_tokens / block_size, cap L_k = (k+1)·block_size): every
chain still running is extended from q up to L_k (chains that already hold a stop token
are not), then `num_mcmc_steps` MH steps target π_k ∝ p(x_{≤L_k})^α, cutting over all
generated positions so far (earlier blocks too), so the last block's chain targets the
full p^α and earlier blocks are warm starts.

By default (`freeze_finished=False`) a chain that holds a stop token keeps moving in later
blocks (it is not extended, but its MH moves cut anywhere and may lengthen it), so every
chain targets π in the last block and the output law tends to π as the steps grow; one
block (block_size = max_new_tokens) is plain MH on π. Karan & Du instead stop a chain once
it has finished after a block (`freeze_finished=True`, kept for faithful reproduction): its
law is then that of block k's chain, which targets π_k, not π, so with several blocks the
output differs from π even with infinitely many steps. Measured with `jaxsample.testing`
on a 31-completion toy (α = 2, 2 blocks of 2 tokens, 25 steps): the exact output law is
at TV 0.0002 from π by default and 0.22 with the early stop (tests/mcmc/test_power_sample.py).

The whole loop is one jitted program: `lax.scan` over blocks and steps, with a `lax.cond`
skipping blocks once every chain is frozen.
"""

from __future__ import annotations

from functools import partial
from typing import Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxsample import parallel
from jaxsample.decoding import (
    check_finite_log_p,
    check_prompt,
    extend,
    init_decode,
    pad_prompt,
    raise_on_non_finite,
)
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.progress import progress_bar, report
from jaxsample.mcmc.cuts import CutLaw, as_jit_argument, resolve_cut_law
from jaxsample.mcmc.kernel import PowerMHInfo, PowerMHState, build_kernel
from jaxsample.mcmc.result import PowerSampleResult
from jaxsample.sampling import Proposal
from jaxsample.validation import check_int, check_key, check_real

Array = jax.Array


def _idle_info(num_steps: int, num_chains: int, dtype) -> PowerMHInfo:
    zeros = jnp.zeros((num_steps, num_chains), dtype)
    never = jnp.zeros((num_steps, num_chains), jnp.int32)
    return PowerMHInfo(never, zeros, zeros, zeros, zeros, never.astype(bool), never, never - 1)


@partial(
    jax.jit,
    static_argnames=("num_chains", "block_size", "num_mcmc_steps", "max_new_tokens",
                     "progress", "mesh"),
)
def _power_sample(key, lm, prompt, prompt_length, alpha, proposal, cut_law, num_chains,
                  block_size, num_mcmc_steps, max_new_tokens, freeze_finished, progress, mesh):
    step = build_kernel(lm, cut_law, proposal)
    decode = init_decode(lm, prompt, num_chains, max_new_tokens, prompt_lengths=prompt_length)
    decode = parallel.constrain_rows(decode, mesh)

    def run_block(decode, block, active):
        cap = (block + 1) * block_size
        extend_key, mh_key = jax.random.split(jax.random.fold_in(key, block))
        decode, extended = extend(extend_key, lm, decode, cap, proposal)

        def mh_step(state, index):
            if progress:
                report(block * num_mcmc_steps + index)
            return step(jax.random.fold_in(mh_key, index), state, alpha, cap, active)

        state, info = jax.lax.scan(mh_step, PowerMHState(decode), jnp.arange(num_mcmc_steps))
        return state.decode, info, extended

    def skip_block(decode, block, active):
        del block, active
        idle = _idle_info(num_mcmc_steps, num_chains, decode.log_p.dtype)
        return decode, idle, jnp.zeros((num_chains,), jnp.int32)

    def one_block(decode, block):
        active = ~(decode.done & freeze_finished)
        decode, info, extended = jax.lax.cond(
            jnp.any(active), run_block, skip_block, decode, block, active
        )
        if progress:
            report((block + 1) * num_mcmc_steps)
        return decode, (info, active, extended)

    num_blocks = max_new_tokens // block_size
    decode, (info, active, extended) = jax.lax.scan(one_block, decode, jnp.arange(num_blocks))
    return parallel.replicate(PowerSampleResult(
        tokens=decode.tokens,
        lengths=decode.length,
        done=decode.done,
        log_p=decode.log_p,
        info=info,
        active=active,
        tokens_decoded=jnp.sum(extended, axis=0) + jnp.sum(info.tokens_decoded, axis=(0, 1)),
    ), mesh)


def power_sample(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    alpha: float | Array = 4.0,
    *,
    cut: Union[str, CutLaw] = "uniform",
    num_chains: int = 1,
    block_size: int = 192,
    num_mcmc_steps: int = 10,
    max_new_tokens: int = 3072,
    temperature: float | Array | None = None,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    freeze_finished: bool = False,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> PowerSampleResult:
    """Samples completions from π ∝ p(x | prompt)^α with block-wise Metropolis–Hastings.

    Defaults follow Karan & Du (α = 4, 16 blocks of 192 tokens, 10 steps per block, τ = 1/α),
    except top-k: 0 keeps the whole vocabulary, while their code ran under transformers'
    default top_k = 50 (pass `top_k=50` to match it).
    α, temperature, top-p, freeze_finished and the entropy-jump β are traced: changing them
    does not recompile. The prompt length, chain count, block size, step count,
    max_new_tokens, top-k and a cut law without float leaves (`uniform`, a function) are
    static.

    Args:
      key: PRNG key.
      lm: the model.
      prompt_tokens: int32 `[T]`, shared by every chain.
      alpha: α > 0, the target exponent.
      cut: "uniform" (Karan & Du), "entropy" (entropy-jump law, β = 4; Zhou et al.) or a
        cut law, e.g. `entropy_jump(beta)` (see `jaxsample.mcmc.cuts`).
      num_chains: C independent chains, decoded as one batch.
      block_size: B; must divide max_new_tokens (blocks end at multiples of B).
      num_mcmc_steps: MH steps per block (0 gives block-wise sampling from q).
      max_new_tokens: N, the cap on generated tokens.
      temperature: proposal τ (default 1/α).
      top_k: proposal top-k (0 = off). The target keeps the full p; the chain samples π
        restricted to the completions the truncated proposal can reach.
      top_p: proposal nucleus mass in (0, 1] (same remark as top-k).
      freeze_finished: False (default) keeps moving finished chains in later blocks, so the
        output law tends to π; True stops a chain once it holds a stop token after a block,
        Karan & Du's early stop, whose output law stays at the earlier block's target (see
        the module docstring). The early stop saves the finished chains' decoding.
      progress: show a tqdm bar of MH steps while the jitted program runs (static: the
        callbacks are compiled in only when True).
      mesh: a `jaxsample.parallel` mesh: chains split over its data axis (C must be a
        multiple of it), the model over its model axis; same key, same chains (in bf16 up to
        rare roundings on a model axis: see `jaxsample.parallel`).

    Returns:
      `PowerSampleResult` with each chain's final completion, per-step diagnostics
      (`info` `[K, S, C]`) and token counts.
    """
    check_key("key", key)
    check_real("alpha", alpha, "(0, inf)")
    num_chains = check_int("num_chains", num_chains, 1)
    block_size = check_int("block_size", block_size, 1)
    num_mcmc_steps = check_int("num_mcmc_steps", num_mcmc_steps, 0)
    prompt, max_new_tokens = check_prompt(lm, prompt_tokens, max_new_tokens)
    if max_new_tokens % block_size:
        raise ArgumentError(
            f"block_size must divide max_new_tokens={max_new_tokens} (blocks end at multiples "
            f"of block_size), got {block_size}"
        )
    parallel.check_rows(mesh, num_chains, "num_chains")
    cut_law = as_jit_argument(resolve_cut_law(cut))
    alpha = jnp.asarray(alpha, jnp.float32)
    proposal = Proposal(
        temperature=1.0 / alpha if temperature is None else temperature, top_k=top_k, top_p=top_p
    ).validated()
    args = parallel.place_inputs((
        key, parallel.shard_model(lm, mesh), *pad_prompt(lm, prompt, max_new_tokens), alpha, proposal, cut_law,
        num_chains, block_size, num_mcmc_steps, max_new_tokens, jnp.asarray(freeze_finished, bool), progress, mesh,
    ), mesh)
    if progress:
        with progress_bar((max_new_tokens // block_size) * num_mcmc_steps, "power_sample MH steps"):
            result = jax.block_until_ready(_power_sample(*args))
    else:
        result = _power_sample(*args)
    check_finite_log_p(lm, result.log_p, result.lengths, rows="chain")
    raise_on_non_finite(lm, result.info.non_finite, rows="chain", steps=("block", "MH step"))
    return result
