"""GRPO: held-out accuracy before and after training, accuracy curves and seconds per step.

Default: the synthetic sorting task (training.md §2.5) with the tiny small and large decoders,
SFT-warmed, over --seeds seeds. `--model smollm2-135m-instruct --lora-rank 8 --task arithmetic`
trains LoRA adapters of a real model on arithmetic (reward 1 for the exact integer answer).
Accuracy is the mean reward of temperature-1 samples on held-out problems.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from tqdm import tqdm

import jaxsample as js
from jaxsample import tasks
from jaxsample.errors import ArgumentError
from jaxsample.models import lora
from jaxsample.training import init
from jaxsample.training.rewards import arithmetic_reward
from problems import check_distinct
from run_directory import RunDirectory, markdown_table
from training_runs import (
    SORT_LENGTH,
    Evaluator,
    add_training_arguments,
    check_training_config,
    grpo_config,
    run_grpo,
    sorting_evaluator,
    sorting_prompts,
    sorting_reward,
    warmed_up,
)

TINY = ("sort-small", "sort-large")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, steps=40)
    parser.add_argument("--model", default="sort-small,sort-large", help="comma-separated: sort-small / sort-large (tiny decoders from scratch), or one registered name / checkpoint path")
    parser.add_argument("--task", default="sorting", choices=["sorting", "arithmetic"], help="sorting (tiny models) or arithmetic (a chat model)")
    parser.add_argument("--seeds", type=int, default=3, help="independent seeds (sorting)")
    parser.add_argument("--lora-rank", type=int, default=0, help="arithmetic: train LoRA adapters of this rank on q/v projections (0: all parameters)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="arithmetic: generation cap")
    parser.add_argument("--num-digits", type=int, default=2, help="arithmetic: digits per operand")


def check_config(config: dict) -> None:
    check_training_config(config)
    models = [m.strip() for m in config["model"].split(",") if m.strip()]
    check_distinct("--model", models, config["model"])  # units are keyed {model}/seed{seed}
    tiny = all(m in TINY for m in models)
    if config["task"] == "sorting" and not tiny:
        raise ArgumentError(f"--task sorting trains {', '.join(TINY)}; got --model {config['model']}")
    if config["task"] == "arithmetic" and (tiny or len(models) != 1):
        raise ArgumentError("--task arithmetic needs one chat model, e.g. --model smollm2-135m-instruct")
    if config["lora_rank"] < 0 or config["seeds"] < 1 or config["max_new_tokens"] < 1:
        raise ArgumentError("--lora-rank must be >= 0, --seeds and --max-new-tokens >= 1")
    if config["task"] == "sorting" and config["lora_rank"] > 0:
        raise ArgumentError(f"--lora-rank {config['lora_rank']} applies to --task arithmetic only: --task sorting trains every parameter of its tiny decoders")


def run(run_dir: RunDirectory) -> str:
    config = run_dir.config
    done = run_dir.done_keys()
    if config["task"] == "sorting":
        grpo = grpo_config(config, SORT_LENGTH + 1)
        units = [(m.strip(), s) for s in range(config["seed"], config["seed"] + config["seeds"]) for m in config["model"].split(",") if m.strip()]
        for name, seed in tqdm([u for u in units if f"{u[0]}/seed{u[1]}" not in done], desc="grpo runs", unit="run"):
            size = name.removeprefix("sort-")
            lm = warmed_up(size, seed, config[f"sft_steps_{size}"])
            optimizer = optax.adam(config["learning_rate"])
            result = run_grpo(lm, init(lm, optimizer), config, grpo, optimizer, sorting_prompts(seed, config["prompts_per_step"]), sorting_reward, sorting_evaluator(lm, config, seed), seed, name)
            result.pop("state")
            result.update(key=f"{name}/seed{seed}", model=name, seed=seed)
            run_dir.append(result)
    elif "arithmetic" not in done:
        run_dir.append({"key": "arithmetic", "model": config["model"], "seed": config["seed"], **_arithmetic(config)})
    return summarize(run_dir)


def _arithmetic(config: dict) -> dict:
    lm = js.load(config["model"])
    if lm.tokenizer is None:
        raise ArgumentError(f"--model {config['model']} has no tokenizer; arithmetic needs a chat model")
    rank = config["lora_rank"]
    grpo = grpo_config(config, config["max_new_tokens"], lora=rank > 0)
    optimizer = optax.adam(config["learning_rate"])
    trainable = lora.init_lora(jax.random.key(config["seed"]), lm.config, rank=rank, alpha=2.0 * rank) if rank else None
    state = init(lm, optimizer, trainable, lora=rank > 0)
    reward_fn = arithmetic_reward(lm.tokenizer, lm.eos_token_ids)

    def prompt_fn(t):
        problems = tasks.sample_arithmetic(np.random.default_rng([config["seed"], t]), config["prompts_per_step"], config["num_digits"])
        return [tasks.arithmetic_prompt(lm.tokenizer, p) for p in problems], problems

    held_out = tasks.sample_arithmetic(np.random.default_rng([config["seed"], 10**6]), config["eval_problems"], config["num_digits"])
    evaluate = Evaluator(lm, held_out, [tasks.arithmetic_prompt(lm.tokenizer, p) for p in held_out], reward_fn, config["eval_samples"], config["max_new_tokens"])
    result = run_grpo(lm, state, config, grpo, optimizer, prompt_fn, reward_fn, evaluate, config["seed"], lm.name)
    result.pop("state")
    result["lora_rank"] = rank
    return result


def summarize(run_dir: RunDirectory) -> str:
    rows = []
    for model in sorted({r["model"] for r in run_dir.finished}):
        records = [r for r in run_dir.finished if r["model"] == model]
        before = np.asarray([r["initial_accuracy"] for r in records])
        after = np.asarray([r["final_accuracy"] for r in records])
        spread = lambda v: f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""  # noqa: E731
        rows.append({
            "model": model, "runs": len(records), "steps": len(records[0]["curve"]) and records[0]["curve"][-1][0],
            "held-out accuracy before": f"{before.mean():.3f}{spread(before)}",
            "after": f"{after.mean():.3f}{spread(after)}",
            "train reward": float(np.mean([r["train_reward"] for r in records])),
            "zero-var groups": float(np.mean([r["zero_variance_fraction"] for r in records])),
            "tokens generated": f"{np.mean([r['tokens_generated'] for r in records]):.0f}",
            "s/step": float(np.mean([r["seconds_per_step"] for r in records])),
            "s rollout": float(np.mean([r["seconds_rollout"] for r in records])),
            "s update": float(np.mean([r["seconds_update"] for r in records])),
        })
    columns = ["model", "runs", "steps", "held-out accuracy before", "after", "train reward", "zero-var groups", "tokens generated", "s/step", "s rollout", "s update"]
    table = markdown_table(rows, columns)
    plot = _plot(run_dir)
    text = f"{table}\n\nplot: {plot}\nresults: {run_dir.results_path}\n"
    run_dir.write_text("summary.md", text)
    return text


def _plot(run_dir: RunDirectory):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in run_dir.finished}):
        curves = [np.asarray(r["curve"]) for r in run_dir.finished if r["model"] == model]
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        ax.plot(mean[:, 0], mean[:, 1], "-o", markersize=3, label=f"{model} ({len(curves)} runs)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir.path / "accuracy_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
