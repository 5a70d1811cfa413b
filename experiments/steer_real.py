"""`run.py steer --setting smollm2`: A-LQR sentiment steering of a real chat model.

The concept is defined by two prompt sets written for this experiment
(data/steer_sentiment_positive.txt, the desired side, and data/steer_sentiment_negative.txt,
line-by-line mirror images of it). E_k is the mean difference of their last-token states
(`--setpoint-prompts` per side, all of them if unset); the Jacobians A_k are averaged over
`--jacobian-prompts` prompts of exactly `--jacobian-tokens` tokens (each the concatenation of
a positive and a negative contrast sentence, and more, truncated: benign text of fixed
length); K_k comes from the Riccati recursion (q, r, q_f). Every method steers
`--test-prompts` neutral sentence openings (data/steer_sentiment_neutral.txt, all of them if
unset) toward positive sentiment at the last prompt token and every generated token,
`--samples` continuations each.

Setpoint: with `--setpoint absolute` (default) β*_k = λ‖E_k‖, as in the reference code. In
SmolLM2 the class means sit far from the origin along v_k at the early blocks (24.7‖E_2‖
at the input of block 2, within about ±2‖E_k‖ from block 15 on), so one λ asks the early blocks
to move toward the undesired side and the deep ones toward the desired side.
`--setpoint centred` measures the setpoint from the midpoint m_k of the two class means:
β*_k = v_kᵀm_k + λ‖E_k‖, so λ = ½ is the desired class mean at every block and λ = 0 the
midpoint. (Measured on SmolLM2, both work; see README.)

Baselines at matched control size (Σ_k ‖u_k‖ at the last prompt token, averaged over the
test prompts, equal to A-LQR's at the same λ): ActAdd (c·E_k at block `--actadd-layer`),
a mean-difference vector at every block, and S-PID on A-LQR's error (its K_p rescaled
until matched, K_i, K_d fixed multiples of it).

Measured: P(positive) of each continuation from a bag-of-words logistic scorer fitted to
data/sentiment_train.tsv (held-out accuracy on data/sentiment_test.tsv is reported), the
perplexity of the continuations under the unsteered model (`js.score`), Dist-1/2/3 (distinct
n-grams over n-grams of each continuation's tokens, averaged), and the cost: steered vs plain
`js.generate` seconds per call, timed interleaved in the same process.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxsample as js
from jaxsample import steering
from jaxsample.decoding import extend, init_decode
from jaxsample.errors import ArgumentError
from jaxsample.sampling import Proposal
from run_directory import RunDirectory, markdown_table
from timing import interleaved_timings, machine

DATA = Path(__file__).resolve().parent / "data"
DESIRED, UNDESIRED, NEUTRAL = (DATA / f"steer_sentiment_{side}.txt" for side in ("positive", "negative", "neutral"))
SCORER_TRAIN, SCORER_TEST = DATA / "sentiment_train.tsv", DATA / "sentiment_test.tsv"
METHODS = ("alqr", "spid", "actadd", "mean_difference")
SETPOINTS = ("absolute", "centred")
LINEARISATION_SCALES = (0.01, 0.03, 0.1, 0.3)
CALIBRATION_ROUNDS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the real-model setting only (λ, q, r, q_f, prompt counts and the
    S-PID / ActAdd settings are shared with the synthetic one)."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2 setting: registered model name or checkpoint directory (needs a tokenizer)")
    parser.add_argument("--setpoint", choices=SETPOINTS, default="absolute", help="smollm2 setting: β*_k = λ‖E_k‖ from the origin (absolute, the reference code) or from the class midpoint (centred)")
    parser.add_argument("--jacobian-tokens", type=int, default=24, help="smollm2 setting: tokens of each Jacobian prompt")
    parser.add_argument("--samples", type=int, default=2, help="smollm2 setting: continuations per test prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="smollm2 setting: sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="smollm2 setting: nucleus mass")
    parser.add_argument("--timing-samples", type=int, default=5, help="smollm2 setting: interleaved timing rounds of steered vs plain js.generate (0: no timing)")


def check_config(config: dict) -> None:
    for name, low in (("jacobian_tokens", 1), ("samples", 1), ("timing_samples", 0)):
        if not isinstance(config[name], int) or config[name] < low:
            raise ArgumentError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {config[name]!r}")
    if not config["temperature"] > 0:
        raise ArgumentError(f"--temperature must be > 0, got {config['temperature']}")
    if not 0 < config["top_p"] <= 1:
        raise ArgumentError(f"--top-p must be in (0, 1], got {config['top_p']}")
    if config["setpoint"] not in SETPOINTS:
        raise ArgumentError(f"--setpoint must be one of {SETPOINTS}, got {config['setpoint']!r}")
    available = (
        ("setpoint_prompts", min(len(read_lines(DESIRED)), len(read_lines(UNDESIRED))), f"contrast prompts a side in {DESIRED.name} and {UNDESIRED.name}"),
        ("test_prompts", len(read_lines(NEUTRAL)), f"neutral openings in {NEUTRAL.name}"),
    )
    for name, count, what in available:
        if config[name] is not None and config[name] > count:
            raise ArgumentError(f"--{name.replace('_', '-')} {config[name]} is more than the {count} {what}; give at most {count}, or leave it unset for all of them")


# ---------------------------------------------------------------------------------------
# Text and metrics


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_labelled(path: Path) -> tuple[list[str], np.ndarray]:
    """`label<TAB>sentence` lines → (sentences, int labels)."""
    rows = [line.split("\t", 1) for line in read_lines(path)]
    return [text for _, text in rows], np.asarray([int(label) for label, _ in rows])


def encode(lm, texts: list[str], length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Right-padded int32 `[P, T]` token ids and real lengths `[P]`; with `length`, every
    text truncated to it (shorter ones are an error)."""
    ids = [lm.tokenizer.encode(text) for text in texts]
    if length is not None:
        short = [i for i, x in enumerate(ids) if len(x) < length]
        if short:
            raise ArgumentError(f"text {short[0]} has {len(ids[short[0]])} tokens, fewer than {length}")
        ids = [x[:length] for x in ids]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), lm.pad_token_id, np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    return jnp.asarray(tokens), jnp.asarray([len(x) for x in ids], jnp.int32)


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Dist-n: distinct n-grams / n-grams within each sequence, averaged over the sequences
    that have an n-gram (1 = no repetition)."""
    ratios = []
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return float(np.mean(ratios)) if ratios else float("nan")


def jacobian_texts(desired: list[str], undesired: list[str], count: int) -> list[str]:
    """`count` benign texts: contrast sentences joined (positive, negative, next positive...)."""
    pool = [s for pair in zip(desired, undesired) for s in pair]
    return [" ".join(pool[(2 * i + j) % len(pool)] for j in range(4)) for i in range(count)]


# ---------------------------------------------------------------------------------------
# Steering setup


def last_token_states(lm, tokens, lengths, batch: int = 32) -> jax.Array:
    return jnp.concatenate(
        [steering.last_token_states(lm, tokens[i : i + batch], lengths[i : i + batch]) for i in range(0, tokens.shape[0], batch)],
        axis=1,
    )


def make_setup(lm, config: dict, log) -> tuple[dict, dict]:
    """E, K, the setpoint offsets and the test prompts; and what to record about them."""
    desired, undesired = read_lines(DESIRED), read_lines(UNDESIRED)
    count = min(len(desired), len(undesired)) if config["setpoint_prompts"] is None else config["setpoint_prompts"]
    began = time.perf_counter()
    states = {side: last_token_states(lm, *encode(lm, texts[:count])) for side, texts in (("desired", desired), ("undesired", undesired))}
    E = steering.contrastive_directions(states["desired"], states["undesired"])
    check_directions(E, config)
    states_s = time.perf_counter() - began
    began = time.perf_counter()
    jacobian_prompts, _ = encode(lm, jacobian_texts(desired, undesired, config["jacobian_prompts"]), config["jacobian_tokens"])
    A = jax.block_until_ready(steering.layer_jacobians(lm, jacobian_prompts))
    jacobian_s = time.perf_counter() - began
    log.info("E from %d prompts a side in %.1f s; A_k over %d prompts x %d tokens in %.1f s", count, states_s, jacobian_prompts.shape[0], config["jacobian_tokens"], jacobian_s)
    K = steering.riccati_gains(A, config["q"], config["r"], config["q_final"])
    v, norms = steering.unit_directions(E)
    midpoint = 0.5 * (states["desired"].mean(1) + states["undesired"].mean(1))
    offset = jnp.sum(v * midpoint, -1) if config["setpoint"] == "centred" else jnp.zeros_like(norms)
    neutral = read_lines(NEUTRAL)[: config["test_prompts"]]  # None (unset): all of them
    prompts, lengths = encode(lm, neutral)
    test_states = last_token_states(lm, prompts, lengths)
    hidden = lm.hidden_states(jacobian_prompts[:1])
    layers = sorted({0, lm.num_layers // 2, lm.num_layers - 1})
    linearity = {  # against the prompt's own Jacobian (→ 0 with δ if smooth) and the average A_k
        str(k): {
            name: steering.linearisation_error(lm, k, hidden[k], jacobian, LINEARISATION_SCALES, jax.random.key(k)).tolist()
            for name, jacobian in (("own", steering.last_token_jacobian(lm, k, hidden[k])), ("averaged", A[k]))
        }
        for k in layers
    }
    scale = jnp.where(norms > 0, norms, 1.0)

    def position(s):  # where prompts sit along v_k, in units of ‖E_k‖ from the setpoint origin
        return ((jnp.einsum("kpd,kd->k", s, v) / s.shape[1] - offset) / scale).tolist()

    setup = {"E": E, "K": K, "offset": offset[: lm.num_layers], "prompts": prompts, "lengths": lengths, "texts": neutral}
    info = {
        "setpoint_prompts": count, "jacobian_prompts": int(jacobian_prompts.shape[0]), "test_prompts": len(neutral),
        "states_s": states_s, "jacobian_s": jacobian_s, "E_norm": norms.tolist(),
        "desired_lam": position(states["desired"]), "undesired_lam": position(states["undesired"]), "test_lam": position(test_states),
        "linearisation_error": linearity,
    }
    return setup, info


def check_directions(E, config: dict) -> None:
    """Raises unless some block has E_k ≠ 0 (A-LQR and the mean difference steer along those)
    and ActAdd's block `--actadd-layer` is one of them (both settings)."""
    norms = np.asarray(jnp.linalg.norm(E, axis=-1))
    advice = "the desired and undesired prompts give the same states there; raise --setpoint-prompts"
    if not np.any(norms[:-1] > 0):
        raise ArgumentError(f"the contrastive directions E_k are zero at every block: {advice}")
    layer = config["actadd_layer"]
    if not norms[layer] > 0:
        usable = [k for k in range(len(norms) - 1) if norms[k] > 0]
        raise ArgumentError(f"E_{layer} is zero, so ActAdd at --actadd-layer {layer} has no direction: {advice}, "
                            f"or choose a block with E_k ≠ 0 ({', '.join(map(str, usable))})")


def alqr_controller(setup: dict, lam: float) -> steering.Controller:
    ctrl = steering.controller(setup["K"], setup["E"], lam)
    return ctrl._replace(beta=ctrl.beta + setup["offset"])


def intervention(method: str, E, ctrl: steering.Controller, size: float, config: dict):
    """The method's intervention (both settings): `size` sets the open-loop Σ_k ‖u_k‖ and
    S-PID's K_p; the mean difference spreads it over the blocks with E_k ≠ 0."""
    layers = E.shape[0] - 1  # E has a row per block input and one for the last output
    if method == "alqr":
        return steering.alqr_intervention(ctrl)
    if method == "spid":
        return steering.pid_intervention(ctrl, size, config["pid_ki"] * size, config["pid_kd"] * size)
    if method == "actadd":
        layer = config["actadd_layer"]
        return steering.actadd_intervention(E, layer, size / jnp.linalg.norm(E[layer]))
    if method == "mean_difference":
        nonzero = int(jnp.sum(jnp.linalg.norm(E[:layers], axis=-1) > 0))
        return steering.mean_difference_intervention(E, size / nonzero, layers)
    raise ValueError(method)


@jax.jit
def _control_size(lm, steered, prompts, lengths):
    """Σ_k ‖u_k‖ at each prompt's last token, u_k = block k's edited output − its plain
    output on the same input: `[P]`."""
    last = lengths - 1
    hidden = steered.forward(prompts, output="hidden_states", intervene_from=last)
    u = jnp.stack([hidden[k + 1] - lm.apply_layer(k, hidden[k]) for k in range(lm.num_layers)])
    at_last = jnp.take_along_axis(u, last[None, :, None, None], axis=2)[:, :, 0]
    return jnp.linalg.norm(at_last, axis=-1).sum(0)


@partial(jax.jit, static_argnames="new_tokens")
def _continue(key, lm, prompts, lengths, proposal, new_tokens):
    state = init_decode(lm, prompts, prompts.shape[0], new_tokens, prompt_lengths=lengths)
    state, _ = extend(key, lm, state, new_tokens, proposal)
    return state.tokens, state.length


def evaluate(key, lm, scorer, setup: dict, iv, config: dict) -> dict:
    """Continuations of every test prompt under intervention `iv` (None: unsteered)."""
    steered = lm if iv is None else lm.with_intervention(iv)
    samples = config["samples"]
    prompts, lengths = (jnp.repeat(x, samples, axis=0) for x in (setup["prompts"], setup["lengths"]))
    proposal = Proposal(temperature=config["temperature"], top_p=config["top_p"]).validated()
    tokens, generated = _continue(key, steered, prompts, lengths, proposal, config["new_tokens"])
    log_p = js.score(lm, prompts, tokens, generated, prompt_lengths=lengths)
    tokens, generated, log_p = np.asarray(tokens), np.asarray(generated), np.asarray(log_p)
    sequences = [tokens[i, : generated[i]].tolist() for i in range(len(generated))]
    texts = [lm.tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]
    positive = scorer.probability(texts)
    u = np.asarray(_control_size(lm, steered, setup["prompts"], setup["lengths"])) if iv is not None else np.zeros(1)
    return {
        "u": float(u.mean()),
        "positive": float(positive.mean()),
        "positive_se": float(positive.std(ddof=1) / np.sqrt(len(positive))),
        "positive_rate": float(np.mean(positive > 0.5)),
        "perplexity": float(np.exp(-log_p.sum() / max(generated.sum(), 1))),
        **{f"dist{n}": distinct_n(sequences, n) for n in (1, 2, 3)},
        "tokens": float(generated.mean()),
        "texts": texts,
    }


def evaluate_lam(key, lm, scorer, setup: dict, lam: float, config: dict) -> list[dict]:
    """Every method at λ: A-LQR first, the others at its mean control size."""
    ctrl = alqr_controller(setup, lam)

    def measure(method, size):
        return {"method": method, "size": size, **evaluate(key, lm, scorer, setup, intervention(method, setup["E"], ctrl, size, config), config)}

    rows = [measure("alqr", 0.0)]
    target = rows[0]["u"]
    rows += [measure(method, target) for method in ("actadd", "mean_difference")]
    # S-PID's control is linear in its gains only along a fixed trajectory: rescale K_p
    # toward the target on the prompts (cheap), then generate once.
    prompts, lengths, kp = setup["prompts"], setup["lengths"], 1.0
    for _ in range(CALIBRATION_ROUNDS):
        size = float(_control_size(lm, lm.with_intervention(intervention("spid", setup["E"], ctrl, kp, config)), prompts, lengths).mean())
        if not size > 0:
            break
        kp *= target / size
    rows.append(measure("spid", kp))
    return rows


def measure_cost(lm, setup: dict, lam: float, config: dict) -> dict:
    """Seconds per `js.generate` call, plain vs A-LQR-steered, timed interleaved."""
    prompt = setup["prompts"][0, : int(setup["lengths"][0])]
    steered = lm.with_intervention(steering.alqr_intervention(alqr_controller(setup, lam)))
    samples, new_tokens = 8, config["new_tokens"]
    key = jax.random.key(config["seed"])

    def call(model):
        return lambda: js.generate(key, model, prompt, new_tokens, temperature=config["temperature"], top_p=config["top_p"], num_samples=samples).tokens

    timings = interleaved_timings({"plain": call(lm), "alqr": call(steered)}, samples=config["timing_samples"], min_sample_s=0)
    tokens = samples * new_tokens
    return {
        "lam": lam, "num_samples": samples, "new_tokens": new_tokens, "machine": machine(),
        "plain_s": timings["plain"]["median_s"], "alqr_s": timings["alqr"]["median_s"],
        "plain_spread": timings["plain"]["spread"], "alqr_spread": timings["alqr"]["spread"],
        "plain_tokens_per_s": tokens / timings["plain"]["median_s"], "alqr_tokens_per_s": tokens / timings["alqr"]["median_s"],
        "ratio": timings["alqr"]["median_s"] / timings["plain"]["median_s"],
    }


# ---------------------------------------------------------------------------------------
# Run and report


def run(run_dir: RunDirectory, sweep: list[float]) -> str:
    """The smollm2 setting over the setpoint scales `sweep` (λ)."""
    config = run_dir.config
    began = time.perf_counter()
    lm = js.load(config["model"])
    if lm.tokenizer is None:
        raise ArgumentError(f"--model {config['model']} has no tokenizer; the smollm2 setting steers text")
    if not 0 <= config["actadd_layer"] < lm.num_layers:
        raise ArgumentError(f"--actadd-layer must be in [0, {lm.num_layers}) for {config['model']}, got {config['actadd_layer']}")
    scorer = steering.fit_bag_of_words(*read_labelled(SCORER_TRAIN))
    held_out, labels = read_labelled(SCORER_TEST)
    scorer_accuracy = float(np.mean((scorer.probability(held_out) > 0.5) == labels))
    setup, info = make_setup(lm, config, run_dir.log)
    done = run_dir.done_keys()
    if "setup" not in done:
        run_dir.append({"key": "setup", "model": config["model"], "scorer_accuracy": scorer_accuracy, "scorer_held_out": len(labels), **info})
    key = jax.random.key(config["seed"])
    todo = (["none"] if "none" not in done else []) + [lam for lam in sweep if f"lam{lam:g}" not in done]
    for item in tqdm(todo, desc="steer smollm2", unit="setting"):
        if item == "none":
            run_dir.append({"key": "none", "rows": [{"method": "none", "size": 0.0, **evaluate(key, lm, scorer, setup, None, config)}]})
        else:
            run_dir.append({"key": f"lam{item:g}", "lam": item, "rows": evaluate_lam(key, lm, scorer, setup, item, config)})
    if "cost" not in done and config["timing_samples"]:
        run_dir.append({"key": "cost", **measure_cost(lm, setup, sweep[len(sweep) // 2], config)})
    run_dir.log.info("smollm2 steering run: %.0f s", time.perf_counter() - began)
    return summarize(run_dir)


def summarize(run_dir: RunDirectory) -> str:
    records = {r["key"]: r for r in run_dir.finished}
    sweeps = sorted((r for r in run_dir.finished if r["key"].startswith("lam")), key=lambda r: r["lam"])
    rows = []
    for record in ([records["none"]] if "none" in records else []) + sweeps:
        for row in record["rows"]:
            rows.append({
                "λ": f"{record['lam']:g}" if "lam" in record else "—",
                "method": row["method"],
                "Σ‖u_k‖": f"{row['u']:.1f}",
                "P(positive)": f"{row['positive']:.3f} ± {row['positive_se']:.3f}",
                "positive rate": f"{row['positive_rate']:.3f}",
                "perplexity": f"{row['perplexity']:.1f}",
                "Dist-1": f"{row['dist1']:.3f}",
                "Dist-2": f"{row['dist2']:.3f}",
                "Dist-3": f"{row['dist3']:.3f}",
            })
    text = [markdown_table(rows, list(rows[0]) if rows else ["λ"]), ""]
    setup, cost = records.get("setup"), records.get("cost")
    if setup:
        shown = sorted({*range(0, len(setup["E_norm"]), 5), 1, 2, len(setup["E_norm"]) - 1})
        text += [
            f"Model {setup['model']}; {setup['test_prompts']} neutral test prompts × {run_dir.config['samples']} continuations of "
            f"{run_dir.config['new_tokens']} tokens (temperature {run_dir.config['temperature']:g}, top-p {run_dir.config['top_p']:g}), "
            f"the same key for every row. Σ‖u_k‖: control summed over blocks at the last prompt token, mean over prompts "
            f"(ActAdd and mean difference matched to A-LQR at each λ; S-PID's gain is calibrated in a few rescalings, so its "
            f"size is only near A-LQR's: compare the column). P(positive): bag-of-words scorer, mean ± standard error over continuations (a prompt's continuations counted as independent, which understates it) "
            f"(held-out accuracy {setup['scorer_accuracy']:.3f} on {setup['scorer_held_out']} labelled sentences). "
            "Perplexity: unsteered model, over all continuation tokens. Dist-n: distinct n-grams per continuation.",
            "",
            f"Setpoint: {run_dir.config['setpoint']}; q = {run_dir.config['q']:g}, r = {run_dir.config['r']:g}, q_f = {run_dir.config['q_final']:g}. "
            f"E_k from {setup['setpoint_prompts']} prompts a side ({setup['states_s']:.0f} s); A_k over {setup['jacobian_prompts']} prompts × "
            f"{run_dir.config['jacobian_tokens']} tokens ({setup['jacobian_s']:.0f} s).",
            f"Mean position along v_k in units of ‖E_k‖ from the setpoint origin (the λ that targets it) at k = {shown} "
            f"(block inputs; {len(setup['E_norm']) - 1} is the output): "
            + "; ".join(
                f"{name} {[round(setup[field][k], 2) for k in shown]}"
                for name, field in (("desired", "desired_lam"), ("undesired", "undesired_lam"), ("test prompts", "test_lam"))
            ),
            f"Linearisation error ‖f(x+δ) − f(x) − Aδ‖/‖δ‖ of one Jacobian prompt at ‖δ‖/‖x‖ = {list(LINEARISATION_SCALES)}, with its own "
            "Jacobian / with the averaged A_k: "
            + "; ".join(
                f"block {k}: {[round(e, 4) for e in errors['own']]} / {[round(e, 4) for e in errors['averaged']]}"
                for k, errors in setup["linearisation_error"].items()
            ),
        ]
    if cost:
        text += [
            "",
            f"Cost (λ = {cost['lam']:g}, {cost['num_samples']} samples × {cost['new_tokens']} tokens, median of interleaved rounds): "
            f"plain js.generate {cost['plain_tokens_per_s']:.1f} tokens/s, A-LQR {cost['alqr_tokens_per_s']:.1f} tokens/s; "
            f"steered/plain time {cost['ratio']:.3f}× (spreads {cost['plain_spread']:.2f}, {cost['alqr_spread']:.2f}; {cost['machine']['device']}).",
        ]
    plot = _plot(run_dir, records.get("none"), sweeps) if sweeps else None
    text += ["", f"plot: {plot}", f"results: {run_dir.results_path}", ""]
    run_dir.write_text("summary.md", "\n".join(text))
    return "\n".join(text)


COLORS = {"none": "0.5", "alqr": "C0", "spid": "C1", "actadd": "C2", "mean_difference": "C3"}


def _plot(run_dir: RunDirectory, none, sweeps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lams_ = [s["lam"] for s in sweeps]
    for ax, metric, label in ((axes[0], "positive", "P(positive), bag-of-words scorer"), (axes[1], "perplexity", "perplexity under the unsteered model")):
        for method in METHODS:
            values = [next(r for r in s["rows"] if r["method"] == method)[metric] for s in sweeps]
            ax.plot(lams_, values, "-o", color=COLORS[method], label=method, ms=4)
        if none is not None:
            ax.axhline(none["rows"][0][metric], color=COLORS["none"], ls="--", label="unsteered")
        ax.set(xlabel="λ", ylabel=label)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{run_dir.config['model']}: sentiment steering (baselines at A-LQR's Σ‖u_k‖)")
    fig.tight_layout()
    path = run_dir.path / "steer_smollm2.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
