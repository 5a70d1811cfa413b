"""CoDistill-GRPO vs GRPO on the synthetic sorting task (training.md §2.5), tiny models from scratch.

CoDistill-GRPO is a reconstruction from the paper's abstract (see jaxsample.training.codistill).
Per seed, a small (1 layer, d=32) and a large (3 layers, d=96) decoder are warmed up by SFT on
2–6 digit lists, then trained by RL on sorting 6 digits (reward 1 only for the exact answer):

- S_grpo: the small model with plain GRPO on its own rollouts;
- L_grpo: the large model with plain GRPO on its own rollouts;
- cd_lam{λ}_C{C}: CoDistill — the small model with the KD reward (weight λ), the large model
  trained only on the small model's rollouts with token-level weights truncated at C;
- cd_lam{λ}_w1: the same with w ≡ 1 (no importance correction).

Accuracy is the mean reward of temperature-1 samples on held-out problems, every --eval-every
steps; tokens generated count training rollouts only (the large model generates none in the
CoDistill arms).
"""

from __future__ import annotations

import argparse

import numpy as np
import optax
from tqdm import tqdm

from jaxsample.errors import ArgumentError
from jaxsample.training import CoDistillConfig, init
from problems import check_distinct
from run_directory import RunDirectory, markdown_table
from training_runs import (
    add_training_arguments,
    check_training_config,
    grpo_config,
    run_codistill,
    run_grpo,
    sorting_evaluator,
    sorting_prompts,
    sorting_reward,
    warmed_up,
    SORT_LENGTH,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, steps=40)
    parser.add_argument("--seeds", type=int, default=3, help="independent seeds (models, warm-up, data)")
    parser.add_argument("--lams", default="0.1,0.5", help="comma-separated KD weights λ of the CoDistill arms (cap --caps' first value)")
    parser.add_argument("--caps", default="2,5", help="comma-separated weight caps C of the CoDistill arms (λ = --lams' first value)")
    parser.add_argument("--weights-arm", action=argparse.BooleanOptionalAction, default=True, help="also run CoDistill with w ≡ 1 (no importance correction); --no-weights-arm leaves that arm out")


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ArgumentError(f"--{name} must hold positive numbers, got {text!r}")
    # Arms are keyed by λ and C as {value:g}: a repeat would be a second record with the same key.
    check_distinct(f"--{name}", [f"{v:g}" for v in values], text)
    return values


def check_config(config: dict) -> None:
    check_training_config(config)
    if config["seeds"] < 1:
        raise ArgumentError(f"--seeds must be >= 1, got {config['seeds']}")
    _floats(config["lams"], "lams")
    _floats(config["caps"], "caps")


def arms(config: dict) -> list[tuple[str, dict | None]]:
    """(name, CoDistill settings or None for the plain GRPO arms) in run order."""
    lams, caps = _floats(config["lams"], "lams"), _floats(config["caps"], "caps")
    result = [("S_grpo", None), ("L_grpo", None)]
    result += [(f"cd_lam{lam:g}_C{caps[0]:g}", dict(lam=lam, cap=caps[0], weight_level="token")) for lam in lams]
    result += [(f"cd_lam{lams[0]:g}_C{cap:g}", dict(lam=lams[0], cap=cap, weight_level="token")) for cap in caps[1:]]
    if config["weights_arm"]:
        result.append((f"cd_lam{lams[0]:g}_w1", dict(lam=lams[0], cap=caps[0], weight_level="none")))
    return result


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    done = run_dir.done_keys()
    todo = [(seed, name, settings) for seed in range(config["seed"], config["seed"] + config["seeds"]) for name, settings in arms(config) if f"{name}/seed{seed}" not in done]
    grpo = grpo_config(config, SORT_LENGTH + 1)
    warm = {}
    for seed, name, settings in tqdm(todo, desc="codistill runs", unit="run"):
        if seed not in warm:
            warm = {seed: (warmed_up("small", seed, config["sft_steps_small"]), warmed_up("large", seed, config["sft_steps_large"]))}
        small, large = warm[seed]
        prompt_fn, evaluate = sorting_prompts(seed, config["prompts_per_step"]), sorting_evaluator(small, config, seed)
        if settings is None:
            lm = small if name == "S_grpo" else large
            optimizer = optax.adam(config["learning_rate"])
            result = run_grpo(lm, init(lm, optimizer), config, grpo, optimizer, prompt_fn, sorting_reward, evaluate, seed, name)
            result.pop("state")
            role = "small" if name == "S_grpo" else "large"
            curve = result.pop("curve")
            result["curve_small" if role == "small" else "curve_large"] = [[t, a] for t, a, _ in curve]
            if role == "large":
                result["tokens_generated_large"], result["tokens_generated"] = result["tokens_generated"], 0
        else:
            cd = CoDistillConfig(grpo=grpo, **settings)
            result = run_codistill(small, large, config, cd, prompt_fn, sorting_reward, evaluate, seed, name)
            curve = result.pop("curve")
            result["curve_small"] = [[t, s] for t, s, _, _ in curve]
            result["curve_large"] = [[t, l] for t, _, l, _ in curve]
        result.update(key=f"{name}/seed{seed}", arm=name, seed=seed)
        run_dir.append(result)
        run_dir.log.info("%s seed %d: %s", name, seed, {k: v for k, v in result.items() if not k.startswith("curve")})
    return summarize(run_dir, [name for name, _ in arms(config)])


def _stat(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def summarize(run_dir: RunDirectory, arm_names: list[str]) -> str:
    rows = []
    for name in arm_names:
        records = [r for r in run_dir.finished if r["arm"] == name]
        if not records:
            continue
        for role in ("small", "large"):
            curves = [r[f"curve_{role}"] for r in records if f"curve_{role}" in r]
            if not curves:
                continue
            rows.append({
                "arm": name, "model": role, "seeds": len(curves),
                "accuracy start": _stat([c[0][1] for c in curves]),
                "accuracy end": _stat([c[-1][1] for c in curves]),
                "tokens gen. S": f"{np.mean([r['tokens_generated'] for r in records]):.0f}",
                "tokens gen. L": f"{np.mean([r['tokens_generated_large'] for r in records]):.0f}",
                "zero-var groups": float(np.mean([r["zero_variance_fraction"] for r in records])),
                "IW ESS": float(np.mean([r["iw_ess_fraction"] for r in records])) if "iw_ess_fraction" in records[0] else "—",
                "at cap": float(np.mean([r["iw_capped_fraction"] for r in records])) if "iw_capped_fraction" in records[0] else "—",
            })
    table = markdown_table(rows, ["arm", "model", "seeds", "accuracy start", "accuracy end", "tokens gen. S", "tokens gen. L", "zero-var groups", "IW ESS", "at cap"])
    phases = _phase_table(run_dir)
    plot = _plot(run_dir, arm_names)
    text = f"{table}\n\nMedian seconds per step by phase:\n\n{phases}\n\nplot: {plot}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _phase_table(run_dir: RunDirectory) -> str:
    rows = []
    for name in sorted({r["arm"] for r in run_dir.finished}):
        records = [r for r in run_dir.finished if r["arm"] == name]
        row = {"arm": name}
        for key in ("seconds_rollout", "seconds_score_large", "seconds_update", "seconds_per_step"):
            values = [r[key] for r in records if key in r]
            row[key.replace("seconds_", "")] = float(np.mean(values)) if values else "—"
        rows.append(row)
    return markdown_table(rows, ["arm", "rollout", "score_large", "update", "per_step"])


def _plot(run_dir: RunDirectory, arm_names: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, role in zip(axes, ("small", "large")):
        for name in arm_names:
            curves = [np.asarray(r[f"curve_{role}"]) for r in run_dir.finished if r["arm"] == name and f"curve_{role}" in r]
            if curves:
                length = min(len(c) for c in curves)
                mean = np.mean([c[:length] for c in curves], axis=0)
                ax.plot(mean[:, 0], mean[:, 1], "-o", markersize=3, label=name)
        ax.set_title(f"{role} model (held-out, mean over seeds)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (sort 6 digits)")
    fig.tight_layout()
    path = run_dir.path / "accuracy_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
