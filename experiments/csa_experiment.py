"""Conformal Selective Acting vs A-RCPS, CRC, LTT and ACI on synthetic and live risk streams.

Synthetic (default, spec calibration.md §1.8): per scenario, `--streams` streams of
`--rounds` rounds with raw scores S_t ~ U(0, 1) and losses ℓ_t ~ Bernoulli(p_t(S_t)):
stationary, drift and hard from the spec, plus three adversarial shifts of ours: inversion
(after round T/2 the score points the wrong way), burst (four 200-round score-blind outages
at loss rate 0.35) and creep (every round's loss rate rises by 0.15 over the stream, so late
on even the safest scores exceed α). Every method works on the same calibrated risk
r_t = g_{t−1}(S_t) (isotonic, refitted every `--refit-every` rounds on past rounds) and grid;
CRC and LTT are fitted once on the calibrated rounds up to `--calibration-rounds` (they refuse
until then). Metrics per method: the fraction of streams with a pathwise violation (any
t ≥ calibration rounds with R_t^act > α + sqrt(log(K/δ)/(2 N_t))), final selective risk
R_T^act, the true selective risk of the deployed rule (p_t integrated over its acting set;
mean and max over deployed rounds), release rate N_T/T and refused rounds. The oracle row is
the largest raw-score cut whose true selective risk is ≤ α.

`--model smollm2-135m-instruct`: a live cell. `--num-problems` addition problems (one- and
two-digit operands) are answered greedily by the model; loss = wrong answer, raw risk score =
−(mean log p of the answer's digit tokens) from the decode loop's own log-probabilities.
The stream is that sequence of problems, once; no true risk is known there.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxsample as js
from jaxsample import tasks
from jaxsample.calibration import baselines, csa, isotonic_predict
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_scalar
from run_directory import RunDirectory, markdown_table

METHODS = ("csa", "csa_sticky", "arcps", "crc", "ltt", "aci_selective", "aci_marginal")
LABELS = {
    "csa": "CSA (live certificates)",
    "csa_sticky": "CSA (sticky)",
    "arcps": "A-RCPS (marginal)",
    "crc": "CRC (offline)",
    "ltt": "LTT (offline)",
    "aci_selective": "ACI (selective)",
    "aci_marginal": "ACI (marginal)",
    "oracle": "oracle cut",
}
SCENARIOS = ("stationary", "drift", "hard", "inversion", "burst", "creep")
S_GRID = (np.arange(2000) + 0.5) / 2000  # midpoints: integrals over S ~ U(0, 1)


def loss_probability(scenario: str, t: np.ndarray, s: np.ndarray, num_rounds: int) -> np.ndarray:
    """p_t(s) of a scenario, broadcasting `t` `[T, 1]` against `s` `[1, N]`."""
    stationary = 0.02 + 0.6 * s**2 + 0.0 * t
    if scenario == "stationary":
        return stationary
    if scenario == "drift":  # spec §1.8: regression at 2000, recovery at 3500 (scaled with T)
        worse, better = 0.05 + 1.0 * s**2, 0.01 + 0.5 * s**2
        return np.where(t < 0.4 * num_rounds, stationary, np.where(t < 0.7 * num_rounds, worse, better))
    if scenario == "hard":
        return 0.05 + 0.9 * s + 0.0 * t
    if scenario == "inversion":
        return np.where(t < num_rounds // 2, stationary, 0.02 + 0.6 * (1.0 - s) ** 2)
    if scenario == "burst":
        period = num_rounds // 5
        in_burst = (t >= period) & (t % period >= period // 2) & (t % period < period // 2 + period // 5)
        return np.where(in_burst, 0.35, stationary)
    if scenario == "creep":
        return np.minimum(1.0, stationary + 0.15 * t / num_rounds)
    raise ArgumentError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="synthetic", help="'synthetic' (the scenarios) or a chat model for the live cell, e.g. smollm2-135m-instruct")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"synthetic: comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--streams", type=int, default=30, help="synthetic: independent streams per scenario")
    parser.add_argument("--rounds", type=int, default=5000, help="synthetic: rounds T per stream")
    parser.add_argument("--num-problems", type=int, default=240, help="live cell: problems in the stream (its rounds)")
    parser.add_argument("--batch-size", type=int, default=16, help="live cell: problems decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="live cell: answer length cap")
    parser.add_argument("--alpha", type=float, default=0.1, help="error budget α on the selective risk")
    parser.add_argument("--delta", type=float, default=0.1, help="δ: CSA/A-RCPS anytime miscoverage, LTT error probability")
    parser.add_argument("--c", type=float, default=0.5, help="bet cap c: bets lie in [0, c/(1−α)]")
    parser.add_argument("--grid-size", type=int, default=25, help="K thresholds")
    parser.add_argument("--grid-low", type=float, default=0.02, help="smallest threshold τ_1 on the calibrated-risk scale")
    parser.add_argument("--grid-high", type=float, default=0.5, help="largest threshold τ_K")
    parser.add_argument("--refit-every", type=int, default=100, help="rounds between isotonic refits")
    parser.add_argument("--calibration-rounds", type=int, default=500, help="CRC/LTT fit on rounds up to this one; violations are counted after it")
    parser.add_argument("--aci-gamma", type=float, default=0.01, help="ACI step size γ (starts mid-grid)")
    parser.add_argument("--curve-every", type=int, default=25, help="rounds between stored points of the risk/release curves")


def check_config(config: dict) -> None:
    _selected(config, "methods", METHODS)
    if config["model"] == "synthetic":
        _selected(config, "scenarios", SCENARIOS)
    for name in ("streams", "rounds", "num_problems", "batch_size", "max_new_tokens", "grid_size", "refit_every", "curve_every"):
        if config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be ≥ 1, got {config[name]}")
    rounds = config["rounds"] if config["model"] == "synthetic" else config["num_problems"]
    if not config["refit_every"] <= config["calibration_rounds"] < rounds:
        raise ArgumentError(f"--calibration-rounds must lie in [--refit-every, rounds) = [{config['refit_every']}, {rounds}), got {config['calibration_rounds']}")
    for name in ("alpha", "delta", "c"):
        check_scalar(f"--{name}", config[name], "(0, 1)")
    if not 0 <= config["grid_low"] < config["grid_high"]:
        raise ArgumentError(f"--grid-low must be ≥ 0 and < --grid-high, got {config['grid_low']} and {config['grid_high']}")
    if config["aci_gamma"] <= 0:
        raise ArgumentError(f"--aci-gamma must be > 0, got {config['aci_gamma']}")


def _selected(config, option, known):
    chosen = [x.strip() for x in config[option].split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise ArgumentError(f"--{option}: unknown or empty choice {', '.join(unknown)}; choose from {', '.join(known)}")
    return [x for x in known if x in chosen]


# ---------------------------------------------------------------------------------------
# Running the methods on a batch of streams


def run_methods(config, methods, scores, losses):
    """Actions `[B, T]` and deployed thresholds `[B, T]` (NaN: refusing) of every method."""
    grid = np.linspace(config["grid_low"], config["grid_high"], config["grid_size"])
    batch = scores.shape[0]
    repeat = lambda state: jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape)), state)  # noqa: E731
    risks = np.stack([csa.calibrated_risks(s, l, config["refit_every"]) for s, l in zip(scores, losses)])
    out = {}
    for method in methods:
        if method in ("csa", "csa_sticky", "arcps"):
            state = csa.init(grid, config["alpha"], config["delta"], config["c"])
            step = baselines.build_arcps_kernel() if method == "arcps" else csa.build_kernel(sticky=method == "csa_sticky")
            _, info, _ = csa.run_stream(step, repeat(state), scores, losses, config["refit_every"])
            deployed = np.asarray(info.deployed)
            threshold = np.where(deployed >= 0, grid[np.maximum(deployed, 0)], np.nan)
            action = np.asarray(info.action)
        elif method.startswith("aci"):
            state = baselines.aci_init(grid, config["alpha"], config["aci_gamma"])
            step = baselines.build_aci_kernel(selective=method == "aci_selective")
            _, info, _ = csa.run_stream(step, repeat(state), scores, losses, config["refit_every"])
            threshold, action = np.asarray(info.threshold, np.float64), np.asarray(info.action)
        else:
            fitted = slice(config["refit_every"], config["calibration_rounds"])  # rounds with an isotonic fit
            threshold = np.full(scores.shape, np.nan)
            for b in range(batch):
                if method == "crc":
                    k = baselines.crc_fit(risks[b, fitted], losses[b, fitted], grid, config["alpha"])
                else:
                    k = baselines.ltt_fit(risks[b, fitted], losses[b, fitted], grid, config["alpha"], config["delta"])
                if k >= 0:
                    threshold[b, config["calibration_rounds"]:] = grid[k]
            action = risks <= np.nan_to_num(threshold, nan=-np.inf)
        out[method] = (action.astype(bool), threshold)
    return out


def calibration_maps(config, scores, losses):
    """g of every stream and refit block on the score grid, `[B, blocks, N]` (NaN before the first fit)."""
    m = config["refit_every"]
    maps = np.full((scores.shape[0], -(-scores.shape[1] // m), len(S_GRID)), np.nan)
    for b in range(scores.shape[0]):
        for block, fit in enumerate(csa.isotonic_refits(scores[b], losses[b], m)):
            if fit is not None:
                maps[b, block] = isotonic_predict(fit, S_GRID)
    return maps


def true_risk_of_deployed(config, maps, thresholds, cumulative_p):
    """p_t integrated over the deployed rule's acting set {s : g_t(s) ≤ τ_t}, `[B, T]` (NaN: none).

    g_t (`maps`, from `calibration_maps`) is non-decreasing, so the acting set is a prefix of
    the score grid; `cumulative_p` `[T, N]` holds the running sums of p_t over that grid.
    """
    m = config["refit_every"]
    out = np.full(thresholds.shape, np.nan)
    rounds = np.arange(thresholds.shape[1])
    for b, block in np.argwhere(~np.isnan(maps[:, :, 0])):
        span = slice(block * m, (block + 1) * m)
        count = np.searchsorted(maps[b, block], np.nan_to_num(thresholds[b, span], nan=-np.inf), side="right")
        ok = count > 0
        out[b, span][ok] = cumulative_p[rounds[span][ok], count[ok] - 1] / count[ok]
    return out


def stream_metrics(config, action, losses, true_risk, threshold):
    """Per-stream metrics and mean curves of one method."""
    grid_size = config["grid_size"]
    acted = np.cumsum(action, axis=1)
    acted_loss = np.cumsum(action * losses, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        running = acted_loss / acted
        bound = config["alpha"] + np.sqrt(math.log(grid_size / config["delta"]) / (2 * acted))
    after = np.arange(action.shape[1]) >= config["calibration_rounds"]
    violated = ((running > bound) & (acted > 0) & after).any(axis=1)
    every = config["curve_every"]
    rounds = np.arange(action.shape[1])
    metrics = {
        "violated": violated.tolist(),
        "final_risk": [float(x) if n else None for x, n in zip(running[:, -1], acted[:, -1])],
        "release": (acted[:, -1] / action.shape[1]).tolist(),
        "refused": np.isnan(threshold).sum(axis=1).tolist(),
        "risk_curve": _mean_over_acting_streams(np.where(acted > 0, running, np.nan)[:, ::every]),
        "release_curve": (acted / (rounds + 1))[:, ::every].mean(axis=0).tolist(),
    }
    if true_risk is not None:
        deployed = ~np.isnan(true_risk)
        metrics["true_mean"] = [float(r[d].mean()) if d.any() else None for r, d in zip(true_risk, deployed)]
        metrics["true_max"] = [float(r[d].max()) if d.any() else None for r, d in zip(true_risk, deployed)]
    return metrics


def _mean_over_acting_streams(values):
    """Column means over the streams that have acted so far (NaN where none has)."""
    counts = (~np.isnan(values)).sum(axis=0)
    return np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan).tolist()


def oracle_release(config, p):
    """Mean over rounds of the largest raw-score cut with true selective risk ≤ α, and its risk."""
    running = np.cumsum(p, axis=1) / np.arange(1, p.shape[1] + 1)
    ok = running <= config["alpha"]
    count = np.where(ok.any(axis=1), p.shape[1] - np.argmax(ok[:, ::-1], axis=1), 0)
    risk = np.where(count > 0, running[np.arange(len(p)), np.maximum(count - 1, 0)], np.nan)
    return float(count.mean() / p.shape[1]), risk


# ---------------------------------------------------------------------------------------
# Streams


def synthetic_stream(config, scenario, seed):
    rng = np.random.default_rng(seed)
    shape = (config["streams"], config["rounds"])
    scores = rng.random(shape)
    t = np.arange(config["rounds"])[None, :]
    p = loss_probability(scenario, np.broadcast_to(t, shape), scores, config["rounds"])
    losses = (rng.random(shape) < p).astype(np.float64)
    p_grid = loss_probability(scenario, np.arange(config["rounds"])[:, None], S_GRID[None, :], config["rounds"])
    return scores, losses, p_grid


def answer_digit_log_p(tokenizer, tokens, log_p, length):
    """Mean log p of the trailing digit tokens of the answer (before the stop token)."""
    pieces = [tokenizer.decode([int(t)]) for t in tokens[:length]]
    end = length
    while end > 0 and not any(ch.isdigit() for ch in pieces[end - 1]):
        end -= 1
    start = end
    while start > 0 and pieces[start - 1].strip().replace(",", "").isdigit():
        start -= 1
    return float(np.mean(log_p[start:end])) if end > start else float(np.mean(log_p[:length]))


def live_stream(config, run_dir: RunDirectory):
    """Greedy answers of the model to a stream of addition problems: (scores, losses) `[1, n]`."""
    lm = js.load(config["model"])
    rng = np.random.default_rng(config["seed"])
    digits = rng.integers(1, 3, size=config["num_problems"])
    problems = [tasks.ArithmeticProblem(int(rng.integers(0 if d == 1 else 10, 10**d)), int(rng.integers(0 if d == 1 else 10, 10**d)), "+") for d in digits]
    done = {r["key"]: r for r in run_dir.finished if r["key"].startswith("problem/")}
    greedy = js.Proposal(temperature=1.0, top_k=1).validated()
    size, max_new = config["batch_size"], config["max_new_tokens"]
    for start in tqdm(range(0, len(problems), size), desc=f"csa live [{lm.name}]", unit="batch"):
        chunk = [(i, p) for i, p in enumerate(problems[start:start + size], start) if f"problem/{i}" not in done]
        if not chunk:
            continue
        prompts = [list(tasks.arithmetic_prompt(lm.tokenizer, p)) for _, p in chunk]
        width = max(map(len, prompts))
        padded = jnp.asarray([q + [lm.pad_token_id] * (width - len(q)) for q in prompts], jnp.int32)
        state = js.init_decode(lm, padded, len(chunk), max_new, prompt_lengths=jnp.asarray([len(q) for q in prompts]))
        state, _ = js.extend(jax.random.key(start), lm, state, max_new, greedy)
        tokens, log_p, lengths = np.asarray(state.tokens), np.asarray(state.log_p), np.asarray(state.length)
        for row, (i, problem) in enumerate(chunk):
            text = lm.tokenizer.decode([int(t) for t in tokens[row, :lengths[row]] if t != lm.pad_token_id])
            record = {
                "key": f"problem/{i}", "question": problem.question, "reply": text,
                "correct": bool(tasks.grade_arithmetic(problem, text)),
                "score": -answer_digit_log_p(lm.tokenizer, tokens[row], log_p[row], int(lengths[row])),
            }
            run_dir.append(record)
            done[record["key"]] = record
    ordered = [done[f"problem/{i}"] for i in range(len(problems))]
    scores = np.asarray([[r["score"] for r in ordered]])
    losses = np.asarray([[0.0 if r["correct"] else 1.0 for r in ordered]])
    return scores, losses


# ---------------------------------------------------------------------------------------
# The run


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    methods = _selected(config, "methods", METHODS)
    done = run_dir.done_keys()
    if config["model"] == "synthetic":
        scenarios = _selected(config, "scenarios", SCENARIOS)
        for scenario in tqdm(scenarios, desc="csa scenarios", unit="scenario"):
            # a run stopped mid-scenario resumes with the units it has not saved; each method
            # is deterministic and independent of the others, so the rest are not rerun
            todo = [m for m in methods if f"{scenario}/{m}" not in done]
            if not todo and f"{scenario}/oracle" in done:
                continue
            # Seeded by the scenario's place in SCENARIOS, not in the selection: a scenario's
            # streams are the same whichever others run with it.
            seed = config["seed"] * 1000 + SCENARIOS.index(scenario)
            scores, losses, p_grid = synthetic_stream(config, scenario, seed)
            cumulative_p = np.cumsum(p_grid, axis=1)
            if f"{scenario}/oracle" not in done:
                release, oracle_risk = oracle_release(config, p_grid)
                run_dir.append({"key": f"{scenario}/oracle", "scenario": scenario, "method": "oracle", "release_mean": release,
                                "true_mean": float(np.nanmean(oracle_risk)), "true_max": float(np.nanmax(oracle_risk))})
            maps = calibration_maps(config, scores, losses)
            for method, (action, threshold) in run_methods(config, todo, scores, losses).items():
                true_risk = true_risk_of_deployed(config, maps, threshold, cumulative_p)
                record = stream_metrics(config, action, losses, true_risk, threshold)
                record.update(key=f"{scenario}/{method}", scenario=scenario, method=method)
                run_dir.append(record)
                run_dir.log.info("%s %s violation=%.2f release=%.3f", scenario, method, np.mean(record["violated"]), np.mean(record["release"]))
    else:
        scores, losses = live_stream(config, run_dir)
        run_dir.log.info("live stream: %d problems, error rate %.3f", scores.shape[1], losses.mean())
        todo = [m for m in methods if f"live/{m}" not in done]
        for method, (action, threshold) in run_methods(config, todo, scores, losses).items():
            record = stream_metrics(config, action, losses, None, threshold)
            record.update(key=f"live/{method}", scenario=f"live {config['model']} ({scores.shape[1]} problems, error {losses.mean():.2f})", method=method)
            run_dir.append(record)
    return summarize(run_dir, methods)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else "—"


def summarize(run_dir: RunDirectory, methods) -> str:
    records = [r for r in run_dir.finished if "method" in r]
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for method in [*methods, "oracle"]:
            chosen = [r for r in records if r["scenario"] == scenario and r["method"] == method]
            if not chosen:
                continue
            r = chosen[0]
            if method == "oracle":
                rows.append({"scenario": scenario, "method": LABELS[method], "release rate": r["release_mean"],
                             "true risk mean": r["true_mean"], "true risk max": r["true_max"]})
                continue
            maxima = [v for v in r.get("true_max", []) if v is not None]
            rows.append({
                "scenario": scenario, "method": LABELS[method],
                "violation rate": float(np.mean(r["violated"])),
                "final selective risk": _mean(r["final_risk"]),
                "true risk mean": _mean(r["true_mean"]) if "true_mean" in r else "—",
                "true risk max": (float(max(maxima)) if maxima else "—") if "true_max" in r else "—",
                "release rate": float(np.mean(r["release"])),
                "refused rounds": float(np.mean(r["refused"])),
            })
    columns = ["scenario", "method", "violation rate", "final selective risk", "true risk mean", "true risk max", "release rate", "refused rounds"]
    table = markdown_table(rows, columns)
    plot_path = _plot(run_dir, records, methods)
    text = f"{table}\n\nplot: {plot_path}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _plot(run_dir: RunDirectory, records, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    fig, axes = plt.subplots(2, len(scenarios), figsize=(3.6 * len(scenarios), 6), squeeze=False)
    every = run_dir.config["curve_every"]
    for column, scenario in enumerate(scenarios):
        for method in methods:
            chosen = [r for r in records if r["scenario"] == scenario and r["method"] == method]
            if not chosen:
                continue
            rounds = np.arange(len(chosen[0]["risk_curve"])) * every
            risk = np.asarray(chosen[0]["risk_curve"], dtype=float)  # null (no stream acted yet) → NaN
            axes[0, column].plot(rounds, risk, label=LABELS[method], lw=1)
            axes[1, column].plot(rounds, chosen[0]["release_curve"], label=LABELS[method], lw=1)
        axes[0, column].axhline(run_dir.config["alpha"], color="k", ls=":", lw=1)
        axes[0, column].set_title(scenario[:40], fontsize=9)
        axes[0, column].set_ylim(0, 0.3)
        axes[1, column].set_xlabel("round t")
    axes[0, 0].set_ylabel("selective risk R_t^act (mean)")
    axes[1, 0].set_ylabel("release N_t / t (mean)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    path = run_dir.path / "csa.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
