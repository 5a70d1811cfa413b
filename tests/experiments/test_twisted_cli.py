"""`run.py twisted` (autoregressive, toy-decisions) end to end at the smallest size: the
token counts are what the runs decoded, and the summary reports standard errors."""

import json
import sys
from pathlib import Path

import pytest

from jaxsample import tasks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import run  # noqa: E402
from problems import resolve  # noqa: E402


def test_twisted_counts_decoded_tokens_and_reports_standard_errors(tmp_path):
    out, particles = tmp_path / "run", 4
    status = run.main(["twisted", "--iterations", "1", "--eval-runs", "3", "--particles", str(particles),
                       "--methods", "untwisted,tri", "--learning-rates", "0.03", "--fit-steps", "2",
                       "--out", str(out)])
    assert status in (0, None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # Every K = 2 trace on the embedded toy model ends at its stop token after 20 tokens,
    # while the decoding cap is K_max·(L+2) = 40: the old count N·cap was twice the cost.
    task = tasks.read_task_config(resolve("toy-decisions"))
    trace, cap = task.trace_length(2), task.trace_length(task.max_decisions)
    assert trace < cap
    assert all(r["tokens"] == particles * trace for r in records)
    tri = sorted((r for r in records if r["method"] == "tri"), key=lambda r: r["iteration"])
    assert [r.get("learning_tokens") for r in tri] == [None, particles * trace]
    assert all(r["accuracy_se"] >= 0 and r["log_z_var_se"] >= 0 and r["log_z_se"] >= 0 for r in records)
    assert "±" in (out / "summary.md").read_text()


def test_twisted_model_help_names_its_models():
    twisted = run._subparser(run.build_parser(), "twisted")
    model_help = next(a.help for a in twisted._actions if a.dest == "model")
    assert "toy-decisions" in model_help and "toy-diffusion" in model_help
    assert ".gguf" not in model_help  # the shared text offers models twisted refuses


def test_twisted_refuses_an_empty_method_list(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["twisted", "--methods", ",", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: --methods is empty")
    assert not (tmp_path / "run").exists()


UNUSED = ["--chains", "--alpha", "--top-k", "--mcmc-steps", "--stretch-length", "--num-problems", "--num-digits",
          "--operation", "--data"]


def test_twisted_offers_only_the_options_it_uses():
    # It shared power's problem options: these were accepted, saved and ignored.
    twisted = run._subparser(run.build_parser(), "twisted")
    flags = {flag for action in twisted._actions for flag in action.option_strings}
    assert not flags & set(UNUSED)
    assert next(a for a in twisted._actions if a.dest == "task").choices == ["decisions"]
    _, config, _ = run.parse(["twisted"])
    run.COMMANDS["twisted"].check_config(config)


@pytest.mark.parametrize("args, message", [
    (["--learning-rates", "0.03,0.3,0.030"], r"^--learning-rates: 0.03 is repeated in '0.03,0.3,0.030'; give each value once$"),
    (["--problems-per-k", "0"], r"^--problems-per-k must be"),
    (["--decisions", "0"], r"^--decisions must be"),
    (["--model", "exact"], r"^twisted runs on --model toy-decisions or --model toy-diffusion"),
])
def test_twisted_refuses_bad_options(args, message):
    from jaxsample.errors import ArgumentError

    _, config, _ = run.parse(["twisted", *args])
    with pytest.raises(ArgumentError, match=message):
        run.COMMANDS["twisted"].check_config(config)
