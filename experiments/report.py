"""Experiment reports: the summary table (summary.md), on text tasks an example of what each
method wrote, and the accuracy-vs-tokens plot."""

from __future__ import annotations

import re

import numpy as np

from run_directory import RunDirectory, markdown_table

# Methods whose draws do not depend on α (run once per problem in an α sweep).
ALPHA_FREE = ("base",)

METHOD_LABELS = {
    "base": "base (τ=1)",
    "temperature": "temperature 1/α",
    "power_smc": "Power-SMC (λ=0)",
    "reward_smc": "reward SMC",
    "reward_smc_rejuv": "reward SMC + rejuvenation",
    "mh_uniform": "MH, uniform cuts",
    "mh_entropy": "MH, entropy cuts",
    "best_of_n": "best-of-N (mean log p)",
}
EXAMPLE_CHARS = 800  # an answer longer than this is cut in summary.md (results.jsonl has it whole)


def summarize(run_dir: RunDirectory, methods, title: str) -> str:
    """Table and accuracy-vs-tokens plot of every finished record (in an α sweep a row per
    method and α, and an accuracy-vs-α plot); summary.md adds, on a text task, an example of
    what each method wrote. Returns the table and where things are."""
    records = [r for r in run_dir.finished if r["method"] != "exact"]
    # Keyed by problem and α (None in folders written before records held their α).
    exact = {(r["problem"], r.get("alpha")): r["exact"] for r in run_dir.finished if r["method"] == "exact" and r["exact"]}
    alphas = sorted({r["alpha"] for r in records if r.get("alpha") is not None}) or [None]
    sweep = len(alphas) > 1
    groups = sorted({r["group"] for r in records})
    rows = []
    for group in groups:
        mine = [r for r in records if r["group"] == group]
        problems = sorted({r["problem"] for r in mine})
        for alpha in alphas:
            power_ref = [exact[(p, alpha)]["power"] for p in problems if (p, alpha) in exact]
            target = 0.9 * float(np.mean(power_ref)) if power_ref else None
            for method in methods:
                free = sweep and method in ALPHA_FREE
                if free and alpha != alphas[0]:
                    continue
                chosen = _at(mine, method, alpha if sweep and not free else None)
                if not chosen:
                    continue
                row = {
                    "group": group,
                    "method": METHOD_LABELS[method],
                    "α": "—" if free or alpha is None else f"{alpha:g}",
                    "problems": len(chosen),
                    "accuracy": float(np.mean([r["accuracy"] for r in chosen])),
                    "tokens/answer": float(np.mean([r["tokens"] for r in chosen])),
                    "acceptance": _nanmean([r["acceptance"] for r in chosen]),
                }
                if target is not None:
                    row["tokens to 90% of p^α"] = "—" if free else _tokens_to_target(chosen, target)
                if any(r.get("all_zero_runs") for r in chosen):
                    row["all-zero runs"] = sum(r["all_zero_runs"] for r in chosen)
                rows.append(row)
            if power_ref:
                ref = [exact[(p, alpha)] for p in problems if (p, alpha) in exact]
                rows.append({
                    "group": group, "method": "exact (model's own p)", "α": "—" if alpha is None else f"{alpha:g}",
                    "problems": len(ref),
                    "accuracy": f"base {np.mean([e['base'] for e in ref]):.3f} / temp {np.mean([e['temperature'] for e in ref]):.3f} / p^α {np.mean([e['power'] for e in ref]):.3f}",
                })
    columns = ["group", "method", *(["α"] if sweep else []), "problems", "accuracy", "tokens/answer", "acceptance"]
    if exact:
        columns.append("tokens to 90% of p^α")
    if any("all-zero runs" in row for row in rows):
        columns.append("all-zero runs")  # SMC runs whose every weight hit zero, scored 0
    table = markdown_table(rows, columns)
    plot_path = _plot(run_dir, records, exact, methods, groups, alphas, title)
    text = f"{table}\n\nplot: {plot_path}\n"
    if sweep:
        text += f"plot: {_plot_alpha_sweep(run_dir, records, exact, methods, groups, alphas, title)}\n"
    text += f"results: {run_dir.results_path}\n"
    examples = _examples(records, methods, alphas)
    run_dir.write_text("summary.md", text + examples)
    if examples:
        text += f"what each method wrote: {run_dir.path / 'summary.md'}\n"
    return text


def _examples(records, methods, alphas) -> str:
    """Per method (and α, in a sweep) on a text task: how many final answers pass, and the
    first passing and the first failing one as the grader read them ('' on the decision task,
    which has no text)."""
    sections = []
    for method in methods:
        for alpha in _levels(method, alphas):
            written = [(r["problem"], a) for r in _at(records, method, alpha) for a in r.get("answers", [])]
            if written:
                label = METHOD_LABELS[method] + ("" if alpha is None else f", α = {alpha:g}")
                sections.append(_example_section(label, written))
    if not sections:
        return ""
    return "\n## What the methods wrote\n\n" + "\n\n".join(sections) + "\n"


def _levels(method, alphas) -> list:
    """The α's a method is reported at: each of a sweep's, or None (all its records) for one α
    or a method whose draws do not depend on α."""
    return alphas if len(alphas) > 1 and method not in ALPHA_FREE else [None]


def _at(records, method, alpha) -> list:
    """A method's records at `alpha` (every one for None)."""
    return [r for r in records if r["method"] == method and (alpha is None or r.get("alpha") == alpha)]


def _example_section(label, written) -> str:
    passing = [(p, a) for p, a in written if a["passed"]]
    failing = [(p, a) for p, a in written if not a["passed"]]
    lines = [f"### {label}: {len(passing)} of {len(written)} answers pass"]
    for verdict, chosen in (("passes", passing[:1]), ("fails", failing[:1])):
        for problem, answer in chosen:
            lines += ["", f"{problem}, {verdict}:", "", _fenced(_clipped(answer["text"]))]
    return "\n".join(lines)


def _clipped(text: str) -> str:
    if len(text) <= EXAMPLE_CHARS:
        return text
    return f"{text[:EXAMPLE_CHARS]}\n… ({len(text) - EXAMPLE_CHARS} more characters)"


def _fenced(text: str) -> str:
    """A code block whose fence is longer than any run of backticks in `text`."""
    runs = [len(run) for run in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def _nanmean(values):
    values = [v for v in values if v is not None and v == v]  # results.jsonl stores NaN as null
    return float(np.mean(values)) if values else "—"


def _mean_curve(chosen):
    curves = [np.asarray(r["curve"]) for r in chosen]
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0)


def _tokens_to_target(chosen, target):
    curve = _mean_curve(chosen)
    reached = np.nonzero(curve[:, 1] >= target)[0]
    return float(curve[reached[0], 0]) if len(reached) else f"> {curve[-1, 0]:.0f}"


def _plot(run_dir, records, exact, methods, groups, alphas, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sweep = len(alphas) > 1
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.2 * len(groups), 7.0), 4.0), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        mine = [r for r in records if r["group"] == group]
        for method in methods:
            for alpha in _levels(method, alphas):
                chosen = _at(mine, method, alpha)
                if not chosen:
                    continue
                curve = _mean_curve(chosen)
                style = "-" if len(curve) > 1 else "o"
                label = METHOD_LABELS[method] + ("" if alpha is None else f", α={alpha:g}")
                ax.plot(curve[:, 0], curve[:, 1], style, label=label, markersize=6)
        ref = [exact[(p, alphas[0])]["power"] for p in {r["problem"] for r in mine} if (p, alphas[0]) in exact]
        if ref and not sweep:
            ax.axhline(np.mean(ref), color="k", linestyle="--", linewidth=1, label="exact p^α")
        ax.set_title(group)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("decoded tokens per answer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    _finish(fig, axes, run_dir, title, "accuracy_vs_tokens.png")
    return run_dir.path / "accuracy_vs_tokens.png"


def _plot_alpha_sweep(run_dir, records, exact, methods, groups, alphas, title):
    """Accuracy against α per method (the α-free ones as flat lines), with the exact p^α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.2 * len(groups), 7.0), 4.0), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        mine = [r for r in records if r["group"] == group]
        for method in methods:
            chosen = _at(mine, method, None)
            if not chosen:
                continue
            if method in ALPHA_FREE:
                ax.axhline(np.mean([r["accuracy"] for r in chosen]), linestyle=":", linewidth=1.5,
                           color="gray", label=METHOD_LABELS[method])
                continue
            accuracy = [np.mean([r["accuracy"] for r in _at(chosen, method, alpha)] or [np.nan]) for alpha in alphas]
            ax.plot(alphas, accuracy, "o-", label=METHOD_LABELS[method], markersize=5)
        problems = {r["problem"] for r in mine}
        power = [np.mean([exact[(p, alpha)]["power"] for p in problems if (p, alpha) in exact] or [np.nan])
                 for alpha in alphas]
        if not np.all(np.isnan(power)):
            ax.plot(alphas, power, "k--", linewidth=1, label="exact p^α")
        ax.set_title(group)
        ax.set_xscale("log", base=2)
        ax.set_xticks(alphas, [f"{alpha:g}" for alpha in alphas])
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    _finish(fig, axes, run_dir, title, "accuracy_vs_alpha.png")
    return run_dir.path / "accuracy_vs_alpha.png"


def _finish(fig, axes, run_dir, title, name):
    """Legend below the panels, the run's title, and the figure saved as `name` in the run."""
    import matplotlib.pyplot as plt

    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=8, frameon=False)
    alpha = run_dir.config["alpha"]
    alphas = ", ".join(f"{a:g}" for a in alpha) if isinstance(alpha, list) else f"{alpha:g}"
    fig.suptitle(f"{title}, α = {alphas}, model {run_dir.config['model']}")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(names) // 8), 1, 1))
    fig.savefig(run_dir.path / name, dpi=120)
    plt.close(fig)
