"""Shared pieces of the `grpo` and `codistill` experiments: tiny sorting models, SFT warm-up,
held-out evaluation, one GRPO run and one CoDistill run with accuracy curves."""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

from jaxsample.errors import ArgumentError
from jaxsample.models import ModelConfig, init_params, make_language_model
from jaxsample.tasks import sorting
from jaxsample.training import (
    CoDistillConfig,
    CoDistillState,
    GRPOConfig,
    codistill_step_fn,
    grpo_step_fn,
    init,
    pad_prompts,
    policy_model,
    rollout,
    sft_batch,
    sft_update,
)
from jaxsample.training.rewards import grade_groups
from jaxsample.validation import check_real

# training.md §2.5: S has 1 layer of width 32, L 3 layers of width 96.
SIZES = {"small": (32, 1), "large": (96, 3)}
SORT_LENGTH = 6


def add_training_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="RL steps per run")
    parser.add_argument("--prompts-per-step", type=int, default=16, help="B, prompts per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--num-epochs", type=int, default=1, help="μ, optax updates per batch")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate of the RL phase")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight toward the reference (start) model")
    parser.add_argument("--kl-kind", default="none", choices=["none", "k1_reward", "k2_loss", "k3_loss", "k3_ratio_loss"], help="KL estimator")
    parser.add_argument("--eps-high", type=float, default=0.28, help="upper clip ε_high (DAPO clip-higher)")
    parser.add_argument("--eval-problems", type=int, default=128, help="held-out problems for the accuracy curve")
    parser.add_argument("--eval-samples", type=int, default=4, help="temperature-1 samples per held-out problem")
    parser.add_argument("--eval-every", type=int, default=10, help="RL steps between held-out evaluations")
    parser.add_argument("--sft-steps-small", type=int, default=50, help="sorting: SFT warm-up steps of the small model")
    parser.add_argument("--sft-steps-large", type=int, default=100, help="sorting: SFT warm-up steps of the large model")


def check_training_config(config: dict) -> None:
    for name in ("steps", "prompts_per_step", "num_epochs", "eval_problems", "eval_samples", "eval_every"):
        if config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {config[name]}")
    if config["group_size"] < 2:
        raise ArgumentError(f"--group-size must be >= 2, got {config['group_size']}")
    for name in ("sft_steps_small", "sft_steps_large"):
        if config[name] < 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 0, got {config[name]}")
    if not config["learning_rate"] > 0:
        raise ArgumentError(f"--learning-rate must be > 0, got {config['learning_rate']}")
    check_real("--beta", config["beta"], "[0, inf)")
    # With no KL estimator the loss has no KL term, so β would change nothing.
    if config["beta"] > 0 and config["kl_kind"] == "none":
        raise ArgumentError(
            f"--beta {config['beta']:g} has no effect with --kl-kind none; choose a KL estimator "
            "(--kl-kind k1_reward, k2_loss, k3_loss or k3_ratio_loss) or leave --beta at 0"
        )


def grpo_config(config: dict, max_new_tokens: int, lora: bool = False) -> GRPOConfig:
    return GRPOConfig(
        eps_high=config["eps_high"], beta=config["beta"], group_size=config["group_size"], max_new_tokens=max_new_tokens,
        num_epochs=config["num_epochs"], kl_kind=config["kl_kind"], lora=lora,
    ).validated()


# ---------------------------------------------------------------------------------------
# The sorting task with tiny models


def sorting_reward(problems, tokens, lengths):
    return grade_groups(sorting.grade_sorting, problems, tokens, lengths)


def sorting_prompts(seed: int, size: int):
    """`t -> (prompts, problems)`: fresh length-6 lists, deterministic in (seed, t)."""

    def prompt_fn(t):
        problems = sorting.sample_sorting(np.random.default_rng([seed, t]), size, SORT_LENGTH)
        return [p.prompt for p in problems], problems

    return prompt_fn


def tiny_model(size: str, seed: int):
    hidden, layers = SIZES[size]
    config = ModelConfig(
        model_type="llama", vocab_size=sorting.VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4,
        max_position_embeddings=32, eos_token_ids=(sorting.EOS,), pad_token_id=sorting.PAD,
    )
    key = jax.random.fold_in(jax.random.key(seed), list(SIZES).index(size))
    return make_language_model(config, init_params(key, config), name=f"sort-{size}")


def warmed_up(size: str, seed: int, steps: int, batch_size: int = 64, learning_rate: float = 3e-3):
    """A tiny model after `steps` SFT steps on sorting lists of 2–6 digits (teacher forcing)."""
    lm = tiny_model(size, seed)
    optimizer = optax.adam(learning_rate)
    state = init(lm, optimizer)
    rng = np.random.default_rng([seed, 1, list(SIZES).index(size)])
    for _ in range(steps):
        problems = sorting.sample_sorting(rng, batch_size, (2, SORT_LENGTH))
        state, _ = sft_update(lm, state, sft_batch(lm, [p.prompt for p in problems], [p.answer for p in problems]), optimizer)
    return lm.replace(params=state.trainable)


class Evaluator:
    """Held-out accuracy: mean reward of temperature-1 samples on fixed problems."""

    def __init__(self, lm, problems, prompts, reward_fn, samples: int, max_new_tokens: int):
        self.problems, self.reward_fn, self.samples, self.max_new = problems, reward_fn, samples, max_new_tokens
        self.prompts, self.lengths = pad_prompts(lm, prompts, max_new_tokens)

    def __call__(self, policy, key) -> float:
        batch = rollout(key, policy, self.prompts, self.lengths, self.samples, self.max_new)
        return float(np.mean(self.reward_fn(self.problems, np.asarray(batch.tokens), np.asarray(batch.lengths))))


def sorting_held_out(seed: int, size: int):
    """The held-out sorting problems of `seed`: a stream no training step or warm-up draws from.

    [seed, 2] would be step 2's training batch ([seed, t]), and [seed, 2, 0] the same stream
    (SeedSequence pads with zeros); [seed, 2, 1] is neither.
    """
    return sorting.sample_sorting(np.random.default_rng([seed, 2, 1]), size, SORT_LENGTH)


def sorting_evaluator(lm, config: dict, seed: int) -> Evaluator:
    problems = sorting_held_out(seed, config["eval_problems"])
    return Evaluator(lm, problems, [p.prompt for p in problems], sorting_reward, config["eval_samples"], SORT_LENGTH + 1)


# ---------------------------------------------------------------------------------------
# Runs


def run_grpo(lm, state, config: dict, grpo: GRPOConfig, optimizer, prompt_fn, reward_fn, evaluate, seed: int, desc: str) -> dict:
    """GRPO from `state`; the held-out curve is [(step, accuracy, tokens generated so far)]."""
    step = grpo_step_fn(lm, grpo, optimizer, prompt_fn, reward_fn)
    state, curve, tokens, history = _train(
        step, state, config, seed, desc, "tokens_generated",
        lambda state, key: [evaluate(policy_model(lm, state.trainable, grpo.lora), key)],
    )
    return {
        "curve": curve,
        "initial_accuracy": curve[0][1],
        "final_accuracy": curve[-1][1],
        "tokens_generated": tokens,
        "tokens_generated_large": 0,
        **_median_phases(history, ("seconds_rollout", "seconds_reward", "seconds_update", "seconds_per_step")),
        "train_reward": float(np.mean([m["reward"] for m in history])),
        "zero_variance_fraction": float(np.mean([m["zero_variance_fraction"] for m in history])),
        "clip_fraction": float(np.mean([m["clip_fraction"] for m in history])),
        "state": state,
    }


def run_codistill(small_lm, large_lm, config: dict, cd: CoDistillConfig, prompt_fn, reward_fn, evaluate, seed: int, desc: str) -> dict:
    """CoDistill from the two warmed-up models; curves for both (the large one evaluated on its
    own samples, which cost nothing in training)."""
    optimizer = optax.adam(config["learning_rate"])
    step = codistill_step_fn(small_lm, large_lm, cd, optimizer, optimizer, prompt_fn, reward_fn)
    state = CoDistillState(init(small_lm, optimizer), init(large_lm, optimizer))
    _, curve, tokens, history = _train(
        step, state, config, seed, desc, "tokens_generated_small",
        lambda state, key: [evaluate(small_lm.replace(params=state.small.trainable), key),
                            evaluate(large_lm.replace(params=state.large.trainable), key)],
    )
    mean = lambda k: float(np.mean([m[k] for m in history]))  # noqa: E731
    return {
        "curve": curve,
        "tokens_generated": tokens,
        "tokens_generated_large": 0,
        "train_reward": mean("reward"),
        "zero_variance_fraction": mean("zero_variance_fraction"),
        "kd_reward": mean("kd_reward"),
        "iw_ess_fraction": mean("iw_ess_fraction"),
        "iw_capped_fraction": mean("iw_capped_fraction"),
        **_median_phases(history, ("seconds_rollout", "seconds_reward", "seconds_score_large", "seconds_update", "seconds_per_step")),
    }


def _train(step, state, config: dict, seed: int, desc: str, tokens_metric: str, evaluate_at):
    """`config["steps"]` calls of `step(key, state, t)`, timed, with a held-out point before the
    first and every `config["eval_every"]` steps. `evaluate_at(state, key)` gives a point's
    accuracies; a curve row is [step, *accuracies, `tokens_metric` summed so far].

    Returns `(state, curve, tokens, per-step metrics)`."""
    key = jax.random.key(seed)
    eval_key = jax.random.fold_in(key, 10**6)
    curve = [[0, *evaluate_at(state, jax.random.fold_in(eval_key, 0)), 0]]
    tokens, history = 0, []
    for t in tqdm(range(config["steps"]), desc=desc, unit="step", leave=False):
        started = time.perf_counter()
        state, metrics = step(jax.random.fold_in(key, t), state, t)
        metrics["seconds_per_step"] = time.perf_counter() - started
        tokens += metrics[tokens_metric]
        history.append(metrics)
        if (t + 1) % config["eval_every"] == 0 or t + 1 == config["steps"]:
            curve.append([t + 1, *evaluate_at(state, jax.random.fold_in(eval_key, t + 1)), tokens])
    return state, curve, tokens, history


def _median_phases(history: list[dict], keys) -> dict:
    """Median seconds per phase, leaving out the first step (compilation)."""
    steady = history[1:] or history
    return {k: float(np.median([m[k] for m in steady])) for k in keys}
