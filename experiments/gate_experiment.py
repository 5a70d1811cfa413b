"""Safety gates for self-improving updates: Lipschitz-ball verifiers against classifier gates.

Reconstruction of Scrivens, arXiv 2604.00072 (spec §2). For each controller dimension d
(`--dims`) every gate runs `--iterations` gated self-improvement steps, `--runs` times:
the single Lipschitz ball, ball chaining and per-group chaining (analytic bounds, δ = 0
unconditionally), and classifier gates (logistic regression, k-NN, random forest, MLP) trained
on labelled ungated proposals, with a fixed threshold 0.5 or thresholds annealed so that
unsafe proposals pass at rate ≈ δ_1 · n^−1.5 (δ_1: the fixed threshold's rate). The annealed
schedule is calibrated on the proposals the gate actually faces: the unsafe proposals met along
`--train-runs` independent runs of the fixed-threshold gate itself (`--iterations` steps each,
their own PRNG key), not on ungated proposals, which lie where the gated runs never go.
Then the modular-addition transformer (spec §2.5): unembedding-only adaptation with the exact canary-logit bound (logistic gates,
ball, chain, group chain), and LoRA adaptation with chaining on an estimated bound κ · max‖∇s‖
(`--kappas`; conditional). Logged: cumulative false accepts, true accepts, reward improvement,
distance from θ_0 in single-ball radii r_0, chain transitions.
"""

from __future__ import annotations

import argparse
import io
import math
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsample import safety
from jaxsample.models import init_params
from jaxsample.errors import ArgumentError
from jaxsample.safety import modular
from problems import check_distinct
from run_directory import RunDirectory, markdown_table

CLASSIFIER_GATES = tuple(f"{kind}_{schedule}" for kind in safety.CLASSIFIERS for schedule in ("fixed", "annealed"))
VERIFIER_GATES = ("ball", "chain", "group_chain")
TRANSFORMER_GATES = ("logistic_fixed", "logistic_annealed", "ball", "chain", "group_chain")
CANARIES = 32  # canary prompts of the transformer's safety constraint, of the p(p − 1) whose answer is not 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", default="84,240,768", help="comma-separated controller dimensions d")
    parser.add_argument("--iterations", type=int, default=300, help="gated self-improvement steps per run")
    parser.add_argument("--runs", type=int, default=4, help="independent runs per gate (vmapped; counts are summed, curves averaged)")
    parser.add_argument("--train-runs", type=int, default=40, help="ungated runs whose proposals train each classifier; as many runs of the fixed-threshold gate (--iterations steps each) calibrate the annealed thresholds")
    parser.add_argument("--train-steps", type=int, default=15, help="steps per ungated training run")
    parser.add_argument("--modulus", type=int, default=23, help="p of the modular-addition transformer (0: skip the transformer)")
    parser.add_argument("--train-model-steps", type=int, default=40, help="AdamW steps training the transformer (cached in the run directory)")
    parser.add_argument("--kappas", default="1,2", help="comma-separated safety factors κ of the estimated LoRA bound (empty: skip LoRA)")
    parser.add_argument("--lora-rank", type=int, default=2, help="LoRA rank on q_proj and v_proj")


def check_config(config: dict) -> None:
    try:
        dims, kappas = _ints(config["dims"]), _floats(config["kappas"])
    except ValueError as error:
        raise ArgumentError(f"--dims / --kappas must be comma-separated numbers: {error}") from None
    if any(d < 4 for d in dims):
        raise ArgumentError(f"--dims must be integers >= 4, got {config['dims']!r}")
    if any(not k >= 1 for k in kappas):
        raise ArgumentError(f"--kappas must be numbers >= 1, got {config['kappas']!r}")
    check_distinct("--dims", dims, config["dims"])
    # units are keyed chain_kappa{k:g}: kappas equal in that form would share one key
    check_distinct("--kappas", [f"{k:g}" for k in kappas], config["kappas"])
    for name, low in (("iterations", 1), ("runs", 1), ("train_runs", 2), ("train_steps", 1), ("modulus", 0), ("train_model_steps", 0), ("lora_rank", 1)):
        if not isinstance(config[name], int) or config[name] < low:
            raise ArgumentError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {config[name]!r}")
    smallest = next(p for p in range(2, CANARIES + 2) if p * (p - 1) >= CANARIES)
    if 0 < config["modulus"] < smallest:
        raise ArgumentError(
            f"--modulus must be 0 (skip the transformer) or >= {smallest} (the canary task needs {CANARIES} "
            f"of the p(p − 1) prompts whose answer is not 0), got {config['modulus']}")
    if not dims and not config["modulus"]:
        raise ArgumentError("--dims is empty and --modulus 0 skips the transformer: nothing to run; "
                            "give --dims (e.g. 84) or a --modulus (e.g. 23)")
    if kappas and 0 < config["modulus"] ** 2 < modular.LORA_REWARD_PROMPTS:
        smallest = math.isqrt(modular.LORA_REWARD_PROMPTS - 1) + 1
        raise ArgumentError(
            f"--modulus must be >= {smallest} with --kappas (the LoRA reward uses {modular.LORA_REWARD_PROMPTS} "
            f"of the modulus² prompts), got {config['modulus']}; pass --kappas '' to skip the LoRA problem")


# ---------------------------------------------------------------------------------------
# Gates


def faced_proposals(key, problem, gate, num_runs: int, num_steps: int):
    """The proposals `gate` meets along `num_runs` of its own trajectories.

    Returns:
      `(candidates [num_runs · num_steps, d], safe bool [num_runs · num_steps])`.
    """
    runs = jax.jit(jax.vmap(lambda k: safety.simulate(k, problem, gate, num_steps, record_proposals=True)))
    trace = runs(jax.random.split(key, num_runs))
    return np.asarray(trace.proposal).reshape(-1, trace.proposal.shape[-1]), np.asarray(trace.proposal_safe).reshape(-1)


def classifier_gates(key, problem, names, config, unit_radius):
    """Trains the classifiers named in `names` on ungated proposals; returns
    ({name: gate}, train safe fraction, {annealed name: calibration summary})."""
    train_key, calibrate_key, fit_key = jax.random.split(key, 3)
    candidates, safe = safety.proposal_dataset(train_key, problem, config["train_runs"], config["train_steps"])
    gates, calibration = {}, {}
    for kind in sorted({name.rsplit("_", 1)[0] for name in names}):
        index = safety.CLASSIFIERS.index(kind)
        score = safety.fit_classifier(kind, jax.random.fold_in(fit_key, index), candidates, safe)
        fixed = safety.classifier_gate(score, jnp.float32(0.5), problem.safety, unit_radius=unit_radius)
        schedules = {"fixed": fixed}
        if f"{kind}_annealed" in names:
            # Calibrate on what the gate faces: the unsafe proposals along independent runs of the
            # fixed-threshold gate (ungated proposals stay near θ_0, where every classifier scores
            # the unsafe ones far below 0.5). Annealing starts at the fixed threshold's unsafe
            # accept rate δ_1 there, tightens as δ_1 · n^-1.5, and is never laxer than 0.5.
            faced, faced_safe = faced_proposals(jax.random.fold_in(calibrate_key, index), problem, fixed,
                                                config["train_runs"], config["iterations"])
            unsafe = faced[~faced_safe]
            if len(unsafe):
                unsafe_scores = np.asarray(jax.jit(jax.vmap(score))(jnp.asarray(unsafe)))
                fixed_rate = max(float(np.mean(unsafe_scores >= 0.5)), 1.0 / len(unsafe_scores))
                annealed = jnp.maximum(0.5, safety.annealed_thresholds(unsafe_scores, config["iterations"], scale=fixed_rate))
            else:  # nothing unsafe to calibrate on: the fixed threshold
                unsafe_scores = np.zeros(0)
                annealed = jnp.full(config["iterations"], 0.5, jnp.float32)
            thresholds = np.asarray(annealed)
            calibration[f"{kind}_annealed"] = {
                "calibration_proposals": int(len(faced_safe)),
                "calibration_unsafe": int(len(unsafe_scores)),
                "calibration_unsafe_max_score": float(unsafe_scores.max()) if len(unsafe_scores) else None,
                "calibration_fixed_rate": float(np.mean(unsafe_scores >= 0.5)) if len(unsafe_scores) else 0.0,
                "threshold_first": float(thresholds[0]),
                "threshold_last": float(thresholds[-1]),
                "steps_above_fixed": int((thresholds > 0.5).sum()),
            }
            schedules["annealed"] = safety.classifier_gate(score, annealed, problem.safety, unit_radius=unit_radius)
        for schedule, gate in schedules.items():
            if f"{kind}_{schedule}" in names:
                gates[f"{kind}_{schedule}"] = gate
    return gates, float(np.mean(np.asarray(safe))), calibration


def verifier_gates(problem, bound, group_bound, group_ids, names):
    built = {
        "ball": lambda: safety.ball_gate(problem.safety, bound),
        "chain": lambda: safety.ball_gate(problem.safety, bound, chain=True),
        "group_chain": lambda: safety.ball_gate(problem.safety, group_bound, chain=True, group_ids=group_ids),
    }
    return {name: built[name]() for name in names if name in built}


def _late(cumulative: np.ndarray) -> int:
    """Counts over the second half of the iterations (0-based steps N//2 .. N-1), summed over
    runs, from cumulative counts `[runs, N]`: the total minus the count after step N//2 - 1."""
    half = cumulative.shape[1] // 2
    before = cumulative[:, half - 1] if half else 0
    return int((cumulative[:, -1] - before).sum())


def run_gate(key, problem, gate, config) -> dict:
    """`--runs` vmapped runs of one gate: summary numbers and run-averaged curves."""
    start = time.perf_counter()
    keys = jax.random.split(key, config["runs"])
    trace = jax.jit(jax.vmap(lambda k: safety.simulate(k, problem, gate, config["iterations"])))(keys)
    trace = jax.tree.map(np.asarray, trace)
    reward0 = float(problem.reward(problem.params))
    improvement = trace.reward - reward0
    safe_proposals = trace.proposal_safe.sum()
    return {
        "accepts": int(trace.accepted.sum()),
        "true_accepts": int(trace.true_accepts[:, -1].sum()),
        "false_accepts": int(trace.false_accepts[:, -1].sum()),
        "true_accept_rate": float(trace.true_accepts[:, -1].sum() / max(safe_proposals, 1)),
        "late_false_accepts": _late(trace.false_accepts),
        "late_true_accepts": _late(trace.true_accepts),
        "reward_improvement": float(improvement[:, -1].mean()),
        "distance_r0": float(trace.distance[:, -1].mean()),
        "max_distance_r0": float(trace.distance.max()),
        "transitions": float(trace.transitions[:, -1].mean()),
        "curve_false_accepts": trace.false_accepts.mean(0).tolist(),
        "curve_reward": improvement.mean(0).tolist(),
        "curve_distance": trace.distance.mean(0).tolist(),
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------
# Problems


def controller_units(config):
    for d in _ints(config["dims"]):
        for gate in (*VERIFIER_GATES, *CLASSIFIER_GATES):
            yield f"controller_d{d}", d, gate


def transformer_model(run_dir: RunDirectory, key, config):
    """Trains the modular-addition transformer once; later calls (and --resume) load it."""
    cache = run_dir.path / "modular_transformer.npz"
    model_config = modular.modular_config(config["modulus"])
    if cache.exists():
        stored = np.load(cache)
        template = jax.eval_shape(lambda: init_params(key, model_config))
        flat = [jnp.asarray(stored[f"leaf{i}"]) for i in range(len(jax.tree.leaves(template)))]
        return model_config, jax.tree.unflatten(jax.tree.structure(template), flat), float(stored["accuracy"])
    model_config, params, accuracy = modular.train_modular_addition(key, config["modulus"], config["train_model_steps"])
    buffer = io.BytesIO()
    np.savez(buffer, accuracy=accuracy, **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    run_dir.write_bytes(cache.name, buffer.getvalue())
    return model_config, params, accuracy


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    done = run_dir.done_keys()
    key = jax.random.key(config["seed"])
    units = [(p, d, g) for p, d, g in controller_units(config)]
    if config["modulus"]:
        units += [("transformer_unembedding", None, g) for g in TRANSFORMER_GATES]
        if _floats(config["kappas"]):
            units += [("transformer_lora", None, f"chain_kappa{k:g}") for k in _floats(config["kappas"])]
    todo = [u for u in units if f"{u[0]}/{u[2]}" not in done]
    run_dir.log.info("%d units, %d to do", len(units), len(todo))
    built: dict = {}
    with tqdm(todo, desc="gate", unit="gate") as bar:
        for problem_name, d, gate_name in bar:
            bar.set_postfix(problem=problem_name, gate=gate_name)
            if problem_name not in built:
                built = {problem_name: build_problem(run_dir, key, problem_name, d, config, [g for p, _, g in todo if p == problem_name])}
            setup = built[problem_name]
            # common random numbers: every gate of a problem sees the same proposal noise
            record = run_gate(jax.random.fold_in(problem_key(key, problem_name), 0), setup["problem"], setup["gates"][gate_name], config)
            record.update(key=f"{problem_name}/{gate_name}", problem=problem_name, gate=gate_name,
                          guarantee=setup["guarantees"].get(gate_name, "none"), **setup["info"],
                          **setup["calibration"].get(gate_name, {}))
            run_dir.append(record)
            run_dir.log.info("%s %s FA=%d TA=%d dR=%.3f dist=%.1f", problem_name, gate_name, record["false_accepts"],
                             record["true_accepts"], record["reward_improvement"], record["distance_r0"])
    return summarize(run_dir)


def problem_key(key, name):
    return jax.random.fold_in(key, zlib.crc32(name.encode()))


def build_problem(run_dir, key, name, d, config, gate_names):
    """The problem, its gates (only those still to run) and the guarantee of each verifier."""
    problem_key_ = problem_key(key, name)
    if name.startswith("controller"):
        controller = safety.controller_problem(problem_key_, d)
        problem, bound = controller.problem, controller.bound
        gates = verifier_gates(problem, bound, controller.group_bound, controller.group_ids, gate_names)
        info = {"d": d}
    else:
        model_config, params, accuracy = transformer_model(run_dir, jax.random.fold_in(key, 7), config)
        task = modular.canary_task(model_config, params, num_canaries=CANARIES)
        info = {"task_accuracy": accuracy}
        if name == "transformer_lora":
            lora = modular.lora_problem(jax.random.fold_in(problem_key_, 1), model_config, params, task, config["lora_rank"])
            gates = {f"chain_kappa{k:g}": safety.ball_gate(lora.problem.safety, lora.bound_fn(k), chain=True) for k in _floats(config["kappas"])}
            info.update(d=lora.size)
            return {"problem": lora.problem, "gates": gates, "guarantees": {g: "conditional" for g in gates}, "info": info,
                    "calibration": {}}
        unembedding = modular.unembedding_problem(model_config, params, task)
        problem, bound = unembedding.problem, unembedding.bound
        gates = verifier_gates(problem, bound, unembedding.group_bound, unembedding.group_ids, gate_names)
        info.update(d=int(np.prod(problem.params.shape)))
    radius = float(problem.safety(problem.params) / bound.value)
    guarantees = {g: "unconditional" for g in gates}
    classifiers = [g for g in gate_names if g in CLASSIFIER_GATES]
    calibration = {}
    if classifiers:
        more, safe_fraction, calibration = classifier_gates(jax.random.fold_in(problem_key_, 2), problem, classifiers, config, radius)
        gates.update(more)
        # on the classifier records only: the verifier records of a problem must not depend on
        # whether its classifier gates ran in the same process (a resumed run)
        for gate in classifiers:
            calibration.setdefault(gate, {})["train_safe_fraction"] = safe_fraction
    return {"problem": problem, "gates": gates, "guarantees": guarantees, "info": info, "calibration": calibration}


# ---------------------------------------------------------------------------------------
# Report

COLUMNS = ["problem", "gate", "guarantee", "false accepts", "late false accepts", "true accepts", "late true accepts",
           "TPR", "reward gain", "distance / r0", "transitions"]


def summarize(run_dir: RunDirectory) -> str:
    records = run_dir.finished
    rows = [{
        "problem": r["problem"].replace("controller_", "controller ").replace("transformer_", "transformer "),
        "gate": r["gate"].replace("_", " "),
        "guarantee": r["guarantee"],
        "false accepts": r["false_accepts"],
        "late false accepts": r["late_false_accepts"],
        "true accepts": r["true_accepts"],
        "late true accepts": r["late_true_accepts"],
        "TPR": r["true_accept_rate"],
        "reward gain": r["reward_improvement"],
        "distance / r0": r["distance_r0"],
        "transitions": r["transitions"],
    } for r in records]
    config = run_dir.config
    header = (f"# Safety gates: {config['runs']} runs x {config['iterations']} iterations per gate (counts summed over runs; "
              "reward gain, distance and transitions averaged). 'late' = second half of the iterations.\n\n")
    table = header + markdown_table(rows, COLUMNS) + "\n"
    run_dir.write_text("summary.md", table)
    plot(run_dir, records)
    return table


def plot(run_dir: RunDirectory, records) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in records))
    fig, axes = plt.subplots(len(problems), 2, figsize=(11, 2.8 * len(problems)), squeeze=False)
    for row, name in zip(axes, problems):
        for r in (r for r in records if r["problem"] == name):
            style = "-" if r["guarantee"] != "none" else "--"
            row[0].plot(r["curve_false_accepts"], style, label=r["gate"])
            row[1].plot(r["curve_reward"], style, label=r["gate"])
        row[0].set_title(f"{name}: cumulative false accepts (mean per run)")
        row[1].set_title(f"{name}: reward improvement")
        row[1].legend(fontsize=6, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(run_dir.path / "gate.png", dpi=110)
    plt.close(fig)
