"""Ancestral sampling: `js.generate`."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
from jax.sharding import Mesh

from jaxsample import parallel
from jaxsample.decoding import (check_finite_log_p, check_per_prompt, extend, init_decode, prompt_row_keys,
                                prompts_and_keys)
from jaxsample.lm import LanguageModel
from jaxsample.sampling import Proposal
from jaxsample.validation import check_int

Array = jax.Array


class GenerateResult(NamedTuple):
    """Samples of one prompt (S samples, N = max_new_tokens; P·S rows, prompt-major, for a
    batch of P prompts).

    Attributes:
      tokens: int32 `[S, N]`; positions after the first stop token hold the pad id.
      lengths: int32 `[S]` generated tokens, the stop token included.
      log_p: float32 `[S, N]` base log-probability of each token (untempered, full vocab).
      log_q: float32 `[S, N]` log-probability under the distribution actually sampled.
      entropy: float32 `[S, N]` entropy of the base next-token distribution.
      done: bool `[S]` the sample ended with a stop token (else it hit max_new_tokens).
      features: float32 `[S, N, D]` final-norm hidden state at each generated token (0 after
        the length), or None unless `record_features=True`.
    """

    tokens: Array
    lengths: Array
    log_p: Array
    log_q: Array
    entropy: Array
    done: Array
    features: Array | None = None


@partial(jax.jit, static_argnames=("max_new_tokens", "num_samples", "record_features", "mesh"))
def _generate(keys, lm, prompt, prompt_length, proposal, max_new_tokens, num_samples, record_features, mesh):
    state = init_decode(
        lm, prompt, keys.shape[0] * num_samples, max_new_tokens, prompt_lengths=prompt_length,
        record_features=record_features,
    )
    row_keys = prompt_row_keys(keys, num_samples)
    state, _ = extend(row_keys, lm, parallel.constrain_rows(state, mesh), max_new_tokens, proposal)
    return parallel.replicate(GenerateResult(
        tokens=state.tokens,
        lengths=state.length,
        log_p=state.log_p,
        log_q=state.log_q,
        entropy=state.entropy,
        done=state.done,
        features=state.features,
    ), mesh)


def generate(
    key: Array,
    lm: LanguageModel,
    prompt_tokens: Array,
    max_new_tokens: int,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    num_samples: int = 1,
    record_features: bool = False,
    mesh: Mesh | None = None,
) -> GenerateResult:
    """Samples `num_samples` continuations of one prompt, or of each of a batch of prompts,
    in a single jitted while-loop.

    `top_k=1` decodes greedily only where the largest logit is unique: top-k keeps every token
    whose tempered logit equals the k-th largest (as transformers' `TopKLogitsWarper` does), so
    `top_k=1` samples uniformly among exactly tied maxima (commoner in bf16), with log q =
    −log(number tied). Raises `NumericalError` if a generated token's log p is not finite (NaN
    logits). Temperature and top-p are traced: changing them does not recompile;
    `max_new_tokens`, `num_samples`, `top_k` and the prompt's length bucket (see `pad_prompt`:
    powers of two) are static.

    Args:
      key: PRNG key; for a batch of P prompts, P keys (`jax.random.split(key, P)`).
      lm: the model.
      prompt_tokens: int32 `[T]`, T ≥ 1, or a batch of P prompts (a list of `[T_p]` prompts,
        or `[P, T]`), each prefilled once: rows p·S … p·S + S − 1 continue prompt p, and are
        the samples of a call on prompt p alone with key p.
      max_new_tokens: N; the prompt plus N must fit the model's positions.
      temperature: τ in [2⁻¹²⁶, 2¹²⁶], where τ and 1/τ are normal float32 numbers; for a
        batch of P prompts one τ, or one per prompt (`[P]`).
      top_k: keep the k most likely tokens, and any tied with the k-th (0 = all).
      top_p: nucleus mass in (0, 1]; one, or one per prompt as τ.
      num_samples: S, rows decoded as one batch.
      record_features: also return each generated token's final-norm hidden state
        (`.features [S, N, D]`), from the same decode steps.
      mesh: a `jaxsample.parallel` mesh: samples split over its data axis (P·S must be a
        multiple of it), the model over its model axis; same key, same samples (in bf16 up
        to rare roundings on a model axis: see `jaxsample.parallel`).
    """
    num_samples = check_int("num_samples", num_samples, 1)
    proposal = Proposal(temperature=temperature, top_k=top_k, top_p=top_p).validated()
    prompts = prompts_and_keys(lm, key, prompt_tokens, max_new_tokens)
    check_per_prompt(prompts, temperature=proposal.temperature, top_p=proposal.top_p)
    parallel.check_rows(mesh, prompts.num_prompts * num_samples, "prompts × num_samples" if prompts.batched else "num_samples")
    inputs = (prompts.keys, parallel.shard_model(lm, mesh), prompts.tokens, prompts.lengths, proposal)
    result = _generate(*parallel.place_inputs(inputs, mesh), prompts.max_new_tokens, num_samples, record_features, mesh)
    check_finite_log_p(lm, result.log_p, result.lengths, rows="sample")
    return result
