"""The GRPO trainer: rollouts from the decode loop, host-side grading, one jitted update.

One training step is three phases:

1. `rollout(key, lm, prompts, prompt_lengths, group_size, max_new_tokens)`: G completions of
   each of B prompts from the shared decode loop (`init_decode` + `extend`, the loop behind
   `js.generate`, batched over prompts), at temperature 1 so the recorded per-token log p is
   exactly log π_old of the policy being trained.
2. rewards `[B, G]` from a task grader on the host (`jaxsample.training.rewards`): graders
   parse text or run code, so they cannot live inside `jit`.
3. `grpo_update(lm, state, config, batch, rewards, optimizer)`: ONE jitted function running
   μ = `config.num_epochs` optax epochs over the batch in a `lax.scan`; log π_θ comes from
   `js.score` (one teacher-forced forward), log π_ref from the same model without the trained
   weights.

The trainable pytree is either all of the model's params (`lora=False`) or its LoRA adapters
(`lora=True`, `jaxsample.models.lora`); the model passed in is always the frozen reference.
`fit` runs the loop with an orbax checkpoint per `save_every` steps, JSONL metrics and a
progress bar; randomness and prompts of step t depend only on (seed, t), so a resumed run is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from jaxsample.decoding import extend, init_decode, pad_prompt
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.sampling import Proposal
from jaxsample.scoring import score
from jaxsample.training.grpo import (
    ADVANTAGE_MODES,
    AGGREGATIONS,
    KL_KINDS,
    group_advantages,
    policy_loss,
    zero_variance_fraction,
)
from jaxsample.validation import check_choice, check_int, check_int_array, check_real

Array = jax.Array


class Rollout(NamedTuple):
    """S = B·G completions, rows in group order (row b·G + g is sample g of prompt b).

    Attributes:
      prompts: int32 `[S, T]` right-padded prompts.
      prompt_lengths: int32 `[S]`.
      tokens: int32 `[S, N]` generated tokens (pad id after the stop token).
      lengths: int32 `[S]` generated tokens, the stop token included.
      logp_old: float32 `[S, N]` log π_old of each generated token (0 after the length).
      mask: float32 `[S, N]` 1 on generated tokens.
    """

    prompts: Array
    prompt_lengths: Array
    tokens: Array
    lengths: Array
    logp_old: Array
    mask: Array


class TrainState(NamedTuple):
    """The state `fit` carries (and checkpoints) between updates.

    Attributes:
      trainable: what the optimizer updates: the params pytree, or `LoraAdapters`.
      opt_state: the optax state of `trainable`.
      step: int32 `[]` updates made so far (one per `grpo_update`, whatever μ).
    """

    trainable: Any
    opt_state: Any
    step: Array


@struct.dataclass
class GRPOConfig:
    """GRPO hyperparameters. Floats are traced (changing them does not recompile).

    Attributes:
      eps_low, eps_high: clip range (DAPO clip-higher: eps_high = 0.28).
      beta: KL weight toward the reference model.
      eps_std: ε added to the group std.
      group_size: G ≥ 2 completions per prompt.
      max_new_tokens: N.
      num_epochs: μ ≥ 1 optax updates per batch (μ = 1: on-policy, ρ = exp(logp − sg logp)).
      kl_kind, advantage_mode, aggregation: see `jaxsample.training.grpo`.
      lora: train LoRA adapters (the model's `adapters`) instead of all params.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    eps_std: float = 1e-6
    group_size: int = struct.field(pytree_node=False, default=8)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    num_epochs: int = struct.field(pytree_node=False, default=1)
    kl_kind: str = struct.field(pytree_node=False, default="none")
    advantage_mode: str = struct.field(pytree_node=False, default="grpo")
    aggregation: str = struct.field(pytree_node=False, default="seq_mean_token_mean")
    lora: bool = struct.field(pytree_node=False, default=False)

    def validated(self) -> "GRPOConfig":
        """Checks every field, raising `ArgumentError` naming the one out of range."""
        for name in ("group_size", "max_new_tokens", "num_epochs"):
            value = getattr(self, name)
            low = 2 if name == "group_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ArgumentError(f"{name} must be an int >= {low}, got {value!r}")
        check_real("eps_low", self.eps_low, "[0, 1)")
        check_real("eps_high", self.eps_high, "[0, inf]")
        check_real("beta", self.beta, "[0, inf]")
        check_real("eps_std", self.eps_std, "[0, inf]")
        check_choice("kl_kind", self.kl_kind, KL_KINDS)
        check_choice("advantage_mode", self.advantage_mode, ADVANTAGE_MODES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        return self


class UpdateInfo(NamedTuple):
    """Per-update diagnostics: float32 `[]` each, the per-epoch ones averaged over the μ epochs.

    Attributes:
      loss: the GRPO loss −J (`policy_loss`) before each epoch's step.
      reward: mean task reward over the B·G completions of the rollout.
      zero_variance_fraction: fraction of the B groups whose G rewards are all equal (they
        carry no GRPO signal; `zero_variance_fraction`).
      clip_fraction: masked token mean of "the clipped branch of the min is active".
      mean_ratio: masked token mean of ρ = π_θ / π_old (1 on-policy).
      approx_kl: k3 estimate of KL(π_old ‖ π_θ), masked token mean of ρ − 1 − log ρ.
      kl: masked token mean of the reference-KL estimator of `kl_kind` (0 for "none").
      entropy: masked token mean of the next-token entropy of π_θ.
      grad_norm: global L2 norm of the loss gradient w.r.t. the trainable pytree.
    """

    loss: Array
    reward: Array
    zero_variance_fraction: Array
    clip_fraction: Array
    mean_ratio: Array
    approx_kl: Array
    kl: Array
    entropy: Array
    grad_norm: Array


def policy_model(lm: LanguageModel, trainable: Any, lora: bool) -> LanguageModel:
    """The model with its trainable part replaced (`lm` itself is the frozen reference)."""
    return lm.replace(adapters=trainable) if lora else lm.replace(params=trainable)


def init(lm: LanguageModel, optimizer: optax.GradientTransformation, trainable: Any = None, lora: bool = False) -> TrainState:
    """A fresh training state.

    Args:
      lm: the reference model.
      optimizer: an optax transformation.
      trainable: the initial trainable pytree: LoRA adapters (required when `lora`), or
        params (default `lm.params`).
      lora: whether `trainable` is LoRA adapters.
    """
    if lora and trainable is None:
        raise ArgumentError("lora=True needs trainable=LoRA adapters (jaxsample.models.lora.init_lora)")
    if trainable is None:
        trainable = lm.params
    return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def pad_prompts(lm: LanguageModel, prompts: list, max_new_tokens: int) -> tuple[Array, Array]:
    """Right-pads B prompts to one power-of-two bucket (see `jaxsample.decoding.pad_prompt`).

    Returns:
      `(tokens int32 [B, T], lengths int32 [B])`.
    """
    if not prompts:
        raise ArgumentError("prompts must hold at least one prompt")
    longest = max(prompts, key=len)
    width = pad_prompt(lm, jnp.asarray(longest, jnp.int32), max_new_tokens)[0].shape[0]
    tokens = np.full((len(prompts), width), lm.pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def rollout(key: Array, lm: LanguageModel, prompts: Array, prompt_lengths: Array, group_size: int, max_new_tokens: int) -> Rollout:
    """G temperature-1 completions of each of B prompts in one batched decode loop.

    Args:
      key: PRNG key.
      lm: the sampling policy (adapters included).
      prompts: int32 `[B, T]` right-padded (see `pad_prompts`).
      prompt_lengths: int32 `[B]`, each in `[1, T]` (checked when concrete: a length of 0 or
        past T would decode from a wrapped or padded position).
      group_size: G.
      max_new_tokens: N.
    """
    if np.ndim(prompts) != 2 or np.shape(prompt_lengths) != np.shape(prompts)[:1]:
        raise ArgumentError(
            f"prompts must have shape [B, T] and prompt_lengths [B], got {np.shape(prompts)} and {np.shape(prompt_lengths)}"
        )
    check_int_array("prompt_lengths", prompt_lengths, 1, np.shape(prompts)[1] + 1, "the prompt width")
    group_size = check_int("group_size", group_size, 1)
    return _rollout(key, lm, prompts, prompt_lengths, group_size, max_new_tokens)


@partial(jax.jit, static_argnames=("group_size", "max_new_tokens"))
def _rollout(key: Array, lm: LanguageModel, prompts: Array, prompt_lengths: Array, group_size: int, max_new_tokens: int) -> Rollout:
    prompts = jnp.repeat(prompts, group_size, axis=0)
    prompt_lengths = jnp.repeat(prompt_lengths, group_size, axis=0)
    state = init_decode(lm, prompts, prompts.shape[0], max_new_tokens, prompt_lengths=prompt_lengths)
    state, _ = extend(key, lm, state, max_new_tokens, Proposal().validated())
    mask = (jnp.arange(max_new_tokens)[None, :] < state.length[:, None]).astype(jnp.float32)
    return Rollout(prompts, prompt_lengths, state.tokens, state.length, state.log_p, mask)


def score_rollout(lm: LanguageModel, batch: Rollout, with_entropy: bool = False):
    """log p `[S, N]` of the rollout's tokens under `lm` (teacher-forced, differentiable)."""
    return score(lm, batch.prompts, batch.tokens, batch.lengths, prompt_lengths=batch.prompt_lengths, with_entropy=with_entropy)


def optimize(optimizer: optax.GradientTransformation, loss_fn: Callable, state: TrainState, num_epochs: int):
    """μ = `num_epochs` optax steps on `loss_fn(trainable) -> (loss, aux)` in one `lax.scan`.

    Returns:
      `(state, (loss [μ], aux stacked over epochs, grad_norm [μ]))`.
    """

    def epoch(carry, _):
        trainable, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), (loss, aux, optax.tree.norm(grads))

    (trainable, opt_state), history = jax.lax.scan(epoch, (state.trainable, state.opt_state), length=num_epochs)
    return TrainState(trainable, opt_state, state.step + 1), history


def update_info(rewards: Array, loss: Array, metrics, grad_norm: Array) -> UpdateInfo:
    """`UpdateInfo` from the per-epoch history of `optimize` (averaged over the epochs)."""
    return UpdateInfo(
        loss=loss.mean(), reward=rewards.mean(), zero_variance_fraction=zero_variance_fraction(rewards),
        clip_fraction=metrics.clip_fraction.mean(), mean_ratio=metrics.mean_ratio.mean(),
        approx_kl=metrics.approx_kl.mean(), kl=metrics.kl.mean(), entropy=metrics.entropy.mean(),
        grad_norm=grad_norm.mean(),
    )


def reference_log_probs(lm: LanguageModel, config: GRPOConfig, batch: Rollout) -> Array | None:
    """log π_ref of the rollout (`lm` is the reference), or None when no KL term is used."""
    return None if config.kl_kind == "none" else jax.lax.stop_gradient(score_rollout(lm, batch))


def loss_options(config: GRPOConfig) -> dict:
    """The `policy_loss` keyword options a config sets."""
    return dict(eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta, kl_kind=config.kl_kind, aggregation=config.aggregation)


@partial(jax.jit, static_argnames="optimizer")
def grpo_update(lm: LanguageModel, state: TrainState, config: GRPOConfig, batch: Rollout, rewards: Array, optimizer: optax.GradientTransformation):
    """One GRPO update, jitted: μ = `config.num_epochs` full-batch optax steps in a `lax.scan`.

    Args:
      lm: the frozen reference model (the policy is it with `state.trainable`).
      state: the training state; `state.opt_state` belongs to `optimizer`.
      config: hyperparameters.
      batch: a `Rollout` of the policy.
      rewards: float `[B, G]`.
      optimizer: static (compiled once per optimizer object).

    Returns:
      `(state, UpdateInfo)`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    advantages = group_advantages(rewards, config.advantage_mode, config.eps_std).reshape(-1)
    logp_ref = reference_log_probs(lm, config, batch)
    logp_old = batch.logp_old if config.num_epochs > 1 else None

    def loss_fn(trainable):
        logp, entropy = score_rollout(policy_model(lm, trainable, config.lora), batch, with_entropy=True)
        return policy_loss(logp, logp_old, logp_ref, advantages, batch.mask, entropy=entropy, **loss_options(config))

    state, (loss, metrics, grad_norm) = optimize(optimizer, loss_fn, state, config.num_epochs)
    return state, update_info(rewards, loss, metrics, grad_norm)


# ---------------------------------------------------------------------------------------
# The loop: checkpoints, metrics, progress


class Checkpointer:
    """Orbax `CheckpointManager` over a training state pytree (keeps the last `max_to_keep`)."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint in the directory, or None when there is none."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves `state` as checkpoint `step` and waits until it is written."""
        self.manager.save(step, args=self._ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, state_like: Any, step: int | None = None) -> Any:
        """The state saved at `step` (default the latest), with the structure of `state_like`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype), state_like)
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return jax.tree.map(jnp.asarray, restored)


def fit(
    step_fn: Callable[[Array, Any, int], tuple[Any, dict]],
    state: Any,
    key: Array,
    num_steps: int,
    *,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 10,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> Any:
    """Runs `state, metrics = step_fn(fold_in(key, t), state, t)` for t up to `num_steps`.

    With `checkpoint_dir`, the state is saved every `save_every` steps and at the end, and a
    call finding a checkpoint there resumes after its step (drop the directory to restart).
    Each step's metrics (a dict of floats) are appended to `metrics_path` as one JSON line
    with the step number (on resume, lines of steps after the checkpoint are dropped and
    redone). Because step t sees only `fold_in(key, t)` and its own index, a
    resumed run reproduces an uninterrupted one bit for bit.
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ArgumentError(f"num_steps must be a non-negative int, got {num_steps!r}")
    if not isinstance(save_every, int) or save_every < 1:
        raise ArgumentError(f"save_every must be a positive int, got {save_every!r}")
    checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        start = checkpointer.latest_step()
        state = checkpointer.restore(state)
        if metrics_path is not None and Path(metrics_path).exists():  # steps after the checkpoint are redone
            lines = Path(metrics_path).read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start]
            Path(metrics_path).write_text("".join(line + "\n" for line in kept))
    with tqdm(range(start, num_steps), desc=desc, disable=not progress, unit="step") as bar:
        for t in bar:
            state, metrics = step_fn(jax.random.fold_in(key, t), state, t)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("reward", "accuracy", "clip_fraction")})
            if metrics_path is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": t + 1, **metrics}, sort_keys=True) + "\n")
            if checkpointer is not None and ((t + 1) % save_every == 0 or t + 1 == num_steps):
                checkpointer.save(t + 1, state)
    return state


def sample_and_grade(key, policy: LanguageModel, config: GRPOConfig, prompts: list, problems, reward_fn: Callable):
    """Phases 1 and 2 of a step: a rollout of `policy` and its rewards, with wall times.

    Returns:
      `(batch: Rollout, rewards float32 [B, G], metrics dict)`.

    Raises:
      ArgumentError: `reward_fn` returned the wrong shape or a non-finite reward (named by its
        [problem, sample] index).
    """
    prompt_tokens, prompt_lengths = pad_prompts(policy, prompts, config.max_new_tokens)
    started = time.perf_counter()
    batch = jax.block_until_ready(rollout(key, policy, prompt_tokens, prompt_lengths, config.group_size, config.max_new_tokens))
    sampled = time.perf_counter()
    rewards = np.asarray(reward_fn(problems, np.asarray(batch.tokens), np.asarray(batch.lengths)), np.float32)
    if rewards.shape != (len(prompts), config.group_size):
        raise ArgumentError(f"reward_fn returned shape {rewards.shape}, expected {(len(prompts), config.group_size)}")
    # The jitted update cannot check them: one NaN or ±inf would turn every parameter into NaN.
    check_real("reward_fn's rewards[problem, sample]", rewards, "(-inf, inf)")
    metrics = {
        "accuracy": float(np.mean(rewards >= 1.0)),
        "tokens_generated": int(np.asarray(batch.lengths).sum()),
        "seconds_rollout": sampled - started,
        "seconds_reward": time.perf_counter() - sampled,
    }
    return batch, jnp.asarray(rewards), metrics


def grpo_step_fn(
    lm: LanguageModel,
    config: GRPOConfig,
    optimizer: optax.GradientTransformation,
    prompt_fn: Callable[[int], tuple[list, Any]],
    reward_fn: Callable[[Any, np.ndarray, np.ndarray], np.ndarray],
) -> Callable:
    """One GRPO step for `fit`: sample, grade, update, with wall time per phase.

    Args:
      lm: the frozen reference model (the policy is it with `state.trainable`).
      config: hyperparameters.
      optimizer: the optax transformation `state.opt_state` belongs to.
      prompt_fn: `t -> (prompts: B token-id lists, problems)`, deterministic in t.
      reward_fn: `(problems, tokens int [S, N], lengths int [S]) -> rewards float [B, G]`,
        finite (`jaxsample.training.rewards`); rewards ≥ 1 count as correct for the accuracy metric.
    """
    config = config.validated()

    def step(key, state: TrainState, t: int):
        prompts, problems = prompt_fn(t)
        batch, rewards, metrics = sample_and_grade(key, policy_model(lm, state.trainable, config.lora), config, prompts, problems, reward_fn)
        started = time.perf_counter()
        state, info = jax.block_until_ready(grpo_update(lm, state, config, batch, rewards, optimizer))
        metrics["seconds_update"] = time.perf_counter() - started
        metrics.update({k: float(v) for k, v in info._asdict().items()})
        return state, metrics

    return step
