"""Power-distribution Metropolis–Hastings over completions: target π(x) ∝ p(x | prompt)^α.

All chains are rows of one `DecodeState`, moved together: per row a cut i ~ c(· | x), a
rewind to i tokens, a proposal decoded from q up to the block cap (the same cap for the
forward and the reverse move), and an accept/reject with the exact ratio of
`jaxsample.mcmc.acceptance`. Under a truncated proposal (top-k, top-p) the target keeps the
full, untruncated p, so the chain samples π restricted to the completions the proposal can
reach (Karan & Du's choice; Zhou's code instead renormalises p on the top-k set).

    state = init(key, lm, prompt, num_chains=8, max_new_tokens=64, proposal=proposal)
    step = jax.jit(build_kernel(lm, uniform, proposal))
    state, info = step(key, state, alpha, cap)
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.decoding import (DecodeState, extend, first_non_finite, fold_in_rows, init_decode, is_key_batch,
                                prompt_keys, prompt_row_keys, rewind, select_rows)
from jaxsample.lm import LanguageModel
from jaxsample.mcmc.acceptance import Trace, log_acceptance_ratio
from jaxsample.mcmc.cuts import CutLaw
from jaxsample.rows import expand_groups
from jaxsample.sampling import Proposal

Array = jax.Array


class PowerMHState(NamedTuple):
    """C chains of power-distribution MH.

    Attributes:
      decode: a `DecodeState` with C rows holding each chain's current completion (tokens,
        per-token log p / log q / entropy, length, done) plus its cache and next logits, so
        a move rewinds and extends it without re-running the prompt.
    """

    decode: DecodeState


class PowerMHInfo(NamedTuple):
    """Per-chain diagnostics of one MH step (all `[C]`).

    Attributes:
      cut: int32 first resampled position i (generation-relative).
      log_ratio: log r (`-inf` where NaN, i.e. rejected).
      log_power: α (Σ ℓp' − Σ ℓp) over the suffixes.
      log_proposal: Σ ℓq − Σ ℓq' over the suffixes.
      log_cut: log c(i | x') − log c(i | x).
      accepted: bool, the chain moved.
      tokens_decoded: int32 tokens decoded for the proposal (accepted or not).
      non_finite: int32 first generated position whose log p in the proposal is not finite
        (NaN logits), −1 if none; such a proposal is rejected, and `power_sample` raises.

    For chains masked out by `active`, `accepted` is False and `tokens_decoded` 0; their
    other fields describe a move that was never made.
    """

    cut: Array
    log_ratio: Array
    log_power: Array
    log_proposal: Array
    log_cut: Array
    accepted: Array
    tokens_decoded: Array
    non_finite: Array

    @classmethod
    def idle(cls, shape: tuple[int, ...], dtype) -> "PowerMHInfo":
        """Entries of `shape` for moves never made: zeros, not accepted, `non_finite` −1;
        `dtype` for the float fields."""
        zeros, never = jnp.zeros(shape, dtype), jnp.zeros(shape, jnp.int32)
        return cls(never, zeros, zeros, zeros, zeros, never.astype(bool), never, never - 1)


def init(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    num_chains: int,
    max_new_tokens: int,
    proposal: Proposal,
    cap: Array | int | None = None,
    prompt_length: Array | int | None = None,
) -> PowerMHState:
    """Starts C chains from completions drawn from `proposal`.

    Args:
      key: PRNG key; P keys for P prompts.
      lm: the model.
      prompt_tokens: int32 `[T]`, shared by every chain, or `[P, T]`: P prompts with C
        chains each, prompt-major (rows p·C … p·C + C − 1 continue prompt p and are the
        chains of prompt p alone with key p; `step` then takes P keys too).
      num_chains: C (per prompt).
      max_new_tokens: N, the slots per chain.
      proposal: the sampling distribution q.
      cap: the initial length cap (default N); chains stop at a stop token or `cap`.
      prompt_length: the real length of a right-padded prompt (`jaxsample.decoding.pad_prompt`;
        default T), `[P]` for P prompts (`pad_prompts`); may be traced.

    The tokens this decodes are `state.decode.length`.
    """
    keys = prompt_keys(key, prompt_tokens)
    state = init_decode(lm, prompt_tokens, keys.shape[0] * num_chains, max_new_tokens, prompt_lengths=prompt_length)
    state, _ = extend(prompt_row_keys(keys, num_chains), lm, state, max_new_tokens if cap is None else cap, proposal)
    return PowerMHState(state)


class MoveKeys(NamedTuple):
    """The randomness of one MH step for C chains (PRNG keys, all `[C]`).

    Attributes:
      cut: the chain's cut draw.
      accept: the chain's accept uniform.
      proposal: the chain's proposal stream (token j from `fold_in(proposal, j)`, as `extend`).
    """

    cut: Array
    accept: Array
    proposal: Array


def move_keys(key: Array, num_chains: int) -> MoveKeys:
    """Splits one MH step's key per chain, so that a chain's randomness does not depend on
    the other chains, nor on when the other chains make their moves. With P keys (one per
    prompt), the C chains are P groups of C / P, prompt-major, each split from its key."""
    if is_key_batch(key):
        per_prompt = jax.vmap(move_keys, in_axes=(0, None))(key, num_chains // key.shape[0])
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), per_prompt)
    cut_key, proposal_key = jax.random.split(key)
    split_keys = jax.vmap(jax.random.split)(fold_in_rows(cut_key, num_chains))
    return MoveKeys(split_keys[:, 0], split_keys[:, 1], fold_in_rows(proposal_key, num_chains))


def draw_cuts(cut_law: CutLaw, keys: Array, current: DecodeState) -> Array:
    """int32 `[C]`: each chain's cut i ~ c(· | x) from its key (`MoveKeys.cut`)."""
    log_c = jax.vmap(lambda trace: trace.cut_log_probs(cut_law))(Trace.of(current))
    return jax.vmap(jax.random.categorical)(keys, log_c).astype(jnp.int32)


def judge_moves(
    cut_law: CutLaw, alpha: Array, cut: Array, current: DecodeState, proposed: DecodeState,
    accept_keys: Array, moving: Array,
) -> PowerMHInfo:
    """The accept/reject of C proposals (`proposed` cut from `current` at `cut`), with their
    diagnostics; chains not `moving` (bool `[C]`) are rejected and decoded nothing. `alpha`:
    one α for all chains, or one per group of chains `[P]` (`jaxsample.rows.expand_groups`)."""
    ratio = jax.vmap(partial(log_acceptance_ratio, cut_law=cut_law))
    log_r = ratio(cut, expand_groups(alpha, cut.shape[0]), Trace.of(current), Trace.of(proposed))
    log_u = jnp.log(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(accept_keys))
    return PowerMHInfo(
        cut=cut,
        log_ratio=log_r.log_ratio,
        log_power=log_r.log_power,
        log_proposal=log_r.log_proposal,
        log_cut=log_r.log_cut,
        accepted=moving & (log_u < log_r.log_ratio),
        tokens_decoded=jnp.where(moving, proposed.length - cut, 0),
        non_finite=jnp.where(moving, first_non_finite(proposed.log_p, proposed.length), -1),
    )


def build_kernel(
    lm: LanguageModel, cut_law: CutLaw, proposal: Proposal
) -> Callable[..., tuple[PowerMHState, PowerMHInfo]]:
    """Returns `step(key, state, alpha, cap, active=None) -> (state, info)`.

    Args of `step`:
      key: PRNG key, split per chain by `move_keys`, so a chain's randomness does not depend
        on the other chains; P keys for chains of P prompts (`init`).
      state: `PowerMHState`; every active chain must lie in the cap's state space (length ≤
        cap, and a chain without a stop token has length == cap).
      alpha: α > 0, traced: one, or one per prompt `[P]` for chains of P prompts (the
        proposal's τ and top-p may likewise be `[P]`).
      cap: int32 scalar or `[C]`, the block cap L (≤ N), traced.
      active: bool `[C]` chains to move (default all); the others keep their state and decode
        nothing.

    The chains move in lockstep: a step decodes for as long as its longest proposal.
    `power_sample` instead lets each chain start its next move as soon as its proposal ends
    (same keys, same chains).

    `proposal` may hold traced temperature / top-p, and `cut_law` a traced β
    (`EntropyJump`), when `build_kernel` is called inside a jitted function; `top_k` is
    static.
    """

    def step(key, state: PowerMHState, alpha, cap, active=None):
        current = state.decode
        num_chains = current.length.shape[0]
        active = jnp.ones((num_chains,), bool) if active is None else active
        keys = move_keys(key, num_chains)
        cut = draw_cuts(cut_law, keys.cut, current)
        # Inactive chains rewind to their own length with a cap at that length: a no-op.
        proposed = rewind(lm, current, jnp.where(active, cut, current.length))
        proposed, _ = extend(keys.proposal, lm, proposed, jnp.where(active, cap, current.length), proposal)
        info = judge_moves(cut_law, alpha, cut, current, proposed, keys.accept, active)
        return PowerMHState(select_rows(info.accepted, proposed, current)), info

    return step
