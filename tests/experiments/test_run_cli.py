"""`experiments/run.py`: help, config files, one-line errors, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
# The exact data model compiles fast and needs no checkpoint: right for CLI mechanics.
TINY = ["--model", "exact", "--decisions", "1", "--chains", "4", "--mcmc-steps", "2",
        "--methods", "base,temperature,mh_uniform"]


def run_cli(*args, timeout=300):
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_results(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_help_documents_every_option():
    sys.path.insert(0, str(ROOT / "experiments"))
    import run

    parser = run.build_parser()
    for name in run.COMMANDS:
        result = run_cli(name, "--help", timeout=120)
        assert result.returncode == 0, result.stderr
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            assert action.help, f"{name}: option {action.option_strings} has no help text"
            for flag in action.option_strings:
                assert flag in result.stdout, f"{name} --help does not mention {flag}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["power", "--model", "no-such-model", "--task", "arithmetic"], "no-such-model"),
        (["power", "--config", "missing.yaml"], "missing.yaml"),
        (["power", "--task", "arithmetic", "--model", "toy-decisions"], "--task arithmetic"),
        (["power", "--methods", "base,magic"], "magic"),
        (["power", "--chains", "0"], "--chains"),
        (["power", "--task", "math500", "--data", "missing.jsonl", "--model", "smollm2-135m-instruct"], "missing.jsonl"),
        (["power", "--data", "problems.jsonl"], "--data"),
        (["smc", "--task", "math500", "--data", "x.jsonl", "--model", "smollm2-135m-instruct"], "verifier"),
        (["power", "--mesh", "data=0"], "data=0"),
        (["smc", "--mesh", "data=64"], "needs 64 devices"),
    ],
)
def test_bad_input_is_one_line_error(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_config_file_replaces_flags_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"chains": 3, "mcmc-steps": 1, "alpha": 2.0}))
    sys.path.insert(0, str(ROOT / "experiments"))
    import run

    command, resolved = run.parse(["power", "--config", str(config), "--alpha", "3.0"])
    assert command == "power"
    assert resolved["chains"] == 3 and resolved["mcmc_steps"] == 1 and resolved["alpha"] == 3.0
    config.write_text(yaml.safe_dump({"chians": 3}))
    result = run_cli("power", "--config", str(config), timeout=120)
    assert result.returncode == 2 and "chians" in result.stderr


def test_killed_run_resumes_without_losing_or_redoing_work(tmp_path):
    out = tmp_path / "run"
    # Once compiled, a unit takes milliseconds: enough units that the kill lands midway.
    problems, units_per_problem = 30, 4  # exact + 3 methods
    args = [*RUN, "power", *TINY, "--problems-per-k", str(problems), "--out", str(out)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 5:
            break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Simulate a kill in the middle of a write as well: a torn last line must be dropped.
    before = results.read_text()
    with open(results, "a") as f:
        f.write('{"key": "torn')
    finished_before = [json.loads(line) for line in before.splitlines()]
    assert 5 <= len(finished_before) < problems * units_per_problem

    resumed = run_cli("power", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(finished_before)} finished result(s) kept" in resumed.stdout
    after = read_results(out)
    assert after[: len(finished_before)] == finished_before
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == problems * units_per_problem
    assert (out / "summary.md").exists() and (out / "accuracy_vs_tokens.png").exists()
    assert "MH, uniform cuts" in resumed.stdout


def test_mesh_option_splits_chains_over_devices(tmp_path):
    """`--mesh data=2` on two simulated CPU devices gives the one-device results."""
    args = ["power", *TINY, "--methods", "base,mh_uniform"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    for name, mesh in (("one", []), ("two", ["--mesh", "data=2"])):
        subprocess.run([*RUN, *args, *mesh, "--out", str(tmp_path / name)], env=env, check=True,
                       capture_output=True, timeout=600, cwd=ROOT)
    fields = ("key", "accuracy", "tokens", "curve")
    one, two = ([{f: r.get(f) for f in fields} for r in read_results(tmp_path / n)] for n in ("one", "two"))
    assert one == two


def test_existing_run_directory_needs_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.jsonl").write_text('{"key": "x"}\n')
    result = run_cli("power", *TINY, "--out", str(out), timeout=120)
    assert result.returncode == 2 and "--resume" in result.stderr
