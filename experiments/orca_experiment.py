"""ORCA: early stopping of reasoning chains by a test-time-trained probe vs a static probe, LTT-calibrated.

Synthetic step-structured traces (spec calibration.md §2.7): problem i has n_i ~ U{40..200}
steps and is solved at step t*_i = ⌊u_i n_i⌋, u_i ~ U(0.2, 0.9); its step embeddings are
φ_{i,t} = o_i + β 1{t ≥ t*_i} v + ε with a per-problem offset o_i ~ N(μ_D, σ_o² I), a fixed
"solved" direction v and ε ~ N(0, noise² I); labels C_{i,t} = 1{t ≥ t*_i}. Domain A gives
`--train-problems` for (meta-)training and a pool split at random into calibration and
in-distribution test halves, `--resplits` times; domain B (offset mean shifted by
`--ood-shift` orthogonally to v, offset scale `--ood-offset-scale`) is the shifted test set.

`--model toy-decisions`: the same comparison on features of real generated traces. The
embedded model samples traces (temperature `--temperature`) for decision-task problems with
`--decisions` items (shifted domain: `--ood-decisions` items, so the prompts and traces look
different); a step is one generated token, its embedding the model's final-norm hidden state
there (`init_decode(..., record_features=True)`), and the problem counts as solved from the
first item whose decision is the right option R (labels 1 from that decision token on;
traces that never take R are dropped, as in the paper). Use a short `--window` (traces have
at most 40 tokens).

Methods: `static` (standardise → PCA → logistic regression on every step), `ttt` (the ORCA
probe, no K/Q projections unless `--hidden-size`, meta-trained through its label-free inner
steps) and `ttt_eta0` (the same probe with η frozen at 0: a linear probe trained by the same
meta-loss). Each is smoothed (trailing mean, `--window`) and calibrated by strict LTT at risk
`--delta`, error probability `--epsilon`, on the calibration half. Reported per method and
test set: mean error rate at the stop, fraction of resplits whose error exceeds δ, and mean
step savings 1 − (T+1)/n. Every synthetic problem is eventually solved, so nothing is
dropped (the paper drops never-solved problems; its risk is conditional on eventual success).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxsample as js
from jaxsample import tasks
from jaxsample.calibration import orca
from jaxsample.models.registry import resolve
from jaxsample.errors import ArgumentError
from run_directory import RunDirectory, markdown_table

METHODS = ("static", "ttt", "ttt_eta0")
LABELS = {"static": "static probe (PCA + logistic)", "ttt": "ORCA TTT probe", "ttt_eta0": "TTT probe, η = 0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="synthetic", choices=["synthetic", "toy-decisions"], help="'synthetic' (spec §2.7 traces) or the embedded model's generated traces")
    parser.add_argument("--decisions", type=int, default=4, help="toy-decisions: items per in-distribution problem")
    parser.add_argument("--ood-decisions", type=int, default=2, help="toy-decisions: items per shifted-domain problem")
    parser.add_argument("--temperature", type=float, default=1.0, help="toy-decisions: sampling temperature of the traces")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--feature-size", type=int, default=32, help="synthetic: d, the width of a step embedding")
    parser.add_argument("--train-problems", type=int, default=300, help="domain A problems for (meta-)training")
    parser.add_argument("--pool-problems", type=int, default=300, help="domain A problems split into calibration and test halves")
    parser.add_argument("--ood-problems", type=int, default=150, help="domain B (shifted) test problems")
    parser.add_argument("--offset-scale", type=float, default=2.0, help="σ_o of domain A's per-problem offsets")
    parser.add_argument("--ood-offset-scale", type=float, default=3.0, help="σ_o of domain B")
    parser.add_argument("--ood-shift", type=float, default=3.0, help="norm of domain B's offset mean (orthogonal to v)")
    parser.add_argument("--jump", type=float, default=2.0, help="β, the step change along v once solved")
    parser.add_argument("--noise", type=float, default=0.3, help="per-step noise scale")
    parser.add_argument("--resplits", type=int, default=50, help="random calibration/test splits of the pool")
    parser.add_argument("--delta", type=float, default=0.1, help="δ, target error rate at the stop")
    parser.add_argument("--epsilon", type=float, default=0.05, help="ε, LTT's error probability")
    parser.add_argument("--window", type=int, default=10, help="trailing-mean window of the scores")
    parser.add_argument("--epochs", type=int, default=20, help="meta-training epochs (one problem per Adam step)")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate of meta-training")
    parser.add_argument("--hidden-size", type=int, default=0, help="d_h of the K/Q projections (0: no K/Q, u = φ)")


def check_config(config: dict) -> None:
    _methods(config)
    for name in ("feature_size", "train_problems", "ood_problems", "resplits", "window", "epochs", "decisions", "ood_decisions"):
        if config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be ≥ 1, got {config[name]}")
    if config["pool_problems"] < 2:
        raise ArgumentError(f"--pool-problems must be ≥ 2, got {config['pool_problems']}")
    for name in ("delta", "epsilon"):
        if not 0 < config[name] < 1:
            raise ArgumentError(f"--{name} must lie in (0, 1), got {config[name]}")
    for name in ("offset_scale", "ood_offset_scale", "noise", "meta_lr", "temperature"):
        if config[name] <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be > 0, got {config[name]}")
    if config["hidden_size"] < 0:
        raise ArgumentError(f"--hidden-size must be ≥ 0, got {config['hidden_size']}")


def _methods(config):
    chosen = [m.strip() for m in config["methods"].split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise ArgumentError(f"--methods: unknown or empty choice {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in chosen]


def synthetic_problems(rng, count, config, offset_mean, offset_scale, solved_direction, max_steps=200):
    """Step embeddings `[P, n_max, d]`, labels `[P, n_max]`, mask `[P, n_max]` (spec §2.7)."""
    steps = rng.integers(40, max_steps + 1, count)
    solve = np.floor(rng.uniform(0.2, 0.9, count) * steps).astype(int)
    t = np.arange(max_steps)[None, :]
    mask = t < steps[:, None]
    labels = ((t >= solve[:, None]) & mask).astype(np.float32)
    offsets = offset_mean + offset_scale * rng.normal(size=(count, 1, config["feature_size"]))
    noise = config["noise"] * rng.normal(size=(count, max_steps, config["feature_size"]))
    phi = offsets + config["jump"] * labels[..., None] * solved_direction + noise
    return np.float32(phi), labels, mask


def domains(config):
    rng = np.random.default_rng(config["seed"])
    d = config["feature_size"]
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    shift = rng.normal(size=d)
    shift -= (shift @ direction) * direction
    shift *= config["ood_shift"] / np.linalg.norm(shift)
    a = synthetic_problems(rng, config["train_problems"] + config["pool_problems"], config, 0.0, config["offset_scale"], direction)
    b = synthetic_problems(rng, config["ood_problems"], config, shift, config["ood_offset_scale"], direction)
    split = config["train_problems"]
    return tuple(x[:split] for x in a), tuple(x[split:] for x in a), b


def toy_problems(lm, task_config, rng, key, count, decisions, temperature):
    """Generated traces of the embedded model: per-token features `[P', N, D]`, labels, mask
    (P' ≤ count: traces that never take the right option are dropped)."""
    problems = [tasks.sample_problem(rng, task_config, decisions) for _ in range(count)]
    prompts = jnp.asarray(np.stack([np.asarray(p.prompt) for p in problems]), jnp.int32)
    max_new = task_config.trace_length(task_config.max_decisions)
    state = js.init_decode(lm, prompts, count, max_new, record_features=True)
    state, _ = js.extend(key, lm, state, max_new, js.Proposal(temperature=temperature).validated())
    tokens, length = np.asarray(state.tokens), np.asarray(state.length)
    t = np.arange(max_new)[None, :]
    mask = t < length[:, None]
    right = (t % task_config.item_length == 0) & (tokens == tasks.decisions.RIGHT) & mask
    solved = right.any(axis=1)
    labels = ((t >= np.argmax(right, axis=1)[:, None]) & mask).astype(np.float32)
    return np.asarray(state.features)[solved], labels[solved], mask[solved]


def toy_domains(config, log):
    lm = js.load(config["model"])
    task_config = tasks.read_task_config(resolve(config["model"]))
    rng = np.random.default_rng(config["seed"])
    key = jax.random.key(config["seed"])
    total = config["train_problems"] + config["pool_problems"]
    a = toy_problems(lm, task_config, rng, key, total, config["decisions"], config["temperature"])
    b = toy_problems(lm, task_config, rng, jax.random.fold_in(key, 1), config["ood_problems"], config["ood_decisions"], config["temperature"])
    log.info("toy traces: %d of %d in-distribution and %d of %d shifted problems solved (kept)", len(a[0]), total, len(b[0]), config["ood_problems"])
    split = round(len(a[0]) * config["train_problems"] / total)
    check_kept(split, len(a[0]) - split, len(b[0]), config)
    return tuple(x[:split] for x in a), tuple(x[split:] for x in a), b


def check_kept(train: int, pool: int, shifted: int, config: dict) -> None:
    """Raises unless the solved (kept) traces leave ≥ 1 training problem, a pool whose calibration
    and test halves are non-empty, and ≥ 1 shifted problem: the probe, LTT and the evaluation
    cannot run on none."""
    kept = (f"{train + pool} of {config['train_problems'] + config['pool_problems']} in-distribution and "
            f"{shifted} of {config['ood_problems']} shifted problems solved (kept)")
    if train < 1:
        raise ArgumentError(f"only {kept}: none left for training; raise --train-problems")
    if pool < 2:
        raise ArgumentError(f"only {kept}: {pool} left for the pool, which needs 2 (calibration and test); raise --pool-problems")
    if shifted < 1:
        raise ArgumentError(f"only {kept}: no shifted problem to test on; raise --ood-problems")


def fit_scorer(method, config, train, log):
    """A function phi, mask -> scores `[P, n]` for the method, trained on `train`."""
    if method == "static":
        probe = orca.static_probe_fit(*train)
        return lambda phi, mask: orca.static_probe_scores(probe, jnp.asarray(phi))
    key = jax.random.key(config["seed"])
    hidden = config["hidden_size"] or None
    start = orca.init_probe(key, train[0].shape[-1], hidden_size=hidden, eta=0.0 if method == "ttt_eta0" else 0.01)
    params, losses = orca.meta_train(jax.random.fold_in(key, 1), start, *train, epochs=config["epochs"],
                                     learning_rate=config["meta_lr"], learn_eta=method == "ttt")
    log.info("%s meta-loss per epoch %s, final η %.4g", method, np.round(np.asarray(losses), 4).tolist(), float(jnp.exp(params.log_eta)))
    return lambda phi, mask: orca.ttt_scores(params, jnp.asarray(phi), jnp.asarray(mask))


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    train, pool, shifted = domains(config) if config["model"] == "synthetic" else toy_domains(config, run_dir.log)
    done = run_dir.done_keys()
    rng = np.random.default_rng(config["seed"] + 1)
    pool_size = len(pool[0])
    splits = [rng.permutation(pool_size) for _ in range(config["resplits"])]
    half = pool_size // 2
    for method in tqdm(_methods(config), desc="orca methods", unit="method"):
        if method in done:
            continue
        score = fit_scorer(method, config, train, run_dir.log)
        smoothed_pool = orca.smooth(score(pool[0], pool[2]), jnp.asarray(pool[2]), config["window"])
        smoothed_ood = orca.smooth(score(shifted[0], shifted[2]), jnp.asarray(shifted[2]), config["window"])
        # λ̂ = inf (never stop early) is stored as null: results are strict JSON.
        record = {"key": method, "method": method, "lambda": [], "in_error": [], "in_savings": [], "ood_error": [], "ood_savings": []}
        for order in splits:
            cal, test = order[:half], order[half:]
            lam = orca.ltt_calibrate(smoothed_pool[cal], pool[1][cal], pool[2][cal], config["delta"], config["epsilon"])
            inside = orca.evaluate(smoothed_pool[test], pool[1][test], pool[2][test], lam)
            outside = orca.evaluate(smoothed_ood, shifted[1], shifted[2], lam)
            record["lambda"].append(float(lam))
            # Counts over sizes in float64: float32's 15/150 lies above 0.1 and would count
            # an error rate exactly at δ as a violation.
            record["in_error"].append(int(inside.num_wrong) / len(test))
            record["in_savings"].append(float(inside.savings))
            record["ood_error"].append(int(outside.num_wrong) / len(shifted[1]))
            record["ood_savings"].append(float(outside.savings))
        run_dir.append(record)
        run_dir.log.info("%s in: error %.3f savings %.3f; ood: error %.3f savings %.3f", method,
                         np.mean(record["in_error"]), np.mean(record["in_savings"]), np.mean(record["ood_error"]), np.mean(record["ood_savings"]))
    return summarize(run_dir)


def summarize(run_dir: RunDirectory) -> str:
    delta = run_dir.config["delta"]
    rows = []
    for record in run_dir.finished:
        for where, name in (("in", "in distribution (A)"), ("ood", "shifted (B)")):
            errors = np.asarray(record[f"{where}_error"])
            rows.append({
                "test set": name, "method": LABELS[record["method"]], "resplits": len(errors),
                "error rate": float(errors.mean()), f"P(error > δ={delta})": float((errors > delta).mean()),
                "step savings": float(np.mean(record[f"{where}_savings"])),
                "λ̂ (median)": float(np.median([np.inf if lam is None else lam for lam in record["lambda"]])),
            })
    rows.sort(key=lambda r: r["test set"])
    columns = ["test set", "method", "resplits", "error rate", f"P(error > δ={delta})", "step savings", "λ̂ (median)"]
    table = markdown_table(rows, columns)
    plot_path = _plot(run_dir)
    text = f"{table}\n\nplot: {plot_path}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _plot(run_dir: RunDirectory):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, where, title in ((axes[0], "in", "in distribution"), (axes[1], "ood", "shifted domain")):
        for record in run_dir.finished:
            ax.scatter(record[f"{where}_savings"], record[f"{where}_error"], s=12, alpha=0.6, label=LABELS[record["method"]])
        ax.axhline(run_dir.config["delta"], color="k", ls=":", lw=1)
        ax.set_xlabel("step savings (per resplit)")
        ax.set_title(title)
    axes[0].set_ylabel("error rate at the stop")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = run_dir.path / "orca.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
