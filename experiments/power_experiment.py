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
from run_directory import RunDirectory, markdown_table
from jaxsample import mcmc, tasks
from jaxsample.errors import ArgumentError
from jaxsample.models.registry import resolve

METHODS = ("base", "temperature", "mh_uniform", "mh_entropy", "best_of_n")  # run order: best-of-N matches an MH budget
LABELS = {
    "base": "base (τ=1)",
    "temperature": "temperature 1/α",
    "best_of_n": "best-of-N (mean log p)",
    "mh_uniform": "MH, uniform cuts",
    "mh_entropy": "MH, entropy cuts",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy-decisions", help="registered name, HF checkpoint directory, .gguf file, or 'exact' (the decision task's exact data distribution)")
    parser.add_argument("--task", default="decisions", choices=["decisions", "arithmetic"], help="problem family")
    parser.add_argument("--decisions", default="1,2,3,4", help="decision task: comma-separated numbers of decisions K per problem")
    parser.add_argument("--problems-per-k", type=int, default=3, help="decision task: problems per value of K")
    parser.add_argument("--stretch-length", type=int, default=8, help="decision task with --model exact: tokens L after each decision")
    parser.add_argument("--num-problems", type=int, default=4, help="arithmetic: number of problems")
    parser.add_argument("--num-digits", type=int, default=2, help="arithmetic: digits per operand")
    parser.add_argument("--operation", default="+", choices=["+", "*"], help="arithmetic: operation")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="generation cap (0: the task's trace length for the decision task, 48 for arithmetic)")
    parser.add_argument("--alpha", type=float, default=4.0, help="power α of the target p^α")
    parser.add_argument("--chains", type=int, default=32, help="chains (samples) per problem and method")
    parser.add_argument("--mcmc-steps", type=int, default=24, help="MH steps per chain (one block)")
    parser.add_argument("--top-k", type=int, default=0, help="proposal top-k (0: full vocabulary)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")


def check_config(config: dict) -> None:
    unknown = set(_methods(config)) - set(METHODS)
    if unknown:
        raise ArgumentError(f"--methods: unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    for name in ("chains", "problems_per_k", "num_problems"):
        if config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be ≥ 1, got {config[name]}")
    if config["mcmc_steps"] < 0:
        raise ArgumentError(f"--mcmc-steps must be ≥ 0, got {config['mcmc_steps']}")
    if config["alpha"] <= 0:
        raise ArgumentError(f"--alpha must be > 0, got {config['alpha']}")
    methods = _methods(config)
    if "best_of_n" in methods and not {"mh_uniform", "mh_entropy"} & set(methods):
        raise ArgumentError("--methods: best_of_n matches an MH method's token budget; include mh_entropy or mh_uniform")
    if config["task"] == "arithmetic" and config["model"] in ("toy-decisions", "exact"):
        raise ArgumentError("--task arithmetic needs a chat model, e.g. --model smollm2-135m-instruct")
    if config["task"] == "decisions" and config["model"] not in ("toy-decisions", "exact"):
        raise ArgumentError("--task decisions runs on --model toy-decisions or --model exact")


def _methods(config):
    chosen = {m.strip() for m in config["methods"].split(",") if m.strip()}
    return [m for m in METHODS if m in chosen] + sorted(chosen - set(METHODS))


# ---------------------------------------------------------------------------------------
# Problems


class Problem:
    """What the experiment needs of a problem: prompt, grader, reference accuracies."""

    def __init__(self, key, prompt, grade, group, exact=None, answer=None):
        self.key, self.prompt, self.grade, self.group = key, prompt, grade, group
        self.exact, self.answer = exact, answer


def _decision_problems(config, lm, task_config):
    rng = np.random.default_rng(config["seed"])
    problems = []
    for k in [int(x) for x in config["decisions"].split(",")]:
        for index in range(config["problems_per_k"]):
            problem = tasks.sample_problem(rng, task_config, k)
            problems.append((f"K{k}-{index}", problem))
    return problems


def load_model_and_problems(config):
    if config["task"] == "decisions":
        if config["model"] == "exact":
            task_config = tasks.DecisionTaskConfig(stretch_length=config["stretch_length"])
            lm = tasks.data_model(task_config)
        else:
            lm = js.load(config["model"])
            task_config = tasks.read_task_config(resolve(config["model"]))
        max_new = config["max_new_tokens"] or task_config.trace_length(task_config.max_decisions)

        def make(name, problem):
            return Problem(
                key=name,
                prompt=np.asarray(problem.prompt),
                grade=lambda tokens, p=problem: bool(tasks.grade(p, tokens)),
                group=f"K={problem.num_decisions}",
                exact=problem,
            )

        return lm, [make(n, p) for n, p in _decision_problems(config, lm, task_config)], max_new
    lm = js.load(config["model"])
    rng = np.random.default_rng(config["seed"])
    problems = tasks.sample_arithmetic(rng, config["num_problems"], config["num_digits"], config["operation"])

    def make_arithmetic(index, problem):
        def grade(tokens, p=problem):
            return tasks.grade_arithmetic(p, lm.tokenizer.decode([int(t) for t in tokens if t != lm.pad_token_id]))

        prompt = np.asarray(tasks.arithmetic_prompt(lm.tokenizer, problem))
        return Problem(f"q{index}", prompt, grade, "arithmetic", answer=problem.answer)

    return lm, [make_arithmetic(i, p) for i, p in enumerate(problems)], config["max_new_tokens"] or 48


# ---------------------------------------------------------------------------------------
# Samplers (jitted once per prompt length; α and τ are traced)


@partial(jax.jit, static_argnames=("cut_law", "num_chains", "num_steps", "max_new_tokens", "top_k"))
def mh_trajectory(key, lm, prompt, alpha, cut_law, num_chains, num_steps, max_new_tokens, top_k):
    """C chains of single-block MH; the completion of every chain after every step."""
    proposal = js.Proposal(temperature=1.0 / alpha, top_k=top_k, top_p=jnp.float32(1.0))
    init_key, run_key = jax.random.split(key)
    state = mcmc.init(init_key, lm, prompt, num_chains, max_new_tokens, proposal)
    step = mcmc.build_kernel(lm, cut_law, proposal)

    def body(state, index):
        state, info = step(jax.random.fold_in(run_key, index), state, alpha, max_new_tokens)
        return state, (state.decode.tokens, info.accepted, info.tokens_decoded)

    _, (tokens, accepted, decoded) = jax.lax.scan(body, state, jnp.arange(num_steps))
    return state.decode.tokens, state.decode.length, tokens, accepted, decoded


def run_mh(key, lm, problem, cut, config, max_new):
    cut_law = mcmc.resolve_cut_law("uniform" if cut == "mh_uniform" else "entropy")
    init_tokens, init_lengths, tokens, accepted, decoded = mh_trajectory(
        key, lm, jnp.asarray(problem.prompt, jnp.int32), jnp.float32(config["alpha"]), cut_law,
        config["chains"], config["mcmc_steps"], max_new, config["top_k"])
    grades = [_accuracy(problem, init_tokens)] + [_accuracy(problem, t) for t in np.asarray(tokens)]
    spent = np.mean(np.asarray(init_lengths)) + np.concatenate([[0.0], np.cumsum(np.asarray(decoded).mean(axis=1))])
    return {
        "accuracy": grades[-1],
        "tokens": float(spent[-1]),
        "acceptance": float(np.asarray(accepted).mean()) if config["mcmc_steps"] else float("nan"),
        "curve": [[float(t), float(a)] for t, a in zip(spent, grades)],
    }


def _accuracy(problem, tokens) -> float:
    return float(np.mean([problem.grade(row) for row in np.asarray(tokens)]))


def run_method(method, key, lm, problem, config, max_new, budget):
    prompt = jnp.asarray(problem.prompt, jnp.int32)
    common = dict(num_chains=config["chains"], max_new_tokens=max_new, top_k=config["top_k"])
    if method in ("mh_uniform", "mh_entropy"):
        return run_mh(key, lm, problem, method, config, max_new)
    if method == "base":
        result = mcmc.base_sample(key, lm, prompt, **common)
    elif method == "temperature":
        result = mcmc.temperature_sample(key, lm, prompt, alpha=config["alpha"], **common)
    else:
        # Compute-matched: as many candidates as the entropy-cut MH budget pays for.
        mean_length = max(budget["base_length"], 1.0)
        candidates = max(1, math.ceil(budget["mh_tokens"] / mean_length))
        result = mcmc.best_of_n(key, lm, prompt, num_candidates=candidates, token_budget=int(round(budget["mh_tokens"])), **common)
        record = _record(problem, result)
        record["candidates"] = candidates
        return record
    return _record(problem, result)


def _record(problem, result):
    accuracy = _accuracy(problem, result.tokens)
    tokens = float(np.mean(np.asarray(result.tokens_decoded)))
    return {"accuracy": accuracy, "tokens": tokens, "acceptance": float("nan"), "curve": [[tokens, accuracy]]}


# ---------------------------------------------------------------------------------------
# The run


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    lm, problems, max_new = load_model_and_problems(config)
    methods = _methods(config)
    done = run_dir.done_keys()
    todo = [(p, m) for p in problems for m in ["exact", *methods] if f"{p.key}/{m}" not in done]
    run_dir.log.info("model %s, %d problems, methods %s, %d units to do", lm.name, len(problems), methods, len(todo))
    key = jax.random.key(config["seed"])
    budgets = {}
    for record in run_dir.finished:
        budgets.setdefault(record["problem"], {}).update(_budget_fields(record))
    with tqdm(todo, desc=f"power [{lm.name}]", unit="run") as bar:
        for problem, method in bar:
            bar.set_postfix(problem=problem.key, method=method)
            budget = budgets.setdefault(problem.key, {})
            if method == "exact":
                record = _exact_record(lm, problem, config)
            else:
                problem_key = jax.random.fold_in(key, zlib.crc32(problem.key.encode()))
                record = run_method(method, jax.random.fold_in(problem_key, METHODS.index(method)), lm, problem, config, max_new, budget)
            record.update(key=f"{problem.key}/{method}", problem=problem.key, group=problem.group, method=method)
            budget.update(_budget_fields(record))
            run_dir.append(record)
            run_dir.log.info("%s %s accuracy=%.3f tokens=%.1f", problem.key, method, record.get("accuracy", float("nan")), record.get("tokens", float("nan")))
    return summarize(run_dir, methods)


def _budget_fields(record):
    if record["method"] == "base":
        return {"base_length": record["tokens"]}
    if record["method"] in ("mh_uniform", "mh_entropy"):  # entropy runs last, so it sets the budget
        return {"mh_tokens": record["tokens"]}
    return {}


def _exact_record(lm, problem, config):
    if problem.exact is None:
        return {"exact": None}
    acc = tasks.exact_accuracies(lm, problem.exact, config["alpha"])
    return {"exact": {"base": float(acc.base), "temperature": float(acc.temperature), "power": float(acc.power)}}


def summarize(run_dir: RunDirectory, methods, labels=LABELS, title="power sampling") -> str:
    """Table (summary.md) and accuracy-vs-tokens plot of every finished record."""
    records = [r for r in run_dir.finished if r["method"] != "exact"]
    exact = {r["problem"]: r["exact"] for r in run_dir.finished if r["method"] == "exact" and r["exact"]}
    groups = sorted({r["group"] for r in records})
    rows = []
    for group in groups:
        power_ref = [exact[r["problem"]]["power"] for r in records if r["group"] == group and r["problem"] in exact and r["method"] == methods[0]]
        target = 0.9 * float(np.mean(power_ref)) if power_ref else None
        for method in methods:
            chosen = [r for r in records if r["group"] == group and r["method"] == method]
            if not chosen:
                continue
            row = {
                "group": group,
                "method": labels[method],
                "problems": len(chosen),
                "accuracy": float(np.mean([r["accuracy"] for r in chosen])),
                "tokens/answer": float(np.mean([r["tokens"] for r in chosen])),
                "acceptance": _nanmean([r["acceptance"] for r in chosen]),
            }
            if target is not None:
                row["tokens to 90% of p^α"] = _tokens_to_target(chosen, target)
            rows.append(row)
        if power_ref:
            ref = [exact[p] for p in {r["problem"] for r in records if r["group"] == group} if p in exact]
            rows.append({
                "group": group, "method": "exact (model's own p)",
                "problems": len(ref),
                "accuracy": f"base {np.mean([e['base'] for e in ref]):.3f} / temp {np.mean([e['temperature'] for e in ref]):.3f} / p^α {np.mean([e['power'] for e in ref]):.3f}",
            })
    columns = ["group", "method", "problems", "accuracy", "tokens/answer", "acceptance"]
    if exact:
        columns.append("tokens to 90% of p^α")
    table = markdown_table(rows, columns)
    plot_path = _plot(run_dir, records, exact, methods, groups, labels, title)
    text = f"{table}\n\nplot: {plot_path}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _nanmean(values):
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else "—"


def _mean_curve(chosen):
    curves = [np.asarray(r["curve"]) for r in chosen]
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0)


def _tokens_to_target(chosen, target):
    curve = _mean_curve(chosen)
    reached = np.nonzero(curve[:, 1] >= target)[0]
    return float(curve[reached[0], 0]) if len(reached) else f"> {curve[-1, 0]:.0f}"


def _plot(run_dir, records, exact, methods, groups, labels, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        for method in methods:
            chosen = [r for r in records if r["group"] == group and r["method"] == method]
            if not chosen:
                continue
            curve = _mean_curve(chosen)
            style = "-" if len(curve) > 1 else "o"
            ax.plot(curve[:, 0], curve[:, 1], style, label=labels[method], markersize=6)
        ref = [exact[p]["power"] for p in {r["problem"] for r in records if r["group"] == group} if p in exact]
        if ref:
            ax.axhline(np.mean(ref), color="k", linestyle="--", linewidth=1, label="exact p^α")
        ax.set_title(group)
        ax.set_xscale("log")
        ax.set_xlabel("decoded tokens per answer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}, α = {run_dir.config['alpha']}, model {run_dir.config['model']}")
    fig.tight_layout()
    path = run_dir.path / "accuracy_vs_tokens.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
