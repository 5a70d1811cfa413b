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

The whole sampler is one jitted program, one `lax.while_loop` of decode steps (`advance`)
in which every chain runs its own schedule of moves: block k's extension, then its MH steps,
then block k+1's. A chain whose proposal has ended is judged and starts its next move (a
cut, and one step that refeeds its last kept token) while the others go on decoding. With
C chains in lockstep, each MH step would last as long as the longest of C proposals (about
the whole block for uniform cuts, against half of it on average), so most rows idle for half
the step; here a chain waits only at the end, for the chain with the most work. Each
move's randomness is that of the lockstep loop of `build_kernel` steps (keys per block, step
and chain), so both give the same chains (`jaxsample.testing.lockstep_power_sample`).
The bookkeeping (ratio, cut, per-row selects of the state) runs in every decode step in
which some chain's move ends, where lockstep runs it once per MH step: with thousands of
chains on a model whose forward costs next to nothing, that costs more than the idle rows
it saves (16,384 chains on a tabular toy: 10 s against 6.8 s in lockstep).
That bookkeeping sits in a `lax.cond`, but the rows' caches and next-token logits do not:
XLA:GPU copies every array that passes through a conditional, which made each decode step
copy the chains' and the proposals' caches whole. After the conditional, only the slices of
rows whose move ended are rewritten, in place (`_settle_rows`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxsample import parallel
from jaxsample.decoding import (
    DecodeState,
    advance,
    check_finite_log_p,
    check_per_prompt,
    extendable,
    init_decode,
    prompt_row_keys,
    prompts_and_keys,
    raise_on_non_finite,
    split_keys,
    truncate,
)
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.rows import select_rows
from jaxsample.progress import progress_bar, report
from jaxsample.mcmc.cuts import CutLaw, as_jit_argument, resolve_cut_law
from jaxsample.mcmc.kernel import PowerMHInfo, draw_cuts, judge_moves, move_keys
from jaxsample.mcmc.result import PowerSampleResult
from jaxsample.sampling import Proposal
from jaxsample.validation import check_int, check_real

Array = jax.Array


class _Chains(NamedTuple):
    """The loop state of `_power_sample` (C chains, P·C for P prompts; K blocks, S MH steps
    per block).

    Attributes:
      current: each chain's current completion.
      proposed: the move in progress: the extension of `current` to the block cap, or an MH
        proposal cut from it at `cut`.
      move: int32 `[C]` the move in progress, b (S + 1) + k: block b's extension (k = 0) or
        its MH step k − 1; K (S + 1) once the chain has made all its moves (or is frozen).
      refeed: bool `[C]` the proposal was just cut and its last kept token is fed next.
      cut: int32 `[C]` the MH move's cut.
      info: `PowerMHInfo` `[K, S, C]`.
      active: bool `[K, C]` the chain moved in block b (not frozen).
      extended: int32 `[K, C]` tokens of block b's extension.
    """

    current: DecodeState
    proposed: DecodeState
    move: Array
    refeed: Array
    cut: Array
    info: PowerMHInfo
    active: Array
    extended: Array


# The per-row parts of a decode state that `finish` only moves whole between the chain and
# its proposal (it truncates the others): the model cache and the next-token logits.
_ROW_PARTS = ("cache", "next_logits")


def _detach_rows(chains_state: _Chains):
    """`(chains_state without _ROW_PARTS, the chains' parts, the proposals' parts)`."""
    def split(state):
        return state._replace(**dict.fromkeys(_ROW_PARTS)), {name: getattr(state, name) for name in _ROW_PARTS}
    current, current_rows = split(chains_state.current)
    proposed, proposed_rows = split(chains_state.proposed)
    return chains_state._replace(current=current, proposed=proposed), current_rows, proposed_rows


def _attach_rows(chains_state: _Chains, current_rows: dict, proposed_rows: dict) -> _Chains:
    """The chains' and the proposals' states with the fields `current_rows` / `proposed_rows`."""
    return chains_state._replace(current=chains_state.current._replace(**current_rows),
                                 proposed=chains_state.proposed._replace(**proposed_rows))


# `_settle_rows` rewrites the chains in about this many slices of rows.
_SETTLE_SLICES = 16


def _settle_rows(ended: Array, accepted: Array, current_rows, proposed_rows):
    """After the moves of the `ended` rows (bool `[C]`): each such row's chain and proposal
    both hold the proposal's parts where `accepted`, else the chain's (the next move starts
    from the chain; a chain that has made its last move keeps its proposal unread).

    In place, in about `_SETTLE_SLICES` slices of rows, only those that hold an ended row:
    a step in which no move ends reads and writes nothing, one in which a few end a few
    slices. The last slice may overlap the one before it; settling a row twice changes
    nothing.
    """
    num_rows = ended.shape[0]
    width = -(-num_rows // _SETTLE_SLICES)
    starts = jnp.minimum(jnp.arange(0, num_rows, width), num_rows - width)
    touched = jax.vmap(lambda start: jnp.any(jax.lax.dynamic_slice_in_dim(ended, start, width)))(starts)
    order = jnp.nonzero(touched, size=starts.shape[0], fill_value=0)[0]
    current_leaves, treedef = jax.tree.flatten(current_rows)

    def settle(i, leaves):
        start = starts[order[i]]

        def rows(x):
            return jax.lax.dynamic_slice_in_dim(x, start, width)

        rows_ended = rows(ended)
        taken = rows_ended & rows(accepted)
        settled = ([], [])
        for current, proposed in zip(*leaves):
            per_row = (width,) + (1,) * (current.ndim - 1)
            current = jax.lax.dynamic_update_slice_in_dim(
                current, jnp.where(taken.reshape(per_row), rows(proposed), rows(current)), start, 0)
            # Read from the updated chains, the proposals' update comes after the chains' in
            # the data flow, so both are written in place (crossed reads of the old buffers
            # made XLA copy both whole on every trip).
            proposed = jax.lax.dynamic_update_slice_in_dim(
                proposed, jnp.where(rows_ended.reshape(per_row), rows(current), rows(proposed)), start, 0)
            settled[0].append(current)
            settled[1].append(proposed)
        return settled

    current, proposed = jax.lax.fori_loop(0, jnp.sum(touched, dtype=jnp.int32), settle,
                                          (current_leaves, treedef.flatten_up_to(proposed_rows)))
    return treedef.unflatten(current), treedef.unflatten(proposed)


def _with_prompt_cache(chains_state: _Chains, prompt_cache) -> _Chains:
    """The chains' and the proposals' states with `prompt_cache`. Both hold the same one;
    the decode loop carries it once, outside them (each carried copy is a buffer of its own:
    two prompt caches of P prompts on XLA:CPU)."""
    shared = {"prompt_cache": prompt_cache}
    return _attach_rows(chains_state, shared, shared)


@partial(
    jax.jit,
    static_argnames=("num_chains", "block_size", "num_mcmc_steps", "max_new_tokens",
                     "progress", "mesh"),
)
def _power_sample(keys, lm, prompt, prompt_length, alpha, proposal, cut_law, num_chains,
                  block_size, num_mcmc_steps, max_new_tokens, freeze_finished, progress, mesh):
    num_blocks, moves_per_block = max_new_tokens // block_size, num_mcmc_steps + 1
    total_moves = num_blocks * moves_per_block
    num_rows = keys.shape[0] * num_chains
    chains = jnp.arange(num_rows)

    def block_keys(block):
        # Per prompt key, as in a run of that prompt alone; rows prompt-major.
        extend_keys, mh_keys = split_keys(jax.vmap(jax.random.fold_in, (0, None))(keys, block), 2)
        steps = jax.vmap(lambda step: move_keys(jax.vmap(jax.random.fold_in, (0, None))(mh_keys, step), num_rows))
        return prompt_row_keys(extend_keys, num_chains), steps(jnp.arange(num_mcmc_steps))

    extension_keys, mh_keys = jax.vmap(block_keys)(jnp.arange(num_blocks))
    # [K, S + 1, P·C]: move k of block b draws its tokens from proposal_keys[b, k, chain].
    proposal_keys = jnp.concatenate([extension_keys[:, None], mh_keys.proposal], axis=1)

    def block_and_step(move):
        return move // moves_per_block, move % moves_per_block

    def mh_key_index(move):
        """Index of the MH keys `[K, S, C]` of each chain's move (clamped where it is none)."""
        block, k = block_and_step(move)
        return jnp.minimum(block, num_blocks - 1), jnp.maximum(k - 1, 0), chains

    def cap(move):
        return (jnp.minimum(move // moves_per_block, num_blocks - 1) + 1) * block_size

    def move_ended(chains_state: _Chains):
        """bool `[C]`: the chain's proposal is complete (stop token or block cap)."""
        move = chains_state.move
        return (move < total_moves) & ~extendable(chains_state.proposed, cap(move))

    def start(chains_state: _Chains, starting):
        """Starts move `chains_state.move` of the `starting` chains."""
        current, move = chains_state.current, chains_state.move
        block, k = block_and_step(move)
        opens_block = starting & (k == 0)
        frozen = opens_block & freeze_finished & current.done
        active = chains_state.active.at[jnp.where(opens_block & ~frozen, block, num_blocks), chains].set(
            True, mode="drop")
        mh = starting & (k > 0)
        cut = chains_state.cut
        if num_mcmc_steps:
            cut = jnp.where(mh, draw_cuts(cut_law, mh_keys.cut[mh_key_index(move)], current), cut)
        # An extension starts from the current completion as it is (truncated to its length).
        proposed = select_rows(starting, truncate(lm, current, jnp.where(mh, cut, current.length)),
                               chains_state.proposed)
        return chains_state._replace(
            proposed=proposed, move=jnp.where(frozen, total_moves, move), refeed=mh, cut=cut, active=active)

    def finish(chains_state: _Chains, ended):
        """Judges every move that has ended (`ended`, `move_ended`) and starts the chain's
        next one; returns the state and which rows took their proposal."""
        current, proposed, move = chains_state.current, chains_state.proposed, chains_state.move
        block, k = block_and_step(move)
        extension = ended & (k == 0)
        extended = chains_state.extended.at[jnp.where(extension, block, num_blocks), chains].set(
            proposed.length - current.length, mode="drop")
        info, accepted = chains_state.info, extension
        if num_mcmc_steps:
            mh = ended & (k > 0)
            verdict = judge_moves(cut_law, alpha, chains_state.cut, current, proposed,
                                  mh_keys.accept[mh_key_index(move)], mh)
            at = (jnp.where(mh, block, num_blocks), jnp.maximum(k - 1, 0), chains)
            info = jax.tree.map(lambda all_, one: all_.at[at].set(one, mode="drop"), info, verdict)
            accepted = extension | verdict.accepted
        current = select_rows(accepted, proposed, current)
        move = move + ended
        chains_state = chains_state._replace(current=current, move=move, info=info, extended=extended)
        chains_state = start(chains_state, ended & (move < total_moves))
        if progress:
            block, k = block_and_step(chains_state.move)
            report(jnp.min(block * num_mcmc_steps + jnp.maximum(k - 1, 0)))
        return chains_state, accepted

    def finish_or_keep(chains_state: _Chains, ended):
        """`finish` where some move ended, with which rows took their proposal."""
        def keep(chains_state, ended):
            return chains_state, jnp.zeros_like(ended)
        return jax.lax.cond(jnp.any(ended), finish, keep, chains_state, ended)

    def decode_step(chains_state: _Chains):
        chains_state = _with_prompt_cache(chains_state, prompt_cache)
        block, k = block_and_step(jnp.minimum(chains_state.move, total_moves - 1))
        proposed = advance(lm, chains_state.proposed, proposal_keys[block, k, chains],
                           cap(chains_state.move), proposal, refeed=chains_state.refeed)
        chains_state = _with_prompt_cache(
            chains_state._replace(proposed=proposed, refeed=jnp.zeros_like(chains_state.refeed)), None)
        ended = move_ended(chains_state)
        # The caches and next-token logits stay out of the conditional, which XLA:GPU would
        # copy them through whole (in every step); only the ended rows' are rewritten.
        light, current_rows, proposed_rows = _detach_rows(chains_state)
        light, accepted = finish_or_keep(light, ended)
        current_rows, proposed_rows = _settle_rows(ended, accepted, current_rows, proposed_rows)
        return _attach_rows(light, current_rows, proposed_rows)

    decode = init_decode(lm, prompt, num_rows, max_new_tokens, prompt_lengths=prompt_length)
    decode = parallel.constrain_rows(decode, mesh)
    prompt_cache = decode.prompt_cache
    chains_state = _Chains(
        current=decode,
        proposed=decode,
        move=jnp.zeros((num_rows,), jnp.int32),
        refeed=jnp.zeros((num_rows,), bool),
        cut=jnp.zeros((num_rows,), jnp.int32),
        info=PowerMHInfo.idle((num_blocks, num_mcmc_steps, num_rows), decode.log_p.dtype),
        active=jnp.zeros((num_blocks, num_rows), bool),
        extended=jnp.zeros((num_blocks, num_rows), jnp.int32),
    )
    chains_state = _with_prompt_cache(start(chains_state, jnp.ones((num_rows,), bool)), None)
    chains_state = jax.lax.while_loop(lambda c: jnp.any(c.move < total_moves), decode_step, chains_state)
    current, info = chains_state.current, chains_state.info
    return parallel.replicate(PowerSampleResult(
        tokens=current.tokens,
        lengths=current.length,
        done=current.done,
        log_p=current.log_p,
        info=info,
        active=chains_state.active,
        tokens_decoded=jnp.sum(chains_state.extended, axis=0) + jnp.sum(info.tokens_decoded, axis=(0, 1)),
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
      key: PRNG key; for a batch of P prompts, P keys (`jax.random.split(key, P)`).
      lm: the model.
      prompt_tokens: int32 `[T]`, shared by every chain, or a batch of P prompts (a list of
        `[T_p]` prompts, or `[P, T]`) with C chains each, decoded as one batch of P·C rows
        (prompt-major: rows p·C … p·C + C − 1 continue prompt p, prefilled once). Prompt p's
        chains are those a run of prompt p alone with key p gives (same keys; the floats up
        to rounding, as a wider batch or prompt bucket may round differently).
      alpha: α > 0, the target exponent; for a batch of P prompts one α for all, or one per
        prompt (`[P]`: an α sweep on one problem is P copies of its prompt).
      cut: "uniform" (Karan & Du), "entropy" (entropy-jump law, β = 4; Zhou et al.) or a
        cut law, e.g. `entropy_jump(beta)` (see `jaxsample.mcmc.cuts`).
      num_chains: C independent chains, decoded as one batch.
      block_size: B; must divide max_new_tokens (blocks end at multiples of B).
      num_mcmc_steps: MH steps per block (0 gives block-wise sampling from q).
      max_new_tokens: N, the cap on generated tokens.
      temperature: proposal τ (default 1/α); one, or one per prompt `[P]`.
      top_k: proposal top-k (0 = off). The target keeps the full p; the chain samples π
        restricted to the completions the truncated proposal can reach.
      top_p: proposal nucleus mass in (0, 1] (same remark as top-k); one, or one per prompt.
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
      (`info` `[K, S, C]`; `[K, S, P·C]` for P prompts) and token counts.
    """
    check_real("alpha", alpha, "(0, inf)")
    num_chains = check_int("num_chains", num_chains, 1)
    block_size = check_int("block_size", block_size, 1)
    num_mcmc_steps = check_int("num_mcmc_steps", num_mcmc_steps, 0)
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    max_new_tokens = prompts.max_new_tokens
    if max_new_tokens % block_size:
        raise ArgumentError(
            f"block_size must divide max_new_tokens={max_new_tokens} (blocks end at multiples "
            f"of block_size), got {block_size}"
        )
    parallel.check_rows(mesh, prompts.num_prompts * num_chains, "prompts × num_chains" if prompts.batched else "num_chains")
    cut_law = as_jit_argument(resolve_cut_law(cut))
    alpha = jnp.asarray(alpha, jnp.float32)
    proposal = Proposal(
        temperature=1.0 / alpha if temperature is None else temperature, top_k=top_k, top_p=top_p
    ).validated()
    check_per_prompt(prompts, alpha=alpha, temperature=proposal.temperature, top_p=proposal.top_p)
    args = parallel.place_inputs((
        prompts.keys, parallel.shard_model(lm, mesh), prompts.tokens, prompts.lengths, alpha, proposal, cut_law,
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
