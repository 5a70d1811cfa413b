"""Teacher-forced sequence scoring: `js.score`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.sampling import token_log_probs

Array = jax.Array


def _check_range(name: str, values, low: int, high: int, what: str) -> None:
    if isinstance(values, jax.core.Tracer):
        return
    values = np.asarray(values)
    outside = (values < low) | (values >= high)
    if outside.any():
        raise ArgumentError(f"{name} {int(values[outside][0])} is outside {what} [{low}, {high})")


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
    prompt = jnp.asarray(prompt, jnp.int32)
    completions = jnp.asarray(completions, jnp.int32)
    if completions.ndim != 2:
        raise ArgumentError(f"completions must have shape [S, N], got {completions.shape}")
    rows, slots = completions.shape
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
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (rows,):
        raise ArgumentError(f"lengths must have shape [S={rows}], got {lengths.shape}")
    prompt_lengths = jnp.broadcast_to(
        jnp.asarray(width if prompt_lengths is None else prompt_lengths, jnp.int32), (rows,)
    )
    _check_range("lengths", lengths, 0, slots + 1, "the completion slots")
    _check_range("prompt_lengths", prompt_lengths, 1, width + 1, "the prompt width")
    _check_range("prompt token id", prompt, 0, lm.vocab_size, f"the vocabulary of model {lm.name!r}")
    if not isinstance(completions, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
        scored = np.arange(slots)[None, :] < np.asarray(lengths)[:, None]
        _check_range(
            "completion token id", np.asarray(completions)[scored], 0, lm.vocab_size, f"the vocabulary of model {lm.name!r}"
        )
    return _score(lm, prompt, prompt_lengths, completions, lengths, with_entropy)
