"""`run.py twisted --model toy-diffusion`: the twisted experiment on the masked-diffusion model.

The shipped `toy-diffusion` models the traces of one fixed decision problem, unconditionally
(`jaxsample.diffusion.load_problem`). Target: σ(x_0) ∝ p_θ(x_0) exp(λ·correct(x_0)); twisted SMC
runs over the unmasking path (one position per step, T = 8 steps, N particles). Methods:
untwisted (ψ = 1) and TRI-TSMC with a linear twist head on the denoiser's features
(`jaxsample.diffusion.learn_diffusion_twist`); CTL is not implemented for the diffusion path.

The model's probability b of the right trace has no cheap exact enumeration here (14^8
states), so the "exact σ" row uses b̂, an unbiased Monte Carlo estimate: the mean over 4096
uniformly random unmasking orders of Π_t p_θ(x_0^{σ_t} | x_t) (the any-order factorisation
of the sampler's law), with its standard error in the log.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm import tqdm

from jaxsample import diffusion

DIFFUSION_METHODS = ("untwisted", "tri")


def _correct(lam, reference, tokens):
    return lam * jnp.all(tokens == reference).astype(jnp.float32)


def right_trace_probability(model, trace, key, num_orders: int = 4096) -> tuple[float, float]:
    """(b̂, standard error): p_θ(x_0 = trace) averaged over random unmasking orders."""
    length = model.config.seq_len
    orders = jax.vmap(lambda k: jax.random.permutation(k, length))(jax.random.split(key, num_orders))
    rank = jnp.argsort(orders, axis=-1)                                    # step at which each position unmasks
    steps = jnp.arange(length)
    states = jnp.where(rank[:, None, :] >= steps[None, :, None], model.config.mask_id, trace[None, None, :])
    log_p = model.log_probs(states.reshape(-1, length)).reshape(num_orders, length, length, -1)
    picked = log_p[jnp.arange(num_orders)[:, None], steps[None, :], orders, trace[orders]]
    values = np.exp(np.asarray(jnp.sum(picked, axis=-1), np.float64))
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(num_orders))


def _evaluate(key, model, potential, twist, params, config, run_statistics) -> dict:
    accuracy, ess, log_z = [], [], []
    lam = config["lam"]
    for run in range(config["eval_runs"]):
        result = diffusion.twisted_diffusion_smc(jax.random.fold_in(key, run), model, potential,
                                                 num_particles=config["particles"], log_twist_fn=twist,
                                                 twist_params=params)
        weights = np.exp(np.asarray(result.log_weights, np.float64) - float(jax.nn.logsumexp(result.log_weights)))
        correct = np.asarray(jax.vmap(potential)(result.tokens), np.float64) / lam
        accuracy.append(float(weights @ correct))
        ess.append(float(np.mean(np.asarray(result.ess))) / config["particles"])
        log_z.append(float(result.log_z))
    # Every particle unmasks exactly one position per step, T steps: N·T tokens per run, exactly.
    tokens = [float(config["particles"] * diffusion_length(model))] * len(log_z)
    return run_statistics(accuracy, accuracy, ess, log_z, tokens)


def diffusion_length(model) -> int:
    return model.config.seq_len


def run_diffusion(run_dir, methods, learning_rates, run_statistics, summarize) -> str:
    """The diffusion units of the twisted experiment for `methods` (of `DIFFUSION_METHODS`);
    `learning_rates`, `run_statistics` and `summarize` are twisted_experiment's (passed in:
    that module imports this one)."""
    config = run_dir.config
    model = diffusion.load("toy-diffusion")
    problem = diffusion.load_problem("toy-diffusion")
    trace = jnp.asarray(problem.correct_trace, jnp.int32)
    potential = Partial(_correct, jnp.float32(config["lam"]), trace)
    key = jax.random.key(config["seed"])
    b, b_se = right_trace_probability(model, trace, jax.random.fold_in(key, 7))
    z = b * np.exp(config["lam"]) + (1.0 - b)
    exact = {"exact_accuracy": b * np.exp(config["lam"]) / z, "exact_log_z": float(np.log(z))}
    run_dir.log.info("toy-diffusion: b_hat = %.4f ± %.4f (Monte Carlo over unmasking orders)", b, b_se)
    units = [("untwisted", None, 0)] if "untwisted" in methods else []
    if "tri" in methods:
        units += [("tri", lr, it) for lr in learning_rates(config) for it in range(config["iterations"] + 1)]
    done = run_dir.done_keys()
    length = diffusion_length(model)
    problem_key = jax.random.fold_in(key, zlib.crc32(b"toy-diffusion"))
    for method, lr, iteration in tqdm(units, desc="twisted [toy-diffusion]", unit="eval"):
        record_key = f"toy-diffusion/{method}" + ("" if lr is None else f"/lr{lr:g}/it{iteration}")
        if record_key in done:
            continue
        record = {"key": record_key, "problem": "toy-diffusion", "group": "K=2", "method": method,
                  "learning_rate": lr, "iteration": iteration, "b_hat": b, "b_hat_se": b_se}
        twist, params = (None, None) if method == "untwisted" else (diffusion.linear_log_twist,
                                                                    diffusion.init_linear_twist(model))
        if method == "tri" and iteration > 0:
            params, history = diffusion.learn_diffusion_twist(
                jax.random.fold_in(problem_key, 2), model, potential, num_iterations=iteration,
                kl_budget=config["kl_budget"], num_particles=config["particles"], learning_rate=lr,
                num_fit_steps=config["fit_steps"])
            last = history[-1]
            # No early stop on the unmasking path: each SIS pass decodes N·T tokens.
            record.update(beta=last["beta"], kl=last["kl"], sis_ess=last["ess"] / config["particles"],
                          learning_tokens=float(iteration * config["particles"] * length))
        record.update(_evaluate(jax.random.fold_in(problem_key, 1000 + iteration), model, potential, twist, params,
                                config, run_statistics))
        record.update(exact)
        record["log_z_bias"] = record["log_z_mean"] - record["exact_log_z"]
        run_dir.append(record)
    return summarize(run_dir)
