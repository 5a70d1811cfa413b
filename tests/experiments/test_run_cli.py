"""`experiments/run.py`: help, config files, one-line errors, kill-and-resume."""

import json
import os
import shutil
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


sys.path.insert(0, str(ROOT / "experiments"))
import run  # noqa: E402


class Outcome:
    """What `run.main(args)` did in this process: exit status, stdout, stderr."""

    def __init__(self, capsys, *args):
        try:
            self.returncode = run.main([str(a) for a in args])
        except SystemExit as e:  # any other exception escapes: a traceback fails the test
            self.returncode = e.code
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def read_results(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_help_documents_every_option(capsys):
    parser = run.build_parser()
    for name in run.COMMANDS:
        result = Outcome(capsys, name, "--help")
        assert result.returncode == 0, result.stderr
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            assert action.help, f"{name}: option {action.option_strings} has no help text"
            for flag in action.option_strings:
                assert flag in result.stdout, f"{name} --help does not mention {flag}"
        # one default statement per option, none empty
        help_text = " ".join(sub.format_help().split())
        assert "(default: )" not in help_text and "(default: None)" not in help_text, name
        out_help = help_text[help_text.index("--out OUT run"):help_text.index("--resume continue")]
        assert out_help.count("default") == 1, out_help


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
        (["smc", "--task", "humaneval", "--model", "smollm2-135m-instruct"], "--task humaneval has no in-JAX verifier"),
        (["power", "--task", "humaneval", "--model", "toy-decisions"], "--task humaneval needs a chat model"),
        (["power", "--mesh", "data=0"], "data=0"),
        (["smc", "--mesh", "data=64"], "needs 64 devices"),
        (["csa", "--mesh", "data=2"], "unrecognized arguments: --mesh data=2"),  # only power and smc take a mesh
        (["gate", "--modulus", "7"], "--modulus must be >= 12 with --kappas"),
        (["power", "--decisions", "abc"], "--decisions must be comma-separated integers ≥ 1 (e.g. 1,2,3), got 'abc'"),
        (["power", "--alpha", "inf"], "--alpha must be a number in (0, inf), got inf"),
        (["power", "--alpha", "nan"], "--alpha must be a number in (0, inf), got nan"),
        (["power", "--alpha", "0.5"], "--alpha must be ≥ 1 with --task decisions: the exact reference accuracies need α ≥ 1, got 0.5"),
        (["power", "--alpha", "4,0.5"], "--alpha must be ≥ 1 with --task decisions: the exact reference accuracies need α ≥ 1, got 0.5"),
        (["power", "--alpha", "2,x"], "argument --alpha: must be a number, or comma-separated numbers for an α sweep (e.g. 1,2,4), got '2,x'"),
        (["power", "--alpha", "2,4,2.0"], "--alpha: 2.0 is repeated in '[2.0, 4.0, 2.0]'; give each value once"),
        (["smc", "--alpha", "1,-1"], "--alpha must be a number in (0, inf), got -1.0"),
        (["smc", "--lam=-inf"], "--lam must be a number in (-inf, inf), got -inf"),
        (["power", "--chains", "x"], "argument --chains: invalid int value: 'x'"),
        (["power", "--top-k", "-1"], "--top-k must be an integer in [0, inf], got -1"),
    ],
)
def test_bad_input_is_one_line_error(args, message, tmp_path, capsys):
    result = Outcome(capsys, *args, "--out", tmp_path / "run")
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists(), "a run that failed validation left its folder behind"


@pytest.mark.parametrize("command", sorted(run.COMMANDS))
def test_only_flags_on_the_command_line_count_as_given(command):
    # a default counted as given makes --resume refuse a run saved with another value
    assert run.parse([command, "--out", "x"])[2] == {}


def test_resume_without_out_names_the_missing_flag(capsys):
    assert_one_line_error(Outcome(capsys, "power", "--resume"), "--resume needs --out DIR")


@pytest.mark.parametrize("environment, message", [
    ({"JAXSAMPLE_NUM_PROCESSES": "2", "JAXSAMPLE_PROCESS_ID": "5"}, "process_id must lie in [0, 2)"),
    ({"JAXSAMPLE_NUM_PROCESSES": "two", "JAXSAMPLE_PROCESS_ID": "0"}, "JAXSAMPLE_NUM_PROCESSES must be an integer ≥ 1, got 'two'"),
])
def test_bad_distributed_environment_is_one_line_error(environment, message, monkeypatch, tmp_path, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    result = Outcome(capsys, "power", "--distributed", "--out", tmp_path / "run")
    assert_one_line_error(result, message)


def test_distributed_without_coordinator_is_one_line_error(monkeypatch, tmp_path, capsys):
    import jax

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    result = Outcome(capsys, "route", "--distributed", "--out", tmp_path / "run")
    assert_one_line_error(result, "--distributed could not join a multi-host run (coordinator_address should be defined.); set JAXSAMPLE_COORDINATOR")
    assert not (tmp_path / "run").exists()


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (b"chains: [1\n", "is not valid YAML"),
        (b"\x00\xff\xfe\x01binary", "is not valid YAML"),
        (b"1: 2\n", "option names must be strings, got 1"),
        (b"chains: [1, 2]\n", "--chains must be an integer, got [1, 2]"),
        (b"alpha: high\n", "--alpha must be a number, or comma-separated numbers for an α sweep (e.g. 1,2,4), got 'high'"),
        (b"alpha: [2, true]\n", "--alpha must be a number, or comma-separated numbers for an α sweep (e.g. 1,2,4), got [2, True]"),
        (b"task: chess\n", "--task must be one of decisions, arithmetic, math500, humaneval, got 'chess'"),
        (b"- chains\n", "must hold a mapping of option names to values, got list"),
    ],
    ids=["invalid-yaml", "binary", "int-key", "list-for-int", "string-for-alpha", "bool-in-alpha-list", "bad-choice",
         "list"],
)
def test_bad_config_file_is_one_line_error(content, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    result = Outcome(capsys, "power", "--config", config, "--out", tmp_path / "run")
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_out_pointing_at_a_file_is_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(Outcome(capsys, "power", "--out", tmp_path / "file"), "is a file, not a run directory")


def test_model_without_tokenizer_on_arithmetic_is_one_line_error(tmp_path, capsys):
    import jax

    from jaxsample import models

    config = models.ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=8,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=4, max_position_embeddings=64, eos_token_ids=(1,))
    models.save_pretrained(models.init_params(jax.random.key(0), config), config, tmp_path / "model")
    result = Outcome(capsys, "power", "--task", "arithmetic", "--model", tmp_path / "model", "--out", tmp_path / "run")
    assert_one_line_error(result, "--task arithmetic needs a model with a tokenizer")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished small power run (2 problems × 4 units) to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run.main(["power", *TINY, "--problems-per-k", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _edit_saved_config(out, edit):
    config = yaml.safe_load((out / "config.yaml").read_text())
    edit(config)
    (out / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    "damage, args, message",
    [
        (lambda out: _replace_line(out, 3, '{"key": "K1-0/temp'), ["power"], "results.jsonl line 3 is corrupted"),
        (lambda out: _replace_line(out, 2, '[1, 2]'), ["power"], "results.jsonl line 2 is not a result record"),
        (lambda out: (out / "config.yaml").write_text("chains: [4\n"), ["power"], "config.yaml is corrupted (not valid YAML"),
        (lambda out: (out / "config.yaml").write_bytes(b"\xff\x00"), ["power"], "config.yaml is corrupted (not valid YAML"),
        (lambda out: _edit_saved_config(out, lambda c: c.pop("alpha")), ["power"], "option(s) alpha missing"),
        (lambda out: _edit_saved_config(out, lambda c: c.update(chains=[4])), ["power"], "config.yaml: --chains must be an integer, got [4]"),
        (lambda out: _edit_saved_config(out, lambda c: c.update(alpha=-1.0)), ["power"], "--alpha must be a number in (0, inf), got -1.0"),
        (lambda out: None, ["smc"], "holds a 'power' run, not 'smc'; continue it with python experiments/run.py power --out"),
        (lambda out: None, ["power", "--chains", "8", "--alpha", "4.0", "--top-k", "3"],
         "these differ: --chains 8 (saved: 4), --top-k 3 (saved: 0)"),
    ],
    ids=["corrupt-line", "not-a-record", "config-yaml", "config-binary", "config-missing-key", "config-list",
         "config-bad-value", "smc-as-power", "changed-flags"],
)
def test_bad_resume_is_one_line_error(run_copy, damage, args, message, capsys):
    damage(run_copy)
    results_before = (run_copy / "results.jsonl").read_bytes()
    assert_one_line_error(Outcome(capsys, *args, "--out", run_copy, "--resume"), message)
    assert (run_copy / "results.jsonl").read_bytes() == results_before


def test_smc_folder_resumed_as_power_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"command": "smc", "alpha": 4.0}))
    assert_one_line_error(Outcome(capsys, "power", "--out", out, "--resume"),
                          "holds a 'smc' run, not 'power'; continue it with python experiments/run.py smc")


def _replace_line(out, number, text):
    lines = (out / "results.jsonl").read_text().splitlines()
    lines[number - 1] = text
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_resume_keeps_each_unit_once_in_results_and_summary(run_copy, capsys):
    lines = (run_copy / "results.jsonl").read_text().splitlines()
    # A repeated record (of a unit that counts in the summary) and one unit left to redo.
    (run_copy / "results.jsonl").write_text("\n".join(lines[:-1] + [lines[1]]) + "\n")
    result = Outcome(capsys, "power", "--out", run_copy, "--resume")
    assert result.returncode == 0, result.stderr
    assert "7 finished result(s) kept, 1 repeated record(s) dropped" in result.stdout
    assert len((run_copy / "results.jsonl").read_text().splitlines()) == 8
    keys = [r["key"] for r in read_results(run_copy)]
    assert len(keys) == len(set(keys)) == 8
    rows = [line.split("|") for line in (run_copy / "summary.md").read_text().splitlines() if "(τ=1)" in line]
    assert [int(row[3]) for row in rows] == [2]  # base: two problems, not three


def strict_loads(line):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_results_are_strict_json(finished_run):
    records = [strict_loads(line) for line in (finished_run / "results.jsonl").read_text().splitlines()]
    assert any(r.get("acceptance", 0) is None for r in records), "base/temperature acceptance is stored as null"


def test_config_file_replaces_flags_and_flags_win(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"chains": 3, "mcmc-steps": 1, "alpha": 2.0, "decisions": 2}))
    command, resolved, given = run.parse(["power", "--config", str(config), "--alpha", "3.0"])
    assert command == "power"
    assert resolved["chains"] == 3 and resolved["mcmc_steps"] == 1 and resolved["alpha"] == 3.0
    assert resolved["decisions"] == "2"
    assert given == {"chains": 3, "mcmc_steps": 1, "alpha": 3.0, "decisions": "2"}
    config.write_text(yaml.safe_dump({"chians": 3}))
    result = Outcome(capsys, "power", "--config", config)
    assert_one_line_error(result, "unknown option 'chians'")


def test_boolean_optional_flag_is_read_from_config_file_and_saved_config(tmp_path, capsys):
    from run_directory import RunDirectory

    config = tmp_path / "c.yaml"
    config.write_text("weights_arm: false\n")
    _, resolved, given = run.parse(["codistill", "--config", str(config)])
    assert resolved["weights_arm"] is False and given == {"weights_arm": False}
    config.write_text("weights_arm: sometimes\n")
    assert_one_line_error(Outcome(capsys, "codistill", "--config", config),
                          "--weights-arm must be true or false, got 'sometimes'")

    # The saved config.yaml holds the flag as a YAML boolean, as every codistill run saves it.
    out = tmp_path / "run"
    _, options, _ = run.parse(["codistill", "--out", str(out)])
    RunDirectory(out, {k: v for k, v in options.items() if k not in run.INVOCATION}, resume=False)
    assert run.resumed_config(out, "codistill", {})["weights_arm"] is True
    with pytest.raises(SystemExit):
        run.resumed_config(out, "codistill", {"weights_arm": False})
    assert "these differ: --weights-arm False (saved: True)" in capsys.readouterr().err


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


def test_mesh_option_splits_chains_over_devices(finished_run, tmp_path):
    """`--mesh data=2` on two simulated CPU devices gives the one-device results (those of
    `finished_run`, made in this process on one device; a unit's key does not depend on
    which other methods run)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    subprocess.run([*RUN, "power", *TINY, "--problems-per-k", "2", "--methods", "base,mh_uniform",
                    "--mesh", "data=2", "--out", str(tmp_path / "two")],
                   env=env, check=True, capture_output=True, timeout=600, cwd=ROOT)
    fields = ("key", "accuracy", "tokens", "curve")
    two = [{f: r.get(f) for f in fields} for r in read_results(tmp_path / "two")]
    one = [{f: r.get(f) for f in fields} for r in read_results(finished_run) if r["method"] in ("exact", "base", "mh_uniform")]
    assert len(two) == len(one) == 2 * 3  # two problems: the exact law and two methods
    assert sorted(two, key=lambda r: r["key"]) == sorted(one, key=lambda r: r["key"])


def test_batched_problems_draw_what_each_problem_draws_alone(finished_run, tmp_path):
    """`--batch-problems 2` samples both problems of a K in one batch per method (best-of-N
    too, where their candidate counts agree): every record is the one-at-a-time run's."""
    assert run.main(["power", *TINY, "--problems-per-k", "2", "--batch-problems", "2", "--out", str(tmp_path / "b")]) == 0
    fields = ("key", "accuracy", "tokens", "acceptance", "curve", "candidates", "exact")
    batched = [{f: r.get(f) for f in fields} for r in read_results(tmp_path / "b")]
    alone = [{f: r.get(f) for f in fields} for r in read_results(finished_run)]
    assert len(batched) == len(alone) > 2
    assert sorted(batched, key=lambda r: r["key"]) == sorted(alone, key=lambda r: r["key"])


def test_an_alpha_sweep_runs_each_alpha_as_a_run_at_that_alpha_alone(tmp_path):
    """`--alpha 2,4` (from a config file's list) runs every method but base at both α, each
    batch's problems at both as one batch: the α = 4 units are those of an α = 4 run (common
    random numbers), base runs once, and the α = 2 units differ."""
    settings = ["power", *TINY, "--decisions", "2", "--problems-per-k", "2"]
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"alpha": [2, 4]}))
    assert run.main([*settings, "--batch-problems", "2", "--config", str(config), "--out", str(tmp_path / "sweep")]) == 0
    assert run.main([*settings, "--alpha", "4", "--out", str(tmp_path / "alone")]) == 0
    fields = ("accuracy", "tokens", "acceptance", "curve", "exact")
    sweep = read_results(tmp_path / "sweep")
    by_alpha = {alpha: {(r["problem"], r["method"]): {f: r.get(f) for f in fields} for r in sweep if r["alpha"] == alpha}
                for alpha in (2.0, 4.0, None)}
    alone = {(r["problem"], r["method"]): {f: r.get(f) for f in fields} for r in read_results(tmp_path / "alone")}
    assert {key for key in alone if key[1] != "base"} == set(by_alpha[4.0]) == set(by_alpha[2.0])
    assert by_alpha[4.0] | by_alpha[None] == alone
    for method in ("exact", "mh_uniform"):  # α reached the references and the sampler
        assert any(by_alpha[2.0][key] != by_alpha[4.0][key] for key in by_alpha[2.0] if key[1] == method), method
    assert sorted({r["key"] for r in sweep if r["problem"] == "K2-0"}) == [
        "K2-0/base", *(f"K2-0/{m}/alpha={a}" for m in ("exact", "mh_uniform", "temperature") for a in (2, 4))]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| group | method | α |" in summary and "| MH, uniform cuts | 2 |" in summary
    assert (tmp_path / "sweep" / "accuracy_vs_alpha.png").stat().st_size > 0


@pytest.mark.parametrize("leftover", ["results.jsonl", "model.msgpack"])
def test_existing_run_directory_needs_resume(leftover, tmp_path, capsys):
    # also a run killed after caching its model but before its first result: a new run with
    # other options would load that stale cache
    out = tmp_path / "run"
    out.mkdir()
    (out / leftover).write_text('{"key": "x"}\n')
    assert_one_line_error(Outcome(capsys, "power", *TINY, "--out", out), "--resume")
    assert (out / leftover).read_text() == '{"key": "x"}\n'


@pytest.mark.parametrize("error", ["argument", "exit", "bug"])
@pytest.mark.parametrize("folder", ["new", "empty"])
def test_new_run_failing_before_its_first_result_leaves_no_folder(error, folder, monkeypatch, tmp_path, capsys):
    # its caches included: a folder left behind blocks a new run and cannot be resumed
    from jaxsample.errors import ArgumentError

    def fails_after_caching(run_dir):
        run_dir.write_bytes("model.msgpack", b"weights")
        (run_dir.path / "twists").mkdir()
        if error == "argument":
            raise ArgumentError("num_canaries must be an integer in [1, 6], got 32")
        if error == "exit":
            run.fail("raise --ood-problems")
        raise ZeroDivisionError("integer modulo by zero")

    monkeypatch.setattr(run.COMMANDS["power"], "run", fails_after_caching)
    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    if error == "bug":
        with pytest.raises(ZeroDivisionError):
            run.main(["power", *TINY, "--out", str(out)])
    else:
        assert Outcome(capsys, "power", *TINY, "--out", out).returncode == 2
    assert list(tmp_path.iterdir()) == ([out] if folder == "empty" else [])
    assert not out.exists() or list(out.iterdir()) == []  # a folder given empty stays, empty


def test_cache_files_are_written_whole_or_not_at_all(tmp_path):
    from run_directory import RunDirectory

    run_dir = RunDirectory(tmp_path / "run", {}, resume=False)
    path = run_dir.write_bytes("model.msgpack", b"weights")
    assert path.read_bytes() == b"weights" and sorted(p.name for p in path.parent.iterdir()) == [
        "config.yaml", "log.txt", "model.msgpack"]


def _interrupt(args, ready, timeout=240):
    """Starts run.py, sends SIGINT once `ready()` holds, returns (exit status, stderr)."""
    process = subprocess.Popen([*RUN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the interrupt: {process.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def test_ctrl_c_stops_between_units_saves_everything_and_resumes_each_unit_once(tmp_path):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    problems = 30
    resume_command = f"python experiments/run.py power --out {out} --resume"

    def lines():
        return results.read_text().splitlines() if results.exists() else []

    # 1. During start-up and compilation: the folder exists, no unit has finished.
    status, stderr = _interrupt(["power", *TINY, "--problems-per-k", str(problems), "--out", str(out)],
                                ready=lambda: (out / "config.yaml").exists())
    assert status == 130 and "Traceback" not in stderr, stderr
    assert resume_command in stderr
    first = lines()
    # 2. Mid-run, on a resumed run.
    status, stderr = _interrupt(["power", "--out", str(out), "--resume"], ready=lambda: len(lines()) >= len(first) + 5)
    assert status == 130 and "Traceback" not in stderr and resume_command in stderr, stderr
    second = lines()
    assert second[: len(first)] == first and len(first) + 5 <= len(second) < problems * 4
    assert f"{len(second)} finished result(s) saved" in stderr
    # 3. Resume to the end: every unit exactly once, nothing redone.
    result = run_cli("power", "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    after = lines()
    assert after[: len(second)] == second
    keys = [json.loads(line)["key"] for line in after]
    assert len(keys) == len(set(keys)) == problems * 4


def _saved_config(command, **changes):
    _, config, _ = run.parse([command])
    saved = {k: v for k, v in config.items() if k not in run.INVOCATION}
    saved.update(changes)
    return saved


@pytest.mark.parametrize("command, old_keys, expected", [
    ("codistill", {"no_weights_arm": True}, {"weights_arm": False}),
    ("codistill", {"no_weights_arm": False}, {"weights_arm": True}),
    ("twisted", {"chains": 4, "alpha": 4.0, "top_k": 0, "mcmc_steps": 2, "stretch_length": 0, "num_problems": 1,
                 "num_digits": 2, "operation": "add", "data": None}, {}),
])
def test_run_folders_of_earlier_versions_resume(tmp_path, command, old_keys, expected):
    """codistill saved `no_weights_arm` before it became --weights-arm/--no-weights-arm, and
    twisted saved nine options it never read; their folders resume with the same meaning."""
    current = _saved_config(command)
    old = {k: v for k, v in current.items() if k not in expected} | old_keys
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert run.resumed_config(tmp_path, command, {}) == current | expected


def test_run_folder_with_an_unknown_option_is_still_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_saved_config("twisted", bogus=1)))
    with pytest.raises(SystemExit):
        run.resumed_config(tmp_path, "twisted", {})
    assert "unknown option 'bogus'" in capsys.readouterr().err


def test_resume_may_move_a_run_to_another_mesh_or_batch(tmp_path, capsys):
    """The mesh places rows on devices and changes no draw, so a pre-empted run can continue
    on another slice; any other changed option is still refused."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_saved_config("power", mesh="data=8")))
    assert run.resumed_config(tmp_path, "power", {"mesh": "data=2"})["mesh"] == "data=2"
    with pytest.raises(SystemExit):
        run.resumed_config(tmp_path, "power", {"mesh": "data=2", "chains": 8})
    assert "these differ: --chains 8 (saved: 32)" in capsys.readouterr().err
    # So does the problem batch; a folder saved before the option existed resumes unbatched.
    old = _saved_config("power")
    del old["batch_problems"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert run.resumed_config(tmp_path, "power", {})["batch_problems"] == 1
    assert run.resumed_config(tmp_path, "power", {"batch_problems": 4})["batch_problems"] == 4
