"""Activation steering: A-LQR feedback vs S-PID, one-layer ActAdd and an all-layer mean-difference vector at matched control size, λ swept.

`--setting synthetic` (default; steering_safety_routing.md §1.9): a latent-attribute language.
Each sequence has a hidden bit z; every token is drawn from a fixed bigram grammar restricted
to 𝒜 (the first half of the vocabulary) with probability `--attribute-share` when z = 1, or
to 𝔅 (the other half) when z = 0, and from the other half otherwise. A 4-layer pre-RMSNorm
transformer (the library's Qwen2 port, d = 64) is trained from scratch on it with optax and
cached in the run directory. E_k comes from `--setpoint-prompts` prompts per class, A_k
from `--jacobian-prompts` (both classes), K_k from the Riccati recursion (q, r, q_f). Every
method pushes held-out prompts of both classes toward z = 1 at the last prompt token and
every generated token; the open-loop coefficients and the S-PID gain scale are calibrated
so that their mean control size (Σ_k ‖u_k‖ per steered token, both classes pooled) equals
A-LQR's at the same λ. Reported per method and λ: the tracking error v_kᵀx_k − β*_k per
layer at the prompt's last token (mean and spread over prompts, per class), the attribute
rate (fraction of 𝒜 tokens in the continuations) and the base model's NLL of them.

`--setting smollm2`: the real-model comparison (experiments/steer_real.py).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxsample import models, steering
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.scoring import score
from jaxsample.training.trainer import rollout
import steer_real
from problems import check_distinct
from run_directory import RunDirectory, markdown_table

SETTINGS = ("synthetic", "smollm2")
METHODS = ("none", "alqr", "spid", "actadd", "mean_difference")
CALIBRATION_ROUNDS = 4
# The smollm2 setting's prompts are the shipped files, so its unset counts mean all of them.
SYNTHETIC_PROMPTS = {"setpoint_prompts": 200, "test_prompts": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", choices=SETTINGS, default="synthetic", help="synthetic latent-attribute language (spec §1.9) or the real SmolLM2 model (steer_real.py)")
    parser.add_argument("--lams", default="0.5,1,1.5,2,3", help="setpoint scales λ (β*_k = λ‖E_k‖), comma-separated")
    parser.add_argument("--q", type=float, default=1.0, help="LQR state weight q")
    parser.add_argument("--r", type=float, default=0.1, help="LQR control weight r")
    parser.add_argument("--q-final", type=float, default=1.0, help="LQR final-state weight q_f")
    parser.add_argument("--actadd-layer", type=int, default=1, help="block after which ActAdd adds c·E_k")
    parser.add_argument("--pid-ki", type=float, default=0.25, help="S-PID integral gain as a multiple of K_p (K_p is calibrated to the matched control size)")
    parser.add_argument("--pid-kd", type=float, default=0.1, help="S-PID derivative gain as a multiple of K_p")
    parser.add_argument("--setpoint-prompts", type=int, default=None, help=f"prompts per class for the contrastive directions E_k; if unset, {SYNTHETIC_PROMPTS['setpoint_prompts']} in the synthetic setting and every shipped prompt in smollm2")
    parser.add_argument("--jacobian-prompts", type=int, default=50, help="prompts (half of each class) the Jacobians A_k are averaged over")
    parser.add_argument("--test-prompts", type=int, default=None, help=f"held-out prompts per class that are steered; if unset, {SYNTHETIC_PROMPTS['test_prompts']} in the synthetic setting and every shipped neutral opening in smollm2")
    parser.add_argument("--prompt-length", type=int, default=8, help="prompt tokens, BOS included")
    parser.add_argument("--new-tokens", type=int, default=20, help="continuation tokens per prompt")
    parser.add_argument("--vocab", type=int, default=32, help="synthetic: tokens of the language (half in 𝒜); BOS is one more")
    parser.add_argument("--attribute-share", type=float, default=0.7, help="synthetic: share of tokens drawn from the class's half")
    parser.add_argument("--sequence-length", type=int, default=32, help="synthetic: training sequence length, BOS included")
    parser.add_argument("--layers", type=int, default=4, help="synthetic: decoder blocks")
    parser.add_argument("--width", type=int, default=64, help="synthetic: hidden size d")
    parser.add_argument("--train-steps", type=int, default=800, help="synthetic: optax steps")
    parser.add_argument("--train-batch", type=int, default=32, help="synthetic: sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="synthetic: peak AdamW learning rate")
    steer_real.add_arguments(parser)


def check_config(config: dict) -> None:
    for name in ("setpoint_prompts", "jacobian_prompts", "test_prompts", "new_tokens"):
        if name in SYNTHETIC_PROMPTS and config[name] is None:
            continue
        if not isinstance(config[name], int) or config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {config[name]!r}")
    for name in ("q", "r", "q_final"):
        if not config[name] > 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {config[name]}")
    _lams(config)
    if config["setting"] == "smollm2":  # the model's depth is checked once it is loaded
        steer_real.check_config(config)
        return
    for name in ("vocab", "layers", "width", "train_steps", "train_batch"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {config[name]!r}")
    if synthetic_prompts(config, "test_prompts") < 2:
        raise ArgumentError(f"--test-prompts must be at least 2 (standard errors per class), got {config['test_prompts']}")
    if config["prompt_length"] < 2:
        raise ArgumentError(f"--prompt-length must be at least 2 (BOS and one token), got {config['prompt_length']}")
    if config["vocab"] < 2 or config["vocab"] % 2:
        raise ArgumentError(f"--vocab must be an even number ≥ 2 (two halves 𝒜, 𝔅), got {config['vocab']}")
    if config["width"] % 4:
        raise ArgumentError(f"--width must be a multiple of 4 (4 attention heads), got {config['width']}")
    if not 0.5 < config["attribute_share"] < 1:
        raise ArgumentError(f"--attribute-share must be in (0.5, 1), got {config['attribute_share']}")
    if config["prompt_length"] + config["new_tokens"] > config["sequence_length"]:
        raise ArgumentError(
            f"--prompt-length {config['prompt_length']} + --new-tokens {config['new_tokens']} must fit the "
            f"model's --sequence-length {config['sequence_length']}"
        )
    if not config["lr"] > 0:
        raise ArgumentError(f"--lr must be positive, got {config['lr']}")
    if not 0 <= config["actadd_layer"] < config["layers"]:
        raise ArgumentError(f"--actadd-layer must be in [0, {config['layers']}), got {config['actadd_layer']}")


def synthetic_prompts(config: dict, name: str) -> int:
    """`--setpoint-prompts` or `--test-prompts` (`name`, as its config key) of the synthetic setting."""
    return SYNTHETIC_PROMPTS[name] if config[name] is None else config[name]


def _lams(config) -> list[float]:
    try:
        lams = [float(x) for x in config["lams"].split(",") if x.strip()]
    except ValueError:
        raise ArgumentError(f"--lams must be comma-separated numbers, got {config['lams']!r}") from None
    if not lams or not all(np.isfinite(lams)):
        raise ArgumentError(f"--lams must hold at least one finite number, got {config['lams']!r}")
    # Each λ is a unit keyed lam{λ:g}: a repeat would be a second record with the same key.
    check_distinct("--lams", [f"{lam:g}" for lam in lams], config["lams"])
    return lams


# ---------------------------------------------------------------------------------------
# The latent-attribute language


class Language(NamedTuple):
    """Bigram grammar with a latent bit z.

    Attributes:
      transition: `[2, V+1, V]` p(next | previous, z); row V is the distribution after BOS.
      attribute: bool `[V]`, membership of 𝒜.
    """

    transition: np.ndarray
    attribute: np.ndarray

    @property
    def bos(self) -> int:
        return self.transition.shape[2]


def make_language(vocab: int, share: float, seed: int) -> Language:
    """A fixed random bigram grammar (rows ~ Dirichlet(0.3)); under z the next token comes
    from the grammar restricted to z's half with probability `share`, else from the other."""
    base = np.random.default_rng(seed).dirichlet(np.full(vocab, 0.3), size=vocab + 1)
    attribute = np.arange(vocab) < vocab // 2
    transition = []
    for z in (0, 1):
        inside = attribute if z else ~attribute
        within = base * inside
        outside = base * ~inside
        transition.append(share * within / within.sum(1, keepdims=True) + (1 - share) * outside / outside.sum(1, keepdims=True))
    return Language(np.stack(transition), attribute)


def sample_sequences(language: Language, rng: np.random.Generator, z: np.ndarray, length: int) -> np.ndarray:
    """int32 `[n, length]`: BOS, then length − 1 tokens of each row's class `z [n]`."""
    tokens = np.full((len(z), length), language.bos, np.int32)
    for t in range(1, length):
        cumulative = np.cumsum(language.transition[z, tokens[:, t - 1]], axis=1)
        draws = rng.random(len(z))[:, None] * cumulative[:, -1:]
        tokens[:, t] = np.minimum((cumulative < draws).sum(1), cumulative.shape[1] - 1)
    return tokens


def true_nll(language: Language, tokens: np.ndarray) -> float:
    """Per-token NLL of the true process (z marginalised, prior ½) on `[n, T]` sequences."""
    log_t = np.log(language.transition)
    per_class = np.stack([log_t[z, tokens[:, :-1], tokens[:, 1:]].sum(1) for z in (0, 1)])
    log_p = np.logaddexp(per_class[0], per_class[1]) + np.log(0.5)
    return float(-log_p.mean() / (tokens.shape[1] - 1))


# ---------------------------------------------------------------------------------------
# The model


def model_config(config: dict) -> models.ModelConfig:
    bos = config["vocab"]
    return models.ModelConfig.from_hf_dict(
        {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": config["vocab"] + 1,
            "hidden_size": config["width"],
            "intermediate_size": 4 * config["width"],
            "num_hidden_layers": config["layers"],
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": config["sequence_length"],
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "bos_token_id": bos,
            "eos_token_id": bos,  # never a training target, so (almost) never sampled
            "pad_token_id": bos,
        }
    )


def _token_nll(params, config, tokens):
    logits = models.forward(params, config, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], axis=-1))


def train_model(run_dir: RunDirectory, language: Language) -> tuple[LanguageModel, dict]:
    """Trains (or reloads from the run directory) the decoder on the language."""
    config = run_dir.config
    model_config_ = model_config(config)
    path = run_dir.path / "model.msgpack"
    params = models.init_params(jax.random.key(config["seed"]), model_config_)
    rng = np.random.default_rng([config["seed"], 1])
    held_out = sample_sequences(language, rng, rng.integers(0, 2, 512), config["sequence_length"])
    if path.exists():
        params = flax.serialization.from_bytes(params, path.read_bytes())
    else:
        steps, batch = config["train_steps"], config["train_batch"]
        schedule = optax.warmup_cosine_decay_schedule(0.0, config["lr"], max(1, steps // 10), steps, config["lr"] * 0.05)
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

        @jax.jit
        def train_step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(_token_nll)(params, model_config_, tokens)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state = optimizer.init(params)
        data_rng = np.random.default_rng([config["seed"], 2])
        with tqdm(range(steps), desc="train", unit="step", mininterval=2) as bar:
            for step in bar:
                tokens = sample_sequences(language, data_rng, data_rng.integers(0, 2, batch), config["sequence_length"])
                params, opt_state, loss = train_step(params, opt_state, jnp.asarray(tokens))
                if step % 100 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        run_dir.write_bytes(path.name, flax.serialization.to_bytes(params))
    info = {
        "model_nll": float(_token_nll(params, model_config_, jnp.asarray(held_out))),
        "true_nll": true_nll(language, held_out),
    }
    return models.make_language_model(model_config_, params, name="steer-synthetic"), info


# ---------------------------------------------------------------------------------------
# Steering setup and evaluation


class Setup(NamedTuple):
    """Everything the methods share: directions, gains and the held-out prompts."""

    E: jax.Array  # [L+1, D]
    K: jax.Array  # [L, D, D]
    prompts: jax.Array  # [2n, Tp], class 0 rows first
    z: np.ndarray  # [2n]


def make_setup(lm: LanguageModel, language: Language, config: dict) -> tuple[Setup, dict]:
    rng = np.random.default_rng([config["seed"], 3])
    length = config["prompt_length"]

    def prompts(z, n):
        return jnp.asarray(sample_sequences(language, rng, np.full(n, z), length))

    n = synthetic_prompts(config, "setpoint_prompts")
    desired = steering.last_token_states(lm, prompts(1, n))
    undesired = steering.last_token_states(lm, prompts(0, n))
    E = steering.contrastive_directions(desired, undesired)
    steer_real.check_directions(E, config)
    half = config["jacobian_prompts"] // 2
    jacobian_prompts = jnp.concatenate([prompts(0, config["jacobian_prompts"] - half), prompts(1, half)])
    A = steering.layer_jacobians(lm, jacobian_prompts)
    K = steering.riccati_gains(A, config["q"], config["r"], config["q_final"])
    m = synthetic_prompts(config, "test_prompts")
    setup = Setup(E, K, jnp.concatenate([prompts(0, m), prompts(1, m)]), np.repeat([0, 1], m))
    norms = jnp.linalg.norm(E, axis=-1)
    v = E / norms[:, None]
    # Where the classes sit along v_k, in units of ‖E_k‖ (the λ at which β*_k is their mean)
    natural = {
        f"class{c}_lam": (jnp.einsum("kpd,kd->k", states, v) / states.shape[1] / norms).tolist()
        for c, states in ((0, undesired), (1, desired))
    }
    return setup, {"E_norm": norms.tolist(), **natural, **linearity(lm, jacobian_prompts[:LINEARISATION_PROMPTS], A)}


LINEARISATION_SCALES = (0.01, 0.03, 0.1, 0.3)
LINEARISATION_PROMPTS = 4


def linearity(lm: LanguageModel, prompts, A) -> dict:
    """Relative linearisation residual per layer and perturbation size, mean over `prompts`:
    against each prompt's own Jacobian ("local") and against the prompt-averaged A_k the
    controller uses ("averaged")."""
    hidden = lm.hidden_states(prompts)
    local = np.zeros((lm.num_layers, len(LINEARISATION_SCALES)))
    averaged = np.zeros_like(local)
    for k in range(lm.num_layers):
        for i in range(prompts.shape[0]):
            errors = _linearisation_errors(lm, jnp.int32(k), hidden[k][i : i + 1], A[k], jax.random.key(100 * k + i))
            local[k] += np.asarray(errors[0]) / prompts.shape[0]
            averaged[k] += np.asarray(errors[1]) / prompts.shape[0]
    return {"linearisation_local": local.tolist(), "linearisation_averaged": averaged.tolist()}


@jax.jit
def _linearisation_errors(lm, layer, block_input, averaged_jacobian, key):
    own = steering.last_token_jacobian(lm, layer, block_input)
    scales = jnp.asarray(LINEARISATION_SCALES)
    return (
        steering.linearisation_error(lm, layer, block_input, own, scales, key),
        steering.linearisation_error(lm, layer, block_input, averaged_jacobian, scales, key),
    )


@partial(jax.jit, static_argnames="new_tokens")
def _steered_continuations(key, lm, steered, prompts, v, beta, new_tokens):
    """One compiled program per method: continuations of `prompts [B, Tp]` under `steered`;
    per row the mean Σ_k ‖u_k‖ over the steered positions (the last prompt token and every
    generated token fed back; u_k = block k's edited output − its plain output), the
    tracking error v_kᵀx_k − β*_k at the last prompt token for k = 0..L, and the base
    model's log p of the continuation."""
    rows, prompt_length = prompts.shape
    batch = rollout(key, steered, prompts, jnp.full((rows,), prompt_length, jnp.int32), 1, new_tokens)
    tokens = jnp.concatenate([prompts, batch.tokens], axis=1)
    start = jnp.full((rows,), prompt_length - 1, jnp.int32)
    hidden = steered.forward(tokens, output="hidden_states", intervene_from=start)
    plain = jnp.stack([lm.apply_layer(k, hidden[k]) for k in range(lm.num_layers)])
    u = jnp.linalg.norm(hidden[1:] - plain, axis=-1).sum(0)  # [B, T]
    position = jnp.arange(tokens.shape[1])[None, :]
    steered_positions = (position >= start[:, None]) & (position < start[:, None] + batch.lengths[:, None])
    u_mean = jnp.sum(u * steered_positions, 1) / jnp.maximum(steered_positions.sum(1), 1)
    tracking = jnp.einsum("kbd,kd->kb", hidden[:, :, prompt_length - 1], v) - beta[:, None]
    log_p = score(lm, prompts, batch.tokens, batch.lengths)
    return batch.tokens, batch.lengths, u_mean, tracking, log_p


def evaluate(key, lm: LanguageModel, language: Language, setup: Setup, intervention, lam: float, new_tokens: int) -> dict:
    """Steered continuations of every held-out prompt and their measurements, per class."""
    steered = lm if intervention is None else lm.with_intervention(intervention)
    norms = jnp.linalg.norm(setup.E, axis=-1)
    outputs = _steered_continuations(key, lm, steered, setup.prompts, setup.E / norms[:, None], lam * norms, new_tokens)
    generated, lengths, u, tracking, log_p = map(np.asarray, outputs)
    in_attribute = language.attribute[np.minimum(generated, language.bos - 1)] & (generated < language.bos)
    filled = np.arange(generated.shape[1])[None] < lengths[:, None]
    attribute = (in_attribute & filled).sum(1) / np.maximum(lengths, 1)
    nll = -log_p.sum(1) / np.maximum(lengths, 1)
    record = {"u": float(u.mean())}
    for c in (0, 1):
        rows = setup.z == c
        record.update(
            {
                f"u{c}": float(u[rows].mean()),
                f"attribute{c}": float(attribute[rows].mean()),
                f"attribute{c}_se": float(attribute[rows].std(ddof=1) / np.sqrt(rows.sum())),
                f"nll{c}": float(nll[rows].mean()),
                f"nll{c}_se": float(nll[rows].std(ddof=1) / np.sqrt(rows.sum())),
                f"tracking{c}_mean": tracking[:, rows].mean(1).tolist(),
                f"tracking{c}_sd": tracking[:, rows].std(1, ddof=1).tolist(),
            }
        )
    return record


def evaluate_lam(key, lm, language, setup: Setup, lam: float, config: dict) -> list[dict]:
    """Every method at λ: A-LQR first, the others calibrated to its mean control size."""
    ctrl = steering.controller(setup.K, setup.E, lam)

    def measure(method, size):
        intervention = None if method == "none" else steer_real.intervention(method, setup.E, ctrl, size, config)
        return {"method": method, "size": size, **evaluate(key, lm, language, setup, intervention, lam, config["new_tokens"])}

    rows = [measure("none", 0.0), measure("alqr", 0.0)]
    target = rows[-1]["u"]
    # Open loop: Σ_k ‖u_k‖ equals the size parameter exactly. S-PID's control is linear in
    # its gains along a fixed trajectory only: rescale K_p toward the target a few times.
    rows += [measure(method, target) for method in ("actadd", "mean_difference")]
    pid = measure("spid", 1.0)
    for _ in range(CALIBRATION_ROUNDS):
        if not pid["u"] > 0:
            break
        pid = measure("spid", pid["size"] * target / pid["u"])
    rows.append(pid)
    return rows


# ---------------------------------------------------------------------------------------
# Run and report


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    if config["setting"] == "smollm2":
        return steer_real.run(run_dir, _lams(config))
    language = make_language(config["vocab"], config["attribute_share"], config["seed"])
    lm, model_info = train_model(run_dir, language)
    run_dir.log.info("model NLL %.4f (true process %.4f)", model_info["model_nll"], model_info["true_nll"])
    setup, setup_info = make_setup(lm, language, config)
    done = run_dir.done_keys()
    if "setup" not in done:
        run_dir.append({"key": "setup", **model_info, **setup_info})
    key = jax.random.key(config["seed"])
    todo = [lam for lam in _lams(config) if f"lam{lam:g}" not in done]
    for lam in tqdm(todo, desc="steer λ", unit="λ"):
        rows = evaluate_lam(key, lm, language, setup, lam, config)
        run_dir.append({"key": f"lam{lam:g}", "lam": lam, "rows": rows})
        run_dir.log.info("λ=%g: %s", lam, {r["method"]: round(r["attribute0"], 3) for r in rows})
    return summarize(run_dir)


def _pm(mean, sd) -> str:
    return f"{mean:.2f} ± {sd:.2f}"


def summarize(run_dir: RunDirectory) -> str:
    records = {r["key"]: r for r in run_dir.finished}
    setup = records.get("setup", {})
    sweeps = sorted((r for r in run_dir.finished if r["key"].startswith("lam")), key=lambda r: r["lam"])
    rows = []
    for sweep in sweeps:
        for row in sweep["rows"]:
            rows.append(
                {
                    "λ": f"{sweep['lam']:g}",
                    "method": row["method"],
                    "‖u‖ z=0 / z=1": f"{row['u0']:.2f} / {row['u1']:.2f}",
                    "attribute z=0": f"{row['attribute0']:.3f} ± {row['attribute0_se']:.3f}",
                    "attribute z=1": f"{row['attribute1']:.3f} ± {row['attribute1_se']:.3f}",
                    "NLL z=0": f"{row['nll0']:.3f} ± {row['nll0_se']:.3f}",
                    "NLL z=1": f"{row['nll1']:.3f} ± {row['nll1_se']:.3f}",
                    "track L z=0": _pm(row["tracking0_mean"][-1], row["tracking0_sd"][-1]),
                    "track L z=1": _pm(row["tracking1_mean"][-1], row["tracking1_sd"][-1]),
                }
            )
    table = markdown_table(rows, list(rows[0]) if rows else ["λ"])
    text = [table, "", "‖u‖: mean Σ_k ‖u_k‖ per steered token (matched to A-LQR's pooled mean at each λ); attribute: fraction of 𝒜-tokens in the continuations; NLL: base-model per-token NLL of them (both ± standard error over prompts); track L: v_Lᵀx_L − β*_L at the last prompt token after the last block (mean ± sd over prompts)."]
    if sweeps:
        middle = sweeps[len(sweeps) // 2]
        layers = len(middle["rows"][0]["tracking0_mean"])
        per_layer = [
            {"method": row["method"], "class": f"z={c}", **{f"x_{k}": _pm(row[f"tracking{c}_mean"][k], row[f"tracking{c}_sd"][k]) for k in range(layers)}}
            for row in middle["rows"]
            for c in (0, 1)
        ]
        text += ["", f"Tracking error v_kᵀx_k − β*_k per layer at λ = {middle['lam']:g} (x_0: embedding; mean ± sd over prompts):", "", markdown_table(per_layer, list(per_layer[0]))]
    if setup:
        text += [
            "",
            f"Model: per-token NLL {setup['model_nll']:.4f} on held-out sequences (true process {setup['true_nll']:.4f}).",
            "Class means along v_k in units of ‖E_k‖ (the λ that puts β*_k on the class mean), k = 0..L: "
            f"z=0 {[round(x, 2) for x in setup['class0_lam']]}, z=1 {[round(x, 2) for x in setup['class1_lam']]}; ‖E_k‖ {[round(x, 2) for x in setup['E_norm']]}.",
            "",
            f"Linearisation error ‖f(x+δ) − f(x) − Aδ‖/‖δ‖ (mean over {LINEARISATION_PROMPTS} prompts) against each prompt's own Jacobian (local) and the prompt-averaged A_k:",
            "",
            markdown_table(
                [
                    {"‖δ‖/‖x‖": f"{scale:g}", **{f"layer {k} {kind}": f"{setup[f'linearisation_{kind}'][k][j]:.4f}" for k in range(len(setup["linearisation_local"])) for kind in ("local", "averaged")}}
                    for j, scale in enumerate(LINEARISATION_SCALES)
                ],
                ["‖δ‖/‖x‖"] + [f"layer {k} {kind}" for k in range(len(setup["linearisation_local"])) for kind in ("local", "averaged")],
            ),
        ]
    plot = _plot(run_dir, sweeps) if sweeps else None
    text += ["", f"plot: {plot}", f"results: {run_dir.results_path}", ""]
    run_dir.write_text("summary.md", "\n".join(text))
    return "\n".join(text)


COLORS = {"none": "0.5", "alqr": "C0", "spid": "C1", "actadd": "C2", "mean_difference": "C3"}


def _plot(run_dir: RunDirectory, sweeps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    middle = sweeps[len(sweeps) // 2]
    for row in middle["rows"]:
        for c, style in ((0, "-"), (1, "--")):
            mean, sd = np.array(row[f"tracking{c}_mean"]), np.array(row[f"tracking{c}_sd"])
            layers = np.arange(len(mean))
            axes[0].plot(layers, mean, style, color=COLORS[row["method"]], label=f"{row['method']} z={c}")
            axes[0].fill_between(layers, mean - sd, mean + sd, color=COLORS[row["method"]], alpha=0.1)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xticks(np.arange(len(middle["rows"][0]["tracking0_mean"])))
    axes[0].set(xlabel="layer k (block input; L = output)", ylabel="v_kᵀx_k − β*_k", title=f"tracking error, λ = {middle['lam']:g}")
    axes[0].legend(fontsize=6, ncol=2)
    lams = [s["lam"] for s in sweeps]
    for method in METHODS:
        for c, style in ((0, "-o"), (1, "--s")):
            for ax, metric in ((axes[1], "attribute"), (axes[2], "nll")):
                values = [next(r for r in s["rows"] if r["method"] == method)[f"{metric}{c}"] for s in sweeps]
                ax.plot(lams, values, style, color=COLORS[method], label=f"{method} z={c}", ms=3)
    axes[1].set(xlabel="λ", ylabel="fraction of A-subset tokens", title="attribute rate (matched ‖u‖)")
    axes[2].set(xlabel="λ", ylabel="per-token NLL", title="base-model NLL of continuations")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = run_dir.path / "steer.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
