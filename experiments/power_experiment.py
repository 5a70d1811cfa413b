"""Power sampling: accuracy vs decoded tokens of base, temperature 1/α, best-of-N, uniform-cut MH and entropy-cut MH.

On the stylized decision task (default, on the embedded `toy-decisions` model) every problem
is sampled by each method with C chains; MH chains record their state after every step, so
each MH method gives a whole accuracy-vs-tokens curve. Decoded tokens count everything a
method sampled, rejected proposals included. The exact p^α, base and temperature accuracies
of the model itself (by enumeration over the decision structure) give the reference lines
and the "tokens to reach 90% of exact p^α" column.

`--model exact` replaces the trained model by the exact data distribution of the task
(`--stretch-length` then sets the trace length, to measure how the uniform/entropy gap grows
with it). `--task arithmetic --model smollm2-135m-instruct` runs the same comparison on a
real model (graded by answer extraction; no exact reference).
"""

from __future__ import annotations

import argparse
import math
import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxsample as js
from jaxsample import mcmc, parallel
from jaxsample.decoding import pad_prompt
from jaxsample.errors import ArgumentError
from problems import (
    add_mesh_argument,
    add_problem_arguments,
    answers,
    check_problem_config,
    exact_record,
    experiment_mesh,
    grades,
    load_model_and_problems,
    record_from_result,
    selected_methods,
)
from report import summarize
from run_directory import RunDirectory

METHODS = ("base", "temperature", "mh_uniform", "mh_entropy", "best_of_n")  # run order: best-of-N matches an MH budget
MATCHED = ("mh_uniform", "mh_entropy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_problem_arguments(parser, problems_per_k=3, mcmc_steps=48)
    add_mesh_argument(parser)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")


def check_config(config: dict) -> None:
    methods = selected_methods(config, METHODS)
    check_problem_config(config)
    if "best_of_n" in methods and not {"mh_uniform", "mh_entropy"} & set(methods):
        raise ArgumentError("--methods: best_of_n matches an MH method's token budget; include mh_entropy or mh_uniform")


# ---------------------------------------------------------------------------------------
# Samplers (jitted once per prompt length; α and τ are traced)


@partial(jax.jit, static_argnames=("cut_law", "num_chains", "num_steps", "max_new_tokens", "top_k", "mesh"))
def mh_trajectory(key, lm, prompt, prompt_length, alpha, cut_law, num_chains, num_steps, max_new_tokens, top_k, mesh):
    """C chains of single-block MH; the completion of every chain after every step."""
    proposal = js.Proposal(temperature=1.0 / alpha, top_k=top_k, top_p=jnp.float32(1.0))
    init_key, run_key = jax.random.split(key)
    state = mcmc.init(init_key, lm, prompt, num_chains, max_new_tokens, proposal, prompt_length=prompt_length)
    state = parallel.constrain_rows(state, mesh)
    step = mcmc.build_kernel(lm, cut_law, proposal)

    def body(state, index):
        state, info = step(jax.random.fold_in(run_key, index), state, alpha, max_new_tokens)
        return state, (state.decode.tokens, info.accepted, info.tokens_decoded)

    _, (tokens, accepted, decoded) = jax.lax.scan(body, state, jnp.arange(num_steps))
    return parallel.replicate((state.decode.tokens, state.decode.length, tokens, accepted, decoded), mesh)


def run_mh(key, lm, problem, cut, config, max_new):
    cut_law = mcmc.resolve_cut_law("uniform" if cut == "mh_uniform" else "entropy")
    prompt, prompt_length = pad_prompt(lm, jnp.asarray(problem.prompt, jnp.int32), max_new)
    init_tokens, init_lengths, tokens, accepted, decoded = mh_trajectory(
        key, lm, prompt, prompt_length, jnp.float32(config["alpha"]), cut_law,
        config["chains"], config["mcmc_steps"], max_new, config["top_k"], experiment_mesh(config))
    states = np.concatenate([np.asarray(init_tokens)[None], np.asarray(tokens)])
    passed = grades(problem, states)
    accuracy = passed.mean(axis=1)
    spent = np.mean(np.asarray(init_lengths)) + np.concatenate([[0.0], np.cumsum(np.asarray(decoded).mean(axis=1))])
    return {
        "accuracy": float(accuracy[-1]),
        "tokens": float(spent[-1]),
        "acceptance": float(np.asarray(accepted).mean()) if config["mcmc_steps"] else float("nan"),
        "curve": [[float(t), float(a)] for t, a in zip(spent, accuracy)],
        "answers": answers(problem, states[-1], passed[-1]),
    }


def run_method(method, key, lm, problem, config, max_new, budget):
    """One sampling, MH or best-of-N unit. `budget` holds the problem's `base_length` (mean
    base-sample length, if base ran) and `matched_tokens` (best-of-N's token budget)."""
    prompt = jnp.asarray(problem.prompt, jnp.int32)
    common = dict(num_chains=config["chains"], max_new_tokens=max_new, top_k=config["top_k"],
                  mesh=experiment_mesh(config))
    if method in ("mh_uniform", "mh_entropy"):
        return run_mh(key, lm, problem, method, config, max_new)
    if method == "base":
        result = mcmc.base_sample(key, lm, prompt, **common)
    elif method == "temperature":
        result = mcmc.temperature_sample(key, lm, prompt, alpha=config["alpha"], **common)
    else:
        # Compute-matched: as many candidates as the matched budget pays for.
        mean_length = max(budget.get("base_length", float(max_new)), 1.0)
        candidates = max(1, math.ceil(budget["matched_tokens"] / mean_length))
        result = mcmc.best_of_n(key, lm, prompt, num_candidates=candidates, token_budget=int(round(budget["matched_tokens"])), **common)
        record = record_from_result(problem, result)
        record["candidates"] = candidates
        return record
    return record_from_result(problem, result)


# ---------------------------------------------------------------------------------------
# The run


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    lm, problems, max_new = load_model_and_problems(config)
    methods = selected_methods(config, METHODS)

    def run_unit(method, key, problem, budget):
        return run_method(method, key, lm, problem, config, max_new, budget)

    run_units(run_dir, "power", lm, problems, methods, run_unit, known=METHODS, matched=MATCHED)
    return summarize(run_dir, methods, "power sampling")


def run_units(run_dir: RunDirectory, command: str, lm, problems, methods, run_unit, *, known, matched) -> None:
    """Runs every (problem, method) unit the run directory has not finished, in order: the
    exact reference, then `run_unit(method, key, problem, budget) -> record` for each method.

    A unit's key depends on the seed, the problem and the method's place in `known` only, so
    resumed and fresh runs draw the same. `budget` holds what the problem's finished units
    set for the baselines that match the `matched` methods' token budget (`budget_fields`).
    """
    config = run_dir.config
    done = run_dir.done_keys()
    todo = [(p, m) for p in problems for m in ["exact", *methods] if f"{p.key}/{m}" not in done]
    run_dir.log.info("model %s, %d problems, methods %s, %d units to do", lm.name, len(problems), methods, len(todo))
    key = jax.random.key(config["seed"])
    budgets = {}
    for record in run_dir.finished:
        budgets.setdefault(record["problem"], {}).update(budget_fields(record, matched))
    with tqdm(todo, desc=f"{command} [{lm.name}]", unit="run") as bar:
        for problem, method in bar:
            bar.set_postfix(problem=problem.key, method=method)
            budget = budgets.setdefault(problem.key, {})
            if method == "exact":
                record = exact_record(lm, problem, config["alpha"])
            else:
                problem_key = jax.random.fold_in(key, zlib.crc32(problem.key.encode()))
                record = run_unit(method, jax.random.fold_in(problem_key, known.index(method)), problem, budget)
            record.update(key=f"{problem.key}/{method}", problem=problem.key, group=problem.group, method=method)
            budget.update(budget_fields(record, matched))
            run_dir.append(record)
            run_dir.log.info("%s %s accuracy=%.3f tokens=%.1f", problem.key, method, record.get("accuracy", float("nan")), record.get("tokens", float("nan")))


def budget_fields(record, matched_methods) -> dict:
    """What a finished record contributes to its problem's best-of-N budget."""
    if record["method"] == "base":
        return {"base_length": record["tokens"]}
    if record["method"] in matched_methods:  # in run order: the last one sets the budget
        return {"matched_tokens": record["tokens"]}
    return {}


