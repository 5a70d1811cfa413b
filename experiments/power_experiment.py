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
from jaxsample.decoding import pad_prompts
from jaxsample.errors import ArgumentError
from problems import (
    add_mesh_argument,
    add_problem_arguments,
    alpha_values,
    answers,
    check_problem_config,
    exact_record,
    experiment_mesh,
    grades,
    load_model_and_problems,
    record_from_result,
    selected_methods,
)
from report import ALPHA_FREE, summarize
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
# Samplers (jitted once per batch size and prompt length bucket; α and τ are traced). Each
# takes a batch of problems, one key and one α per problem, and gives every problem the draws
# of a run of it alone at its α (`--batch-problems` changes only the speed).


@partial(jax.jit, static_argnames=("cut_law", "num_chains", "num_steps", "max_new_tokens", "top_k", "mesh"))
def mh_trajectory(keys, lm, prompts, prompt_lengths, alpha, cut_law, num_chains, num_steps, max_new_tokens, top_k, mesh):
    """C chains of single-block MH per prompt (rows prompt-major) at each prompt's α `[P]`;
    the completion of every chain after every step."""
    proposal = js.Proposal(temperature=1.0 / alpha, top_k=top_k, top_p=jnp.float32(1.0))
    init_keys, run_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    state = mcmc.init(init_keys, lm, prompts, num_chains, max_new_tokens, proposal, prompt_length=prompt_lengths)
    state = parallel.constrain_rows(state, mesh)
    step = mcmc.build_kernel(lm, cut_law, proposal)

    def body(state, index):
        state, info = step(jax.vmap(jax.random.fold_in, (0, None))(run_keys, index), state, alpha, max_new_tokens)
        return state, (state.decode.tokens, info.accepted, info.tokens_decoded)

    _, (tokens, accepted, decoded) = jax.lax.scan(body, state, jnp.arange(num_steps))
    return parallel.replicate((state.decode.tokens, state.decode.length, tokens, accepted, decoded), mesh)


def run_mh(keys, lm, problems, alphas, cut, config, max_new):
    cut_law = mcmc.resolve_cut_law("uniform" if cut == "mh_uniform" else "entropy")
    prompts, prompt_lengths = pad_prompts(lm, [problem.prompt for problem in problems], max_new)
    outputs = mh_trajectory(
        keys, lm, prompts, prompt_lengths, jnp.asarray(alphas, jnp.float32), cut_law,
        config["chains"], config["mcmc_steps"], max_new, config["top_k"], experiment_mesh(config))
    init_tokens, init_lengths, tokens, accepted, decoded = (np.asarray(x) for x in outputs)
    records = []
    for rows, problem in zip(_problem_rows(problems, config["chains"]), problems):
        states = np.concatenate([init_tokens[None, rows], tokens[:, rows]])
        passed = grades(problem, states)
        accuracy = passed.mean(axis=1)
        spent = np.mean(init_lengths[rows]) + np.concatenate([[0.0], np.cumsum(decoded[:, rows].mean(axis=1))])
        records.append({
            "accuracy": float(accuracy[-1]),
            "tokens": float(spent[-1]),
            "acceptance": float(accepted[:, rows].mean()) if config["mcmc_steps"] else float("nan"),
            "curve": [[float(t), float(a)] for t, a in zip(spent, accuracy)],
            "answers": answers(problem, states[-1], passed[-1]),
        })
    return records


def _problem_rows(problems, chains):
    """Each problem's rows of a batch (prompt-major)."""
    return [slice(i * chains, (i + 1) * chains) for i in range(len(problems))]


def run_method(method, keys, lm, problems, alphas, config, max_new, budgets):
    """One sampling, MH or best-of-N method on a batch of problems (`keys` `[P]`, one per
    problem, and `alphas`, one α per problem; None for base); a record per problem. `budgets`
    holds each problem's `base_length` (mean base-sample length, if base ran) and
    `matched_tokens` (best-of-N's token budget, at the problem's α)."""
    if method in ("mh_uniform", "mh_entropy"):
        return run_mh(keys, lm, problems, alphas, method, config, max_new)
    common = dict(num_chains=config["chains"], max_new_tokens=max_new, top_k=config["top_k"],
                  mesh=experiment_mesh(config))
    prompts = [jnp.asarray(problem.prompt, jnp.int32) for problem in problems]
    if method == "best_of_n":
        return _best_of_n(keys, lm, problems, prompts, common, max_new, budgets)
    if method == "base":
        result = mcmc.base_sample(keys, lm, prompts, **common)
    else:
        result = mcmc.temperature_sample(keys, lm, prompts, alpha=jnp.asarray(alphas, jnp.float32), **common)
    return [record_from_result(problem, result.tokens[rows], result.tokens_decoded[rows])
            for rows, problem in zip(_problem_rows(problems, config["chains"]), problems)]


def _best_of_n(keys, lm, problems, prompts, common, max_new, budgets):
    """Compute-matched: as many candidates as each problem's matched budget pays for. The
    candidate count shapes the batch, so problems run together only when their counts agree."""
    candidates = [max(1, math.ceil(budget["matched_tokens"] / max(budget.get("base_length", float(max_new)), 1.0)))
                  for budget in budgets]
    records = [None] * len(problems)
    for count in sorted(set(candidates)):
        same = [i for i, c in enumerate(candidates) if c == count]
        result = mcmc.best_of_n(
            keys[jnp.asarray(same)], lm, [prompts[i] for i in same], num_candidates=count,
            token_budget=[[int(round(budgets[i]["matched_tokens"]))] for i in same], **common)
        for rows, i in zip(_problem_rows(same, common["num_chains"]), same):
            records[i] = record_from_result(problems[i], result.tokens[rows], result.tokens_decoded[rows])
            records[i]["candidates"] = count
    return records


# ---------------------------------------------------------------------------------------
# The run


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    lm, problems, max_new = load_model_and_problems(config)
    methods = selected_methods(config, METHODS)

    def run_batch(method, keys, batch, alphas, budgets):
        return run_method(method, keys, lm, batch, alphas, config, max_new, budgets)

    run_units(run_dir, "power", lm, problems, methods, run_batch, known=METHODS, matched=MATCHED)
    return summarize(run_dir, methods, "power sampling")


def run_units(run_dir: RunDirectory, command: str, lm, problems, methods, run_batch, *, known, matched) -> None:
    """Runs every (problem, method, α) unit the run directory has not finished: for each batch
    of `--batch-problems` problems in order, the exact references, then each method on the
    batch's problems that still need it, at every α of `--alpha` (once for `ALPHA_FREE`
    methods), as one `run_batch(method, keys [P], problems, alphas, budgets) -> records`
    over the problem × α pairs.

    A unit's key depends on the seed, the problem and the method's place in `known` only, so
    resumed, fresh and differently batched runs draw the same, and every α of a problem draws
    from one key. `budgets` hold what each problem's finished units set for the baselines that
    match the `matched` methods' token budget at the same α (`budget_fields`).
    """
    config = run_dir.config
    done = run_dir.done_keys()
    size = config["batch_problems"]
    alphas = alpha_values(config)
    units = ["exact", *methods]

    def levels(method):
        return [None] if method in ALPHA_FREE else alphas

    def unit_key(problem, method, alpha):
        return f"{problem.key}/{method}" + (f"/alpha={alpha:g}" if len(alphas) > 1 and alpha is not None else "")

    todo = sum(unit_key(p, m, a) not in done for p in problems for m in units for a in levels(m))
    run_dir.log.info("model %s, %d problems in batches of %d, methods %s, α %s, %d units to do",
                     lm.name, len(problems), size, methods, alphas, todo)
    key = jax.random.key(config["seed"])
    budgets = {}  # (problem key, α or None for every α) -> budget fields
    for record in run_dir.finished:
        budgets.setdefault((record["problem"], record.get("alpha")), {}).update(budget_fields(record, matched))

    def budget(problem, alpha):
        return budgets.get((problem.key, None), {}) | budgets.get((problem.key, alpha), {})

    with tqdm(total=todo, desc=f"{command} [{lm.name}]", unit="run") as bar:
        for start in range(0, len(problems), size):
            for method in units:
                batch = [(p, a) for p in problems[start:start + size] for a in levels(method)
                         if unit_key(p, method, a) not in done]
                if not batch:
                    continue
                first, last = batch[0][0].key, batch[-1][0].key
                bar.set_postfix(problems=f"{first}..{last}" if first != last else first, method=method)
                if method == "exact":
                    records = [exact_record(lm, problem, alpha) for problem, alpha in batch]
                else:
                    keys = jnp.stack([
                        jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(p.key.encode())), known.index(method))
                        for p, _ in batch])
                    records = run_batch(method, keys, [p for p, _ in batch], [a for _, a in batch],
                                        [budget(p, a) for p, a in batch])
                for (problem, alpha), record in zip(batch, records):
                    record.update(key=unit_key(problem, method, alpha), problem=problem.key, group=problem.group,
                                  method=method, alpha=alpha)
                    budgets.setdefault((problem.key, alpha), {}).update(budget_fields(record, matched))
                    run_dir.append(record)
                    run_dir.log.info("%s %s%s accuracy=%.3f tokens=%.1f", problem.key, method,
                                     "" if alpha is None else f" α={alpha:g}",
                                     record.get("accuracy", float("nan")), record.get("tokens", float("nan")))
                bar.update(len(batch))


def budget_fields(record, matched_methods) -> dict:
    """What a finished record contributes to its problem's best-of-N budget."""
    if record["method"] == "base":
        return {"base_length": record["tokens"]}
    if record["method"] in matched_methods:  # in run order: the last one sets the budget
        return {"matched_tokens": record["tokens"]}
    return {}


