"""Teacher-forced sequence scoring: `js.score`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel, token_ids
from jaxsample.sampling import token_log_probs
from jaxsample.validation import check_int_array

Array = jax.Array


@partial(jax.jit, static_argnames="with_entropy")
def _score(lm, prompts, prompt_lengths, completions, lengths, with_entropy):
    rows, prompt_width = prompts.shape
    slots = completions.shape[1]
    t = jnp.arange(prompt_width + slots, dtype=jnp.int32)[None, :]
    # Row s reads prompt[s, :P_s] then completion[s]: contiguous, so positions are slots.
    from_prompt = jnp.take_along_axis(prompts, jnp.minimum(t, prompt_width - 1).repeat(rows, 0), axis=1)
    in_completion = jnp.clip(t - prompt_lengths[:, None], 0, slots - 1)
    sequences = jnp.where(
        t < prompt_lengths[:, None], from_prompt, jnp.take_along_axis(completions, in_completion, axis=1)
    )
    # Completion token j is predicted at position P_s - 1 + j.
    select = prompt_lengths[:, None] - 1 + jnp.arange(slots, dtype=jnp.int32)[None, :]
    logits = lm.forward(sequences, select=select, intervene_from=prompt_lengths - 1)
    log_probs, entropy = token_log_probs(logits)
    log_p = jnp.take_along_axis(log_probs, completions[:, :, None], axis=2)[:, :, 0]
    valid = jnp.arange(slots)[None, :] < lengths[:, None]
    log_p = jnp.where(valid, log_p, 0.0)
    if with_entropy:
        return log_p, jnp.where(valid, entropy, 0.0)
    return log_p


def score(
    lm: LanguageModel,
    prompt: Array,
    completions: Array,
    lengths: Array,
    *,
    prompt_lengths: Array | None = None,
    with_entropy: bool = False,
):
    """Teacher-forced log p of each completion token, in one batched forward.

    The model's adapters and intervention apply as during generation: a `positions="last"`
    intervention edits every position from each prompt's last token on, exactly the edits
    the decode loop made, so scoring a generation reproduces the log p it recorded.
    Differentiable with respect to `lm` (params, adapters, intervention params).

    Args:
      lm: the model.
      prompt: int32 `[T]` shared by every completion, or `[S, T]` right-padded prompts.
      completions: int32 `[S, N]` token ids (values after `lengths` are ignored).
      lengths: int32 `[S]` scored tokens per row, in `[0, N]`.
      prompt_lengths: real prompt lengths, int32 `[S]` (or a scalar for a `[T]` prompt),
        each in `[1, T]`; default T.
      with_entropy: also return the entropy of each scored position's next-token law.

    Returns:
      float32 `log_p [S, N]` (0 at positions ≥ length), or `(log_p, entropy [S, N])`.
    """
    # Ids and lengths are checked as given, before the int32 casts: a float would truncate and
    # an int64 ≥ 2³¹ wrap into range.
    prompt = token_ids("prompt", prompt, lm.vocab_size)
    if np.ndim(completions) != 2:
        raise ArgumentError(f"completions must have shape [S, N], got {np.shape(completions)}")
    rows, slots = np.shape(completions)
    if prompt.ndim == 1:
        prompt = jnp.broadcast_to(prompt, (rows, prompt.shape[0]))
    if prompt.ndim != 2 or prompt.shape[0] != rows:
        raise ArgumentError(f"prompt must have shape [T] or [S={rows}, T], got {prompt.shape}")
    width = prompt.shape[1]
    if width < 1:
        raise ArgumentError("the prompt must hold at least one token (e.g. BOS)")
    if width + slots > lm.max_length:
        raise ArgumentError(
            f"prompt of {width} tokens + {slots} completion tokens exceeds the {lm.max_length} "
            f"positions of model {lm.name!r}"
        )
    if np.shape(lengths) != (rows,):
        raise ArgumentError(f"lengths must have shape [S={rows}], got {np.shape(lengths)}")
    check_int_array("lengths", lengths, 0, slots + 1, "the completion slots")
    if prompt_lengths is not None:
        check_int_array("prompt_lengths", prompt_lengths, 1, width + 1, "the prompt width")
    ids = completions if isinstance(completions, jax.core.Tracer) else np.asarray(completions)
    if not isinstance(ids, jax.core.Tracer):
        # Ids after each length are ignored, so only the scored ones must be in the vocabulary
        # (with traced lengths none is known to be scored: the dtype alone is checked).
        scored = 0 if isinstance(lengths, jax.core.Tracer) else np.asarray(lengths)[:, None]
        ids = np.where(np.arange(slots)[None, :] < scored, ids, 0)
    check_int_array("completions", ids, 0, lm.vocab_size, f"the vocabulary of model {lm.name!r}")
    prompt_lengths = jnp.broadcast_to(
        jnp.asarray(width if prompt_lengths is None else prompt_lengths, jnp.int32), (rows,)
    )
    completions, lengths = jnp.asarray(completions, jnp.int32), jnp.asarray(lengths, jnp.int32)
    return _score(lm, prompt, prompt_lengths, completions, lengths, with_entropy)
