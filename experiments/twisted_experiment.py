"""Twisted SMC with learned twists: untwisted SMC vs CTL vs TRI-TSMC, and their stability across learning rates.

Target on the decision task: σ(y) ∝ p(y | prompt) exp(λ·correct(y)), a terminal verifier
potential (correct = the whole trace equals the reference trace). Every method runs twisted
SMC with the same N particles and the same token cap (each particle stops at its stop token,
so a run decodes N × trace-length tokens: matched particle and token budgets per answer);
they differ in the twist: none (ψ = 1), or a twist head learned per problem by CTL
(contrastive, no trust region) or TRI-TSMC (trust-region tempering + weighted MLE; a
reconstruction from the paper's abstract). Learning costs the tokens its SIS passes decoded
(`learn_twist`'s `tokens_decoded`, N paths per iteration), reported separately.

After every learning iteration the current twist is evaluated by `--eval-runs` independent
twisted SMC runs: accuracy Σ_i W_i·correct_i of the weighted particles, mean ESS over the
steps, the mean and variance of log Z_hat across runs (each with its standard error over the
runs), and the iteration's β and KL. The stability comparison repeats CTL and TRI at every
`--learning-rates` value.

The twist head reads the frozen model's hidden state and the position; twists are learned per
problem (one head per problem and method), not amortised across problems.

`--model toy-diffusion` runs the same comparison (untwisted and TRI) over the unmasking path of
the masked-diffusion model (experiments/twisted_diffusion.py).
"""

from __future__ import annotations

import argparse
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm import tqdm

import jaxsample as js
from jaxsample import tasks
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_real
from problems import check_distinct, decision_counts, load_model_and_problems, selected_methods
from run_directory import RunDirectory, markdown_table
from twisted_diffusion import DIFFUSION_METHODS, run_diffusion

METHODS = ("untwisted", "ctl", "tri")
LABELS = {"untwisted": "untwisted SMC", "ctl": "CTL twist", "tri": "TRI-TSMC twist"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Not power's shared problem options: twisted has no chains, α, MH steps or top-k, and runs
    # the decision task only.
    parser.add_argument("--model", default="toy-decisions",
                        help="toy-decisions (the decision task) or toy-diffusion (the masked-diffusion model)")
    parser.add_argument("--task", default="decisions", choices=["decisions"], help="problem family (the verifier needs the decision task's reference trace)")
    parser.add_argument("--decisions", default="2", help="toy-decisions: comma-separated numbers of decisions K per problem")
    parser.add_argument("--problems-per-k", type=int, default=1, help="toy-decisions: problems per value of K")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="toy-decisions: token cap per particle (0: the task's trace length)")
    parser.add_argument("--lam", type=float, default=3.0, help="log φ = λ·correct: the verifier potential's strength")
    parser.add_argument("--particles", type=int, default=16, help="particles N, for learning (SIS paths per iteration) and evaluation")
    parser.add_argument("--iterations", type=int, default=4, help="twist-learning iterations per problem and method")
    # 200 runs: var log Z_hat ≈ 0.25 untwisted puts the standard error of mean log Z_hat near
    # 0.035 and that of the variance near 10%; a run costs ~15 ms on 2 CPU cores once compiled.
    parser.add_argument("--eval-runs", type=int, default=200, help="independent twisted SMC runs per evaluation (standard errors, variance of log Z_hat)")
    parser.add_argument("--kl-budget", type=float, default=0.5, help="TRI's trust-region budget ε per iteration")
    parser.add_argument("--learning-rates", default="0.03,0.3", help="comma-separated Adam learning rates (the stability comparison)")
    parser.add_argument("--fit-steps", type=int, default=10, help="optimiser steps per learning iteration (CTL and TRI alike)")
    parser.add_argument("--hidden-size", type=int, default=32, help="width of the twist head")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}; unset: every method the model has "
                        f"(toy-diffusion: {', '.join(DIFFUSION_METHODS)})")


def learning_rates(config: dict) -> list[float]:
    try:
        rates = [float(x) for x in str(config["learning_rates"]).split(",") if x.strip()]
    except ValueError as error:
        raise ArgumentError(f"--learning-rates must be comma-separated numbers: {error}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ArgumentError(f"--learning-rates must be positive, got {config['learning_rates']}")
    # Units are keyed lr{rate:g}: a repeat would be a second record with the same key.
    check_distinct("--learning-rates", [f"{r:g}" for r in rates], config["learning_rates"])
    return rates


def check_config(config: dict) -> None:
    methods_run(config)
    learning_rates(config)
    if config["model"] not in ("toy-decisions", "toy-diffusion"):
        raise ArgumentError(f"twisted runs on --model toy-decisions or --model toy-diffusion (the verifier needs the "
                            f"decision task's reference trace), got --model {config['model']}")
    # toy-diffusion carries its own fixed problem; the problem options are checked as for toy-decisions.
    for name in ("iterations", "eval_runs", "fit_steps", "hidden_size", "problems_per_k"):
        check_int("--" + name.replace("_", "-"), config[name], 1)
    for name in ("max_new_tokens", "seed"):
        check_int("--" + name.replace("_", "-"), config[name], 0)
    decision_counts(config)
    check_int("--particles", config["particles"], 2)
    check_real("--lam", config["lam"], "(-inf, inf)")
    check_real("--kl-budget", config["kl_budget"], "(0, inf)")


def trace_correct(lam, reference, tokens, length):
    """log φ = λ if the first `len(reference)` tokens equal the reference trace, else 0."""
    del length
    return lam * jnp.all(tokens[: reference.shape[0]] == reference).astype(jnp.float32)


def potential_for(problem, lam: float, max_new: int):
    reference = np.asarray(problem.exact.correct_trace, np.int32)[:max_new]
    return Partial(trace_correct, jnp.float32(lam), jnp.asarray(reference))


def run_statistics(accuracy, reward, ess, log_z, tokens) -> dict:
    """Means over the evaluation runs, with standard errors for accuracy, log Z_hat and var log Z_hat.

    The variance's standard error is the distribution-free one, sqrt((m4 − s⁴ (R−3)/(R−1)) / R)
    with m4 the fourth central moment: log Z_hat is skewed and heavy-tailed when a proposal
    nearly collapses, where the normal-theory sqrt(2/(R−1))·s² would understate it.
    """
    runs = len(log_z)
    log_z = np.asarray(log_z, np.float64)
    accuracy = np.asarray(accuracy, np.float64)
    if runs > 1:
        variance = float(np.var(log_z, ddof=1))
        fourth = float(np.mean((log_z - log_z.mean()) ** 4))
        variance_se = float(np.sqrt(max(fourth - variance**2 * (runs - 3) / (runs - 1), 0.0) / runs))
        accuracy_se = float(accuracy.std(ddof=1) / np.sqrt(runs))
        log_z_se = float(log_z.std(ddof=1) / np.sqrt(runs))
    else:
        variance = variance_se = accuracy_se = log_z_se = float("nan")
    return {"accuracy": float(accuracy.mean()), "accuracy_se": accuracy_se, "reward": float(np.mean(reward)),
            "ess_fraction": float(np.mean(ess)), "log_z_mean": float(log_z.mean()), "log_z_se": log_z_se,
            "log_z_var": variance, "log_z_var_se": variance_se, "tokens": float(np.mean(tokens))}


def evaluate(key, lm, problem, potential, twist_fn, params, config, max_new) -> dict:
    accuracy, reward, ess, log_z, tokens = [], [], [], [], []
    for run in range(config["eval_runs"]):
        result = js.twisted_smc(
            jax.random.fold_in(key, run), lm, jnp.asarray(problem.prompt, jnp.int32), twist_fn, params,
            potential, num_particles=config["particles"], max_new_tokens=max_new,
        )
        weights = np.exp(np.asarray(result.log_weights, np.float64))
        correct = np.array([problem.grade(row) for row in np.asarray(result.tokens)], np.float64)
        accuracy.append(float(weights @ correct))
        reward.append(float(weights @ np.asarray(result.rewards, np.float64)) / config["lam"])
        ess.append(float(np.mean(np.asarray(result.ess))) / config["particles"])
        log_z.append(float(result.log_z))
        # What the run sampled: particles stop at their stop token, well before max_new.
        tokens.append(float(result.num_decoded))
    return run_statistics(accuracy, reward, ess, log_z, tokens)


def exact_target(lm, problem, lam: float) -> dict:
    """σ's exact accuracy and log Z from the model's exact probability b of the right trace:
    Z = b e^λ + (1 − b), σ(right) = b e^λ / Z."""
    base = float(tasks.exact_accuracies(lm, problem.exact, 1.0).base)
    z = base * np.exp(lam) + (1.0 - base)
    return {"exact_accuracy": base * np.exp(lam) / z, "exact_log_z": float(np.log(z))}


def methods_run(config) -> list[str]:
    """The selected methods, in run order (unset: every one the model has); raises on one the
    model lacks (CTL is not built for the diffusion path)."""
    available = DIFFUSION_METHODS if config["model"] == "toy-diffusion" else METHODS
    if config["methods"] is None:
        return list(available)
    methods = selected_methods(config, METHODS)
    missing = [m for m in methods if m not in available]
    if missing:
        raise ArgumentError(f"--methods: {', '.join(missing)} not built for --model {config['model']}; "
                            f"choose from {', '.join(available)}")
    return methods


def learning_units(config, problems):
    units = []
    for problem in problems:
        for method in methods_run(config):
            rates = [None] if method == "untwisted" else learning_rates(config)
            iterations = [0] if method == "untwisted" else range(config["iterations"] + 1)
            units += [(problem, method, lr, it) for lr in rates for it in iterations]
    return units


def unit_key(problem, method, lr, iteration) -> str:
    return f"{problem.key}/{method}" + ("" if lr is None else f"/lr{lr:g}/it{iteration}")


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    if config["model"] == "toy-diffusion":
        return run_diffusion(run_dir, methods_run(config), learning_rates, run_statistics, summarize)
    lm, problems, max_new = load_model_and_problems(config)
    done = run_dir.done_keys()
    todo = [u for u in learning_units(config, problems) if unit_key(*u) not in done]
    key = jax.random.key(config["seed"])
    twist_fn, init_params = js.smc.init_twist_head(jax.random.fold_in(key, 1), lm, max_new, config["hidden_size"])
    with tqdm(todo, desc=f"twisted [{lm.name}]", unit="eval") as bar:
        for problem, method, lr, iteration in bar:
            bar.set_postfix(problem=problem.key, method=method, lr=lr, it=iteration)
            problem_key = jax.random.fold_in(key, zlib.crc32(problem.key.encode()))
            potential = potential_for(problem, config["lam"], max_new)
            record = {"key": unit_key(problem, method, lr, iteration), "problem": problem.key, "group": problem.group,
                      "method": method, "learning_rate": lr, "iteration": iteration}
            fn, params = (None, None) if method == "untwisted" else (twist_fn, init_params)
            if method != "untwisted" and iteration > 0:
                # Each call resumes the problem's orbax checkpoint and runs one more iteration.
                params, history = js.learn_twist(
                    jax.random.fold_in(problem_key, METHODS.index(method)), lm, [problem.prompt], potential,
                    method=method, num_iterations=iteration, kl_budget=config["kl_budget"],
                    num_particles=config["particles"], max_new_tokens=max_new, learning_rate=lr,
                    num_fit_steps=config["fit_steps"], log_twist_fn=twist_fn, twist_params=init_params,
                    checkpoint_dir=run_dir.path / "twists" / f"{problem.key}-{method}-lr{lr:g}",
                )
                last = history[-1]
                record.update(beta=last["beta"], kl=last["kl"], sis_ess=last["ess"] / config["particles"],
                              learning_tokens=float(sum(h["tokens_decoded"] for h in history)))
            record.update(evaluate(jax.random.fold_in(problem_key, 1000 + iteration), lm, problem, potential, fn,
                                   params, config, max_new))
            record.update(exact_target(lm, problem, config["lam"]))
            record["log_z_bias"] = record["log_z_mean"] - record["exact_log_z"]
            run_dir.append(record)
            run_dir.log.info("%s accuracy=%.3f var_log_z=%.3f", record["key"], record["accuracy"], record["log_z_var"])
    return summarize(run_dir)


def _kept(records, field):
    return [r for r in records if r.get(field) is not None and r[field] == r[field]]


def _mean(records, field):
    values = [r[field] for r in _kept(records, field)]
    return float(np.mean(values)) if values else float("nan")


def _combined_se(records, field, se_field) -> float:
    """SE of the mean of `field` over problems: their runs are independent, so sqrt(Σ SE_p²) / P."""
    kept = _kept(records, field)
    return float(np.sqrt(sum(r[se_field] ** 2 for r in kept)) / len(kept)) if kept else float("nan")


def _mean_se(records, field, se_field) -> str:
    """"mean ± SE" over problems."""
    if not _kept(records, field):
        return "nan"
    return f"{_mean(records, field):.3f} ± {_combined_se(records, field, se_field):.3f}"


def summarize(run_dir: RunDirectory) -> str:
    config = run_dir.config
    records = run_dir.finished
    final = config["iterations"]
    rows = []
    for method in methods_run(config):
        rates = [None] if method == "untwisted" else learning_rates(config)
        for lr in rates:
            curve = [[r for r in records if r["method"] == method and r["learning_rate"] == lr and r["iteration"] == it]
                     for it in ([0] if method == "untwisted" else range(final + 1))]
            last = curve[-1]
            accuracy_curve = [_mean(c, "accuracy") for c in curve]
            rows.append({
                "method": LABELS[method], "lr": "—" if lr is None else f"{lr:g}", "problems": len(last),
                "accuracy": _mean_se(last, "accuracy", "accuracy_se"), "reward": _mean(last, "reward"),
                "ESS/N": _mean(last, "ess_fraction"), "var log Z_hat": _mean_se(last, "log_z_var", "log_z_var_se"),
                "log Z_hat − log Z": _mean_se(last, "log_z_bias", "log_z_se"), "mean β": _mean([r for c in curve[1:] for r in c], "beta"),
                "largest accuracy drop": float(max([0.0] + [a - b for a, b in zip(accuracy_curve, accuracy_curve[1:])])),
                "tokens / run": _mean(last, "tokens"),
                "learning tokens": _mean(last, "learning_tokens") if method != "untwisted" else 0.0,
            })
    exact = [r for r in records if r["method"] == "untwisted"] or records
    rows.append({"method": "exact σ", "lr": "—", "problems": len(exact), "accuracy": _mean(exact, "exact_accuracy"),
                 "var log Z_hat": 0.0, "log Z_hat − log Z": 0.0})
    columns = ["method", "lr", "problems", "accuracy", "reward", "ESS/N", "var log Z_hat", "log Z_hat − log Z", "mean β",
               "largest accuracy drop", "tokens / run", "learning tokens"]
    table = markdown_table(rows, columns)
    plot_path = _plot(run_dir, records)
    text = (f"{table}\n\nEvaluated after {final} learning iterations: N = {config['particles']} particles, "
            f"{config['eval_runs']} twisted SMC runs per problem. ± is one standard error over those runs (of the mean over "
            f"problems where there are several): for accuracy and log Z_hat − log Z the SE of the mean, for var log Z_hat "
            f"the distribution-free SE of a sample variance, sqrt((m4 − s⁴(R−3)/(R−1))/R). Accuracy is each run's "
            f"self-normalised Σ_i W_i·correct_i, a ratio estimator biased at small N, not σ's accuracy itself; "
            f"E log Z_hat ≤ log Z, so an honest log Z_hat − log Z is ≤ 0 within its SE. 'largest accuracy drop' is the "
            f"largest decrease of the mean accuracy between consecutive iterations (oscillation). Accuracy above σ's "
            f"together with var log Z_hat ≈ 0 and a negative log Z_hat − log Z means the proposal collapsed onto one trace "
            f"(SMC no longer represents σ). 'tokens / run' is the mean number of tokens an evaluation run decoded, "
            f"'learning tokens' the tokens the SIS passes of learning decoded.\n\n"
            f"plot: {plot_path}\nresults: {run_dir.results_path}\n")
    if config["model"] == "toy-diffusion":
        b, se = records[0]["b_hat"], records[0]["b_hat_se"]
        text += (f"\ntoy-diffusion: the 'exact σ' row uses b̂ = {b:.4f} ± {se:.1e}, a Monte Carlo estimate of the model's "
                 "probability of the right trace (mean over random unmasking orders); CTL is not built for the diffusion path.\n")
    run_dir.write_text("summary.md", text)
    return text


def _plot(run_dir, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = run_dir.config
    fields = [("accuracy", "accuracy"), ("ess_fraction", "ESS / N"), ("log_z_var", "var log Z_hat"), ("beta", "β (TRI)")]
    # Error bars: ±1 standard error over the evaluation runs (of the mean over problems: sqrt(Σ SE_p²) / P).
    errors = {"accuracy": "accuracy_se", "log_z_var": "log_z_var_se"}
    fig, axes = plt.subplots(1, len(fields), figsize=(4.0 * len(fields), 3.6))
    iterations = np.arange(config["iterations"] + 1)
    for method in methods_run(config):
        for lr in ([None] if method == "untwisted" else learning_rates(config)):
            label = LABELS[method] + ("" if lr is None else f", lr {lr:g}")
            for ax, (field, _) in zip(axes, fields):
                if method == "untwisted":
                    value = _mean([r for r in records if r["method"] == method], field)
                    if value == value:
                        ax.axhline(value, color="k", linestyle="--", linewidth=1, label=label)
                    continue
                at = [[r for r in records if r["method"] == method and r["learning_rate"] == lr and r["iteration"] == it]
                      for it in iterations]
                curve = [_mean(rs, field) for rs in at]
                if field in errors:
                    se = [_combined_se(rs, field, errors[field]) for rs in at]
                    ax.errorbar(iterations, curve, yerr=se, fmt="-o", markersize=3, capsize=2, label=label)
                else:
                    ax.plot(iterations, curve, "-o", markersize=3, label=label)
    for ax, (_, title) in zip(axes, fields):
        ax.set_title(title)
        ax.set_xlabel("learning iteration")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1e-2)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
    fig.suptitle(f"Twisted SMC, λ = {config['lam']}, model {config['model']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = run_dir.path / "twisted_learning.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
