"""Supervised warm-up: teacher-forced cross-entropy on target completions via `js.score`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.training.trainer import Rollout, TrainState, optimize, pad_prompts, policy_model, score_rollout


def sft_batch(lm: LanguageModel, prompts: list, targets: list) -> Rollout:
    """A `Rollout` holding given target completions (no log π_old), for `sft_update`."""
    if len(prompts) != len(targets) or not targets:
        raise ArgumentError(f"need one target per prompt, got {len(prompts)} prompts and {len(targets)} targets")
    width = max(len(t) for t in targets)
    tokens = np.full((len(targets), width), lm.pad_token_id, np.int32)
    for row, target in enumerate(targets):
        tokens[row, : len(target)] = target
    lengths = np.asarray([len(t) for t in targets], np.int32)
    prompt_tokens, prompt_lengths = pad_prompts(lm, prompts, width)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
    return Rollout(prompt_tokens, prompt_lengths, jnp.asarray(tokens), jnp.asarray(lengths), jnp.zeros(tokens.shape, jnp.float32), jnp.asarray(mask))


@partial(jax.jit, static_argnames=("optimizer", "lora"))
def sft_update(lm: LanguageModel, state: TrainState, batch: Rollout, optimizer: optax.GradientTransformation, lora: bool = False):
    """One optax step on the mean token NLL −Σ log p(target) / Σ tokens (jitted).

    Args:
      lm: the base model; `state.trainable` are its params (or adapters when `lora`).
      state: the training state of `optimizer` (static).
      batch: from `sft_batch`.

    Returns:
      `(state, mean token NLL before the step)`.
    """

    def loss_fn(trainable):
        logp = score_rollout(policy_model(lm, trainable, lora), batch)
        return -jnp.sum(logp * batch.mask) / jnp.maximum(batch.mask.sum(), 1.0), None

    state, (loss, _, _) = optimize(optimizer, loss_fn, state, 1)
    return state, loss[0]
