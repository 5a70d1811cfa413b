"""CausalRM: reward heads from selection-biased, label-flipped feedback — naive, noise-only, IPS-only, IPS + noise, doubly robust, vs an oracle.

Texts: chat turns built from request templates and responses that vary in helpfulness,
tone and length (written here, see TEXTS), featurised by the model (`--model`, default
`smollm2-135m-instruct`) as mean-pooled final-norm hidden states. `--model synthetic`
uses the spec §3.7 Gaussian features instead (no LM). Each text is logged `--replicates`
times (one line per user). The truth is known: a text's preference logit is a fixed
function of its attributes (helpful +4, polite +2 / rude −2, long −1, offset −2), its rating
is r = 1 + 4σ(logit) and each logged item draws y ~ Bernoulli(σ(logit)) (spec §3.7's form).
Feedback is observed with p = k·s^(5 − r) (mean `--observation-rate`), a function of the
text, so o ⊥ y | x holds as IPS requires; observed labels flip with rates
a = P(ỹ=1|y=0), b = P(ỹ=0|y=1).

Every arm trains the same head on training texts with estimated nuisances (propensity
model fitted to o with the Brier loss, flip rates by anchor quantiles of a noise
classifier, DR imputation from that classifier) and early stopping on its own loss over
held-out observed items; it is scored against the clean labels of held-out texts.
"""

from __future__ import annotations

import argparse
import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsample.errors import ArgumentError
from jaxsample.training import causalrm
from run_directory import RunDirectory, markdown_table

ARMS = ("naive", "noise_only", "ips_only", "ips_noise", "dr", "oracle")
REQUESTS = [
    "How do I boil an egg?", "Can you recommend a good book?", "How do I fix a flat bike tyre?",
    "What should I cook for dinner tonight?", "How can I sleep better?", "How do I start running?",
    "How do I write a cover letter?", "How can I save money each month?", "How do I learn to play guitar?",
    "How do I clean a cast iron pan?", "What is a good way to study for exams?", "How do I plant tomatoes?",
    "How can I improve my handwriting?", "How do I make a budget spreadsheet?", "How do I care for a cat?",
    "How do I change a light bulb safely?", "How can I speak more confidently?", "How do I pack for a trip?",
    "How do I make bread at home?", "How do I back up my photos?",
]
OPENINGS = {"polite": "Happy to help! ", "neutral": "", "rude": "Ugh, fine. "}
BODIES = {
    True: ["Start with the basics, go one step at a time, and check the result before moving on.",
           "Gather what you need first, follow a simple routine, and adjust after a few tries."],
    False: ["I don't know and I'm not going to look it up.",
            "That question is not worth answering."],
}
CLOSINGS = {"polite": " Good luck, you've got this!", "neutral": "", "rude": " Don't ask me again."}
LONG_TAIL = " Also, remember that many people ask this, that there are many opinions, and that details vary a lot from case to case."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="chat model whose features the reward head reads, or 'synthetic' (spec §3.7 Gaussian features)")
    parser.add_argument("--seeds", type=int, default=5, help="independent logging draws (observation, flips, head init)")
    parser.add_argument("--replicates", type=int, default=4, help="logged items per text (users)")
    parser.add_argument("--selection-strength", type=float, default=0.1, help="s of p = k·s^(5 − r); smaller is stronger bias")
    parser.add_argument("--observation-rate", type=float, default=0.2, help="mean propensity")
    parser.add_argument("--flip-a", type=float, default=0.1, help="a = P(observed 1 | true 0)")
    parser.add_argument("--flip-b", type=float, default=0.2, help="b = P(observed 0 | true 1)")
    parser.add_argument("--hidden", default="64", help="reward-head hidden widths, comma-separated ('' for linear)")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps per head (early stopping may end sooner)")


def check_config(config: dict) -> None:
    for name in ("seeds", "replicates", "steps"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {config[name]!r}")
    causalrm.check_flip_rates(config["flip_a"], config["flip_b"])
    causalrm.selection_propensity(np.array([1.0, 5.0]), config["selection_strength"], config["observation_rate"])
    _hidden(config)


def _hidden(config) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in config["hidden"].split(",") if w.strip())
    except ValueError:
        raise ArgumentError(f"--hidden must be comma-separated positive integers, got {config['hidden']!r}") from None
    if any(w < 1 for w in widths):
        raise ArgumentError(f"--hidden widths must be positive, got {config['hidden']!r}")
    return widths


# ---------------------------------------------------------------------------------------
# Texts and features


def texts():
    """(request, response, preference logit) for every combination of the templates."""
    rows = []
    for request, helpful, tone, long, body in itertools.product(REQUESTS, (True, False), OPENINGS, (False, True), (0, 1)):
        response = OPENINGS[tone] + BODIES[helpful][body] + CLOSINGS[tone] + (LONG_TAIL if long else "")
        logit = 4.0 * helpful + {"polite": 2.0, "neutral": 0.0, "rude": -2.0}[tone] - 1.0 * long - 2.0
        rows.append((request, response, logit))
    return rows


def lm_features(model: str, rows, batch_size: int = 16) -> np.ndarray:
    """Mean-pooled final-norm hidden states of each chat turn (prompt + response)."""
    import jaxsample as js

    lm = js.load(model)
    if lm.tokenizer is None:
        raise ArgumentError(f"--model {model} has no tokenizer; the CausalRM experiment featurises text")
    encoded = [
        lm.tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a, _ in rows
    ]
    width = max(len(e) for e in encoded)
    features = []
    pooled = jax.jit(lambda lm, tokens, mask: (lm.features(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    for start in tqdm(range(0, len(encoded), batch_size), desc=f"features [{lm.name}]", unit="batch"):
        chunk = encoded[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        tokens = np.full((batch_size, width), lm.pad_token_id, np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for i, e in enumerate(chunk):
            tokens[i, : len(e)] = e
            mask[i, : len(e)] = 1
        features.append(np.asarray(pooled(lm, jnp.asarray(tokens), jnp.asarray(mask))))
    return np.concatenate(features)[: len(encoded)]


def synthetic_features(rows, seed: int = 0) -> np.ndarray:
    """Spec §3.7-style features: Gaussian with the preference logit along one direction."""
    rng = np.random.default_rng(seed)
    logits = np.array([r[2] for r in rows])
    x = rng.normal(size=(len(rows), 10))
    x[:, 0] = logits + 0.3 * rng.normal(size=len(rows))
    return x.astype(np.float32)


def load_features(run_dir: RunDirectory, rows) -> np.ndarray:
    path = run_dir.path / "features.npy"
    if path.exists():
        return np.load(path)
    model = run_dir.config["model"]
    features = synthetic_features(rows) if model == "synthetic" else lm_features(model, rows)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    buffer = io.BytesIO()
    np.save(buffer, features)
    run_dir.write_bytes(path.name, buffer.getvalue())
    return features


# ---------------------------------------------------------------------------------------
# One seed: logging draw, nuisances, every arm


def run_seed(seed: int, features: np.ndarray, text_logits: np.ndarray, config) -> list[dict]:
    rng = np.random.default_rng(seed)
    num_texts = len(text_logits)
    text_of = np.repeat(np.arange(num_texts), config["replicates"])
    test_texts = rng.permutation(num_texts)[: num_texts // 4]
    is_test = np.isin(text_of, test_texts)
    train = np.flatnonzero(~is_test)
    rng.shuffle(train)
    fit, validation = train[: int(0.8 * len(train))], train[int(0.8 * len(train)) :]
    preference = 1 / (1 + np.exp(-text_logits[text_of]))
    rating = 1 + 4 * preference  # a function of the text: selection on it keeps o ⊥ y | x
    clean = (rng.uniform(size=len(text_of)) < preference).astype(np.int32)
    propensity = causalrm.selection_propensity(rating, config["selection_strength"], config["observation_rate"])
    a, b = config["flip_a"], config["flip_b"]
    draw = causalrm.simulate(jax.random.key(seed), clean, propensity, a, b)
    observed, noisy = np.asarray(draw.observed), np.asarray(draw.noisy)
    x = features[text_of]
    hidden = _hidden(config)
    key = jax.random.key(10_000 + seed)
    keys = iter(jax.random.split(key, 16))
    common = dict(hidden=hidden, steps=config["steps"])

    def fit_head(loss_fn, fit_index=fit, validation_index=validation, **kwargs):
        return causalrm.fit_head(next(keys), x, loss_fn, train_index=fit_index, validation_index=validation_index, **{**common, **kwargs})

    # nuisances from training items only: propensity (Brier), noise classifier (BCE on observed)
    o = jnp.asarray(observed, jnp.float32)
    propensity_head = fit_head(lambda f, i: jnp.mean((jax.nn.sigmoid(f) - o[i]) ** 2))
    p_hat = np.clip(np.asarray(jax.nn.sigmoid(propensity_head.logits(x))), 0.1, 1.0)
    seen_fit, seen_validation = fit[observed[fit]], validation[observed[validation]]
    y_noisy = jnp.asarray(noisy, jnp.float32)
    noise_head = fit_head(lambda f, i: jnp.mean(causalrm.bce(f, y_noisy[i])), seen_fit, seen_validation)
    noisy_logits = np.asarray(noise_head.logits(x))
    a_hat, b_hat = causalrm.estimate_flip_rates(noisy_logits[train])  # anchors over all training items (spec §3.4)
    if a_hat + b_hat >= 1:
        raise ArgumentError(f"seed {seed}: estimated flip rates {a_hat:.3f} + {b_hat:.3f} ≥ 1; the noise classifier failed")
    q_hat = jnp.asarray(jax.nn.sigmoid(noisy_logits))
    p_hat_j, o_j = jnp.asarray(p_hat), jnp.asarray(observed)
    clean_j = jnp.asarray(clean, jnp.float32)
    losses = {
        "naive": lambda f, i: causalrm.naive_loss(f, o_j[i], y_noisy[i]),
        "noise_only": lambda f, i: causalrm.noise_corrected_loss(f, o_j[i], y_noisy[i], a_hat, b_hat),
        "ips_only": lambda f, i: causalrm.ips_loss(f, o_j[i], y_noisy[i], p_hat_j[i]),
        "ips_noise": lambda f, i: causalrm.ips_loss(f, o_j[i], y_noisy[i], p_hat_j[i], a_hat, b_hat),
        "dr": lambda f, i: causalrm.dr_loss(f, o_j[i], y_noisy[i], p_hat_j[i], q_hat[i], a_hat, b_hat),
        "oracle": lambda f, i: jnp.mean(causalrm.bce(f, clean_j[i])),
    }
    test = np.flatnonzero(is_test)
    records = []
    for arm, loss_fn in losses.items():
        head = fit_head(loss_fn)
        probabilities = np.asarray(jax.nn.sigmoid(head.logits(x[test])))
        result = causalrm.evaluate_reward(probabilities, clean[test])
        records.append({"arm": arm, **result._asdict(), "checks": len(head.history)})
    for record in records:
        record.update(seed=seed, a_hat=a_hat, b_hat=b_hat, observed=float(observed[train].mean()),
                      naive_positive_rate=float(noisy[train][observed[train]].mean()), base_rate=float(clean[train].mean()))
    return records


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    rows = texts()
    features = load_features(run_dir, rows)
    text_logits = np.array([r[2] for r in rows])
    done = run_dir.done_keys()
    todo = [s for s in range(config["seeds"]) if f"seed{s}" not in done]
    for seed in tqdm(todo, desc="causalrm", unit="seed"):
        records = run_seed(config["seed"] * 1000 + seed, features, text_logits, config)
        run_dir.append({"key": f"seed{seed}", "records": records})
        run_dir.log.info("seed %d: %s", seed, {r["arm"]: round(r["accuracy"], 3) for r in records})
    return summarize(run_dir)


def summarize(run_dir: RunDirectory) -> str:
    records = [r for line in run_dir.finished for r in line["records"]]
    rows = []
    for arm in ARMS:
        chosen = [r for r in records if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(chosen)}
        for metric in ("accuracy", "auroc", "bce", "ece", "bias"):
            values = np.array([r[metric] for r in chosen], dtype=float)  # an undefined AUROC is saved as null: NaN here
            row[metric] = f"{values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0:.3f}"
        rows.append(row)
    table = markdown_table(rows, ["arm", "seeds", "accuracy", "auroc", "bce", "ece", "bias"])
    first = records[0] if records else {}
    nuisances = (
        f"observed fraction {np.mean([r['observed'] for r in records]):.3f}; observed positive rate "
        f"{np.mean([r['naive_positive_rate'] for r in records]):.3f} vs base rate {np.mean([r['base_rate'] for r in records]):.3f}; "
        f"estimated flip rates â = {np.mean([r['a_hat'] for r in records]):.3f}, b̂ = {np.mean([r['b_hat'] for r in records]):.3f}"
        if first else ""
    )
    plot = _plot(run_dir, records)
    text = f"{table}\n\n(mean ± standard error over seeds; bias = mean prediction − base rate)\n{nuisances}\n\nplot: {plot}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _plot(run_dir: RunDirectory, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, metric in zip(axes, ("accuracy", "ece", "bias")):
        values = [[r[metric] for r in records if r["arm"] == arm] for arm in ARMS]
        ax.boxplot(values)
        ax.set_xticks(range(1, len(ARMS) + 1), ARMS)
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    fig.tight_layout()
    path = run_dir.path / "causalrm.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
