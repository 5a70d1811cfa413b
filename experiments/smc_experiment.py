"""Reward-guided SMC: accuracy vs decoded tokens of base, best-of-N, Power-SMC, reward SMC, reward SMC + rejuvenation and the MH samplers.

Each SMC run returns N weighted particles; its accuracy is the probability that the one
answer it outputs (a particle drawn ∝ W) is correct, Σ_i W_i·correct_i, averaged over
`--runs` independent runs, and its cost is every token it decoded (extension, rejuvenation
proposals, rejected ones included) per answer. MH chains count their whole trajectory per
answer; best-of-N gets as many candidates as reward SMC's budget pays for and picks by mean
log-likelihood (no verifier).

Rewards (π ∝ p^α exp(λ r)): on the decision task a process verifier giving one point per
completed item that matches the reference trace (it scores every prefix, so SMC reweights
at item boundaries); on arithmetic an outcome check, 1 once the answer's tokens appear.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_real
from power_experiment import run_method, run_units
from problems import (
    add_mesh_argument,
    add_problem_arguments,
    answers,
    check_problem_config,
    experiment_mesh,
    grades,
    item_length as task_item_length,
    load_model_and_problems,
    selected_methods,
)
from report import summarize
from run_directory import RunDirectory

METHODS = ("base", "power_smc", "reward_smc", "reward_smc_rejuv", "mh_uniform", "mh_entropy", "best_of_n")
MATCHED = ("reward_smc",)  # best-of-N gets reward SMC's token budget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_problem_arguments(parser, problems_per_k=2, mcmc_steps=24)
    add_mesh_argument(parser)
    parser.add_argument("--lam", type=float, default=3.0, help="reward inverse temperature λ of reward SMC")
    parser.add_argument("--particles", type=int, default=16, help="SMC particles N")
    parser.add_argument("--block-size", type=int, default=0, help="tokens between SMC reweightings (0: one decision-task item, 8 for arithmetic)")
    parser.add_argument("--rejuvenation-steps", type=int, default=2, help="MH rejuvenation moves after each resampling (reward_smc_rejuv)")
    parser.add_argument("--runs", type=int, default=4, help="independent SMC runs per problem")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")


def check_config(config: dict) -> None:
    methods = selected_methods(config, METHODS)
    check_problem_config(config, positive=("particles", "runs", "chains", "problems_per_k", "num_problems"),
                         non_negative=("mcmc_steps", "rejuvenation_steps", "block_size"))
    check_real("--lam", config["lam"], "(-inf, inf)")
    if config["task"] in ("math500", "humaneval") and {"reward_smc", "reward_smc_rejuv"} & set(methods):
        raise ArgumentError(f"--task {config['task']} has no in-JAX verifier reward; choose --methods from base, power_smc, mh_uniform, mh_entropy")
    if "best_of_n" in methods and "reward_smc" not in methods:
        raise ArgumentError("--methods: best_of_n matches reward_smc's token budget; include reward_smc")


# ---------------------------------------------------------------------------------------
# Rewards: module-level functions, so a new problem changes only the Partial's arrays.


@functools.lru_cache(maxsize=None)
def item_verifier(item_length: int):
    """r(prefix) = completed items equal to the reference trace's items."""

    def credit(reference, tokens, length):
        matches = (tokens == reference).reshape(-1, item_length).all(axis=1)
        completed = (jnp.arange(matches.shape[0]) + 1) * item_length <= length
        return jnp.sum(matches & completed).astype(jnp.float32)

    return credit


def contains_answer(answer, tokens, length):
    """r = 1 once the answer's token sequence appears within the first `length` tokens.

    `answer` holds the answer's tokens, then -1 up to a width shared by a batch of problems
    (`answer_rewards`), so that their rewards stack into one batched SMC call."""
    width = jnp.sum(answer >= 0)
    beyond = jnp.full(answer.shape, -1, tokens.dtype)  # windows past the end match nothing real
    windows = jnp.concatenate([tokens, beyond])[jnp.arange(tokens.shape[0])[:, None] + jnp.arange(answer.shape[0])]
    found = jnp.all((windows == answer) | (answer < 0), axis=1) & (jnp.arange(tokens.shape[0]) + width <= length)
    return jnp.any(found).astype(jnp.float32)


def rewards_for(problems, lm, task_item_length, max_new):
    """Each problem's reward, `Partial`s of one function with arrays of one shape."""
    if problems[0].exact is not None:
        references = []
        for problem in problems:
            reference = np.full(max_new, lm.pad_token_id, np.int32)
            trace = np.asarray(problem.exact.correct_trace)
            reference[: len(trace)] = trace
            references.append(reference)
        return [Partial(item_verifier(task_item_length), jnp.asarray(reference)) for reference in references]
    answers = [lm.tokenizer.encode(str(problem.answer)) for problem in problems]
    width = -(-max(len(answer) for answer in answers) // 8) * 8
    return [Partial(contains_answer, jnp.asarray(answer + [-1] * (width - len(answer)), jnp.int32))
            for answer in answers]


# ---------------------------------------------------------------------------------------


def run_smc(keys, lm, problems, alphas, method, config, max_new, block_size, rewards):
    """Every run of every problem as one batched `smc_decode` call (problem-major, run r of a
    problem with its key folded with r, at the problem's α); one record per problem.
    `rewards`: one per problem, None for Power-SMC."""
    runs = config["runs"]
    results = js.smc_decode(
        jnp.stack([jax.random.fold_in(key, run) for key in keys for run in range(runs)]), lm,
        [problem.prompt for problem in problems for _ in range(runs)],
        None if rewards is None else [reward for reward in rewards for _ in range(runs)],
        num_particles=config["particles"], max_new_tokens=max_new,
        alpha=jnp.asarray([alpha for alpha in alphas for _ in range(runs)], jnp.float32),
        lam=0.0 if method == "power_smc" else config["lam"], block_size=block_size,
        num_rejuvenation_steps=config["rejuvenation_steps"] if method == "reward_smc_rejuv" else 0,
        top_k=config["top_k"], mesh=experiment_mesh(config),
    )
    return [smc_record(problem, results[index * runs:(index + 1) * runs]) for index, problem in enumerate(problems)]


def smc_record(problem, results) -> dict:
    """A problem's record from its runs' `SMCResult`s."""
    accuracies, tokens, ess, written, all_zero_runs = [], [], [], [], 0
    for run, result in enumerate(results):
        weights = np.exp(np.asarray(result.log_weights, np.float64))
        passed = grades(problem, result.tokens)
        all_zero = bool(result.all_zero)  # no particle left to answer: scored 0, and counted
        all_zero_runs += all_zero
        accuracies.append(0.0 if all_zero else float(np.sum(weights * passed)))
        written += [dict(row, run=run) for row in answers(problem, result.tokens, passed, weights)]
        tokens.append(float(result.num_decoded))
        ess.append(float(np.mean(np.asarray(result.ess))))
    accuracy, spent = float(np.mean(accuracies)), float(np.mean(tokens))
    return {"accuracy": accuracy, "tokens": spent, "acceptance": float("nan"), "mean_ess": float(np.mean(ess)),
            "curve": [[spent, accuracy]], "answers": written, "all_zero_runs": all_zero_runs}


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    lm, problems, max_new = load_model_and_problems(config)
    item_length = task_item_length(config) if config["task"] == "decisions" else 1
    block_size = config["block_size"] or (item_length if config["task"] == "decisions" else 8)
    if max_new % block_size and config["task"] == "decisions":
        raise ArgumentError(f"--block-size {block_size} must divide the trace length {max_new}")
    methods = selected_methods(config, METHODS)

    def run_batch(method, keys, batch, alphas, budgets):
        if method in ("power_smc", "reward_smc", "reward_smc_rejuv"):
            rewards = None if method == "power_smc" else rewards_for(batch, lm, item_length, max_new)
            return run_smc(keys, lm, batch, alphas, method, config, max_new, block_size, rewards)
        return run_method(method, keys, lm, batch, alphas, config, max_new, budgets)

    run_units(run_dir, "smc", lm, problems, methods, run_batch, known=METHODS, matched=MATCHED)
    return summarize(run_dir, methods, "SMC decoding")

