"""jaxsample experiments: `python experiments/run.py [COMMAND] [OPTIONS]`.

With no arguments, runs the default experiment: power sampling on the embedded model.
Every command writes a run directory (config.yaml, results.jsonl, summary.md, plots, log.txt)
and continues an interrupted run with `--out DIR --resume`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import yaml  # noqa: E402

import causalrm_experiment  # noqa: E402
import codistill_experiment  # noqa: E402
import csa_experiment  # noqa: E402
import gate_experiment  # noqa: E402
import grpo_experiment  # noqa: E402
import orca_experiment  # noqa: E402
import power_experiment  # noqa: E402
import route_experiment  # noqa: E402
import smc_experiment  # noqa: E402
import steer_experiment  # noqa: E402
import twisted_experiment  # noqa: E402
from run_directory import (  # noqa: E402
    Interrupted,
    RunDirectory,
    check_interrupt,
    default_run_dir,
    fail,
    install_interrupt_handler,
    read_saved_config,
    set_resume_command,
    share_from_process_0,
)

from jaxsample import parallel  # noqa: E402
from jaxsample.errors import JaxsampleError  # noqa: E402

COMMANDS = {
    "power": power_experiment,
    "smc": smc_experiment,
    "csa": csa_experiment,
    "orca": orca_experiment,
    "gate": gate_experiment,
    "route": route_experiment,
    "causalrm": causalrm_experiment,
    "steer": steer_experiment,
    "twisted": twisted_experiment,
    "grpo": grpo_experiment,
    "codistill": codistill_experiment,
}
DEFAULT_COMMAND = "power"
# Options about this invocation, not the run: never saved in config.yaml.
INVOCATION = ("config", "out", "resume", "distributed")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage block)."""

    def error(self, message):
        fail(f"{self.prog}: {message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it says something: not where the help text already
    states the default, nor for an unset (None or empty) default that the help explains."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python experiments/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=_HelpFormatter,
        )
        sub.add_argument("--config", type=Path, help="YAML file of option values (keys as the long option names, dashes or underscores); flags given on the command line win")
        sub.add_argument("--out", type=Path, help="run directory (default: runs/COMMAND-TIMESTAMP, with -2, -3, ... added if a run started in the same second holds that name)")
        sub.add_argument("--resume", action="store_true", help="continue the run in --out from its saved config, skipping finished work; flags that differ from the saved config are refused, except --mesh (a run may continue on other devices)")
        sub.add_argument("--seed", type=int, default=0, help="PRNG seed of the whole run")
        sub.add_argument("--distributed", action="store_true", help="join a multi-host run first (jax.distributed.initialize; coordinator from JAXSAMPLE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or detected on TPU pods, SLURM and Open MPI)")
        module.add_arguments(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def _run_options(subparser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options saved in a run's config.yaml, by destination name."""
    return {a.dest: a for a in subparser._actions if a.option_strings and a.dest not in INVOCATION and a.dest != "help"}


def coerce_options(subparser: argparse.ArgumentParser, values: dict, source: str) -> dict[str, Any]:
    """Checks YAML option values against the parser (names, types, choices); one-line errors.

    Args:
      subparser: the command's parser.
      values: option name (dashes or underscores) → value, as read from YAML.
      source: the file, named in errors.
    """
    options = _run_options(subparser)
    coerced = {}
    for key, value in values.items():
        if not isinstance(key, str):
            fail(f"{source}: option names must be strings, got {key!r}")
        dest = key.replace("-", "_")
        if dest not in options:
            fail(f"{source}: unknown option {key!r}")
        action = options[dest]
        flag = action.option_strings[0]
        boolean = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        kind = bool if boolean else action.type or str
        if kind is bool:
            ok = isinstance(value, bool)
        elif value is None:
            ok = action.default is None
        elif kind not in (int, float, str):  # the option's own parser, e.g. --alpha's
            try:
                value, ok = kind(value), True
            except argparse.ArgumentTypeError as e:
                fail(f"{source}: {flag} {e}")
        elif kind in (int, float):
            if isinstance(value, str):
                try:
                    value = kind(value)
                except ValueError:
                    pass
            ok = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
            value = kind(value) if ok else value
        else:  # strings (and paths): YAML may read "1" or "1.5" as a number
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            value = str(value) if ok else value
        if not ok:
            expected = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")
            fail(f"{source}: {flag} must be {expected}, got {value!r}")
        if action.choices is not None and value not in action.choices:
            fail(f"{source}: {flag} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        coerced[dest] = value
    return coerced


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        fail(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        fail(f"config file {path} is not valid YAML: {e}")
    values = {} if values is None else values
    if not isinstance(values, dict):
        fail(f"config file {path} must hold a mapping of option names to values, got {type(values).__name__}")
    return values


def parse(argv: list[str]) -> tuple[str, dict, dict]:
    """`(command, config, given)`: every option resolved (defaults, then --config, then the
    command line), and the options the user set explicitly (--config or command line)."""
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND, *argv]
    args = parser.parse_args(argv)
    subparser = _subparser(parser, args.command)
    from_file = {}
    if args.config is not None:
        from_file = coerce_options(subparser, _read_config_file(args.config), f"config file {args.config}")
        # Config values replace defaults; explicit command-line flags still win.
        subparser.set_defaults(**from_file)
        args = parser.parse_args(argv)
    explicit = build_parser()
    for action in _subparser(explicit, args.command)._actions:
        action.default = argparse.SUPPRESS
    given = from_file | {k: v for k, v in vars(explicit.parse_args(argv)).items() if k not in (*INVOCATION, "command")}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return args.command, config, given


# Saved options a resumed run may change: they place the work on devices, and change no draw.
_PLACEMENT_OPTIONS = ("mesh", "batch_problems")
# Options an earlier version saved under another name (old name → new name, value map) or
# saved although the command never read them, so folders made before the change still resume.
_RENAMED_OPTIONS = {"codistill": {"no_weights_arm": ("weights_arm", lambda value: not value)}}
_RETIRED_OPTIONS = {
    "twisted": ("chains", "alpha", "top_k", "mcmc_steps", "stretch_length", "num_problems", "num_digits",
                "operation", "data"),
}


def _upgrade_saved_config(command: str, saved: dict) -> dict:
    saved = dict(saved)
    for old, (new, convert) in _RENAMED_OPTIONS.get(command, {}).items():
        if old in saved and new not in saved and isinstance(saved[old], bool):
            saved[new] = convert(saved.pop(old))
    for old in _RETIRED_OPTIONS.get(command, ()):
        saved.pop(old, None)
    return saved


def resumed_config(out: Path, command: str, given: dict) -> dict:
    """The saved config of the run in `out`, checked, with no option changed by `given`."""
    saved = read_saved_config(out)
    source = f"{out / 'config.yaml'}"
    saved_command = saved.pop("command", None)
    if saved_command != command:
        fail(
            f"--resume: {out} holds a {saved_command!r} run, not {command!r}; continue it with "
            f"python experiments/run.py {saved_command} --out {out} --resume"
            if saved_command in COMMANDS else f"{source} is corrupted: 'command' is {saved_command!r}"
        )
    saved = _upgrade_saved_config(command, saved)
    options = _run_options(_subparser(build_parser(), command))
    # A placement option newer than the folder takes its default (it changes no draw).
    saved |= {k: options[k].default for k in _PLACEMENT_OPTIONS if k in options and k not in saved}
    missing = sorted(set(options) - set(saved))
    if missing:
        fail(f"{source} is corrupted or from another version: option(s) {', '.join(missing)} missing")
    config = coerce_options(_subparser(build_parser(), command), saved, source)
    # The mesh changes where rows run, not what they draw: a run may continue on other devices.
    config.update({k: given[k] for k in _PLACEMENT_OPTIONS if k in given})
    changed = [
        f"{options[k].option_strings[0]} {given[k]} (saved: {config[k]})"
        for k in sorted(given) if given[k] != config[k]
    ]
    if changed:
        fail(
            f"--resume continues {out} with its saved options; these differ: {', '.join(changed)}. "
            "Drop them, or start a new run with another --out"
        )
    return {"command": command, **config}


def open_run(out: Path, command: str, config: dict, given: dict, numbered: bool = False) -> RunDirectory:
    """Checks the options and creates the run directory `out` (with --resume, reopens it).
    `numbered`: `out` is the default name, numbered if another run holds it."""
    if config["resume"]:
        run_config = resumed_config(out, command, given)
    else:
        run_config = {k: v for k, v in config.items() if k not in INVOCATION}
    COMMANDS[command].check_config(run_config)  # before anything is written
    return RunDirectory(out, run_config, config["resume"], numbered)


def open_shared_run(out: Path, command: str, config: dict, given: dict, numbered: bool = False) -> RunDirectory:
    """Multi-host: process 0 alone opens and writes the run directory; every other process
    gets a replica of its config and finished units (its filesystem may not hold process 0's
    folder), so all run the same units in the same order. Every process calls it."""
    if jax.process_index() == 0:
        run_dir = None
        try:
            run_dir = open_run(out, command, config, given, numbered)
        finally:  # on an error too: the other processes wait for this
            share_from_process_0(None if run_dir is None else {"config": run_dir.config, "finished": run_dir.finished})
        return run_dir
    shared = share_from_process_0(None)
    if shared is None:
        fail("process 0 could not open the run directory (its error says why)")
    return RunDirectory.replica(shared["config"], shared["finished"])


def main(argv: list[str] | None = None) -> int:
    command, config, given = parse(sys.argv[1:] if argv is None else argv)
    resume, distributed = config["resume"], config["distributed"]
    if resume and config["out"] is None:
        fail(f"--resume needs --out DIR, the run to continue (python experiments/run.py {command} --out DIR --resume)")
    numbered = config["out"] is None
    out = config["out"] or str(default_run_dir(command))
    if distributed:
        try:
            parallel.initialize_distributed()
        except (JaxsampleError, OSError) as error:
            fail(str(error))
        except (ValueError, RuntimeError, TypeError) as error:  # jax.distributed.initialize's own
            fail(
                f"--distributed could not join a multi-host run ({error}); set JAXSAMPLE_COORDINATOR=host:port, "
                "JAXSAMPLE_NUM_PROCESSES and JAXSAMPLE_PROCESS_ID in every process (JAX finds them itself on "
                "TPU pods, SLURM and Open MPI), or drop --distributed"
            )
        out = share_from_process_0(out)  # process 0's name: another host's clock may read another second
    out = Path(out)
    # Only process 0 of a multi-host run reports; the others compute alongside it.
    reports = not distributed or jax.process_index() == 0
    resume_command = f"python experiments/run.py {command} --out {out} --resume"
    previous_handler = install_interrupt_handler(resume_command)
    run_dir = None
    try:
        run_dir = (open_shared_run if distributed else open_run)(out, command, config, given, numbered)
        if reports and run_dir.path != out:
            resume_command = f"python experiments/run.py {command} --out {run_dir.path} --resume"
            set_resume_command(resume_command)
        if resume and reports:
            dropped = f", {run_dir.dropped} repeated record(s) dropped" if run_dir.dropped else ""
            print(f"resuming {out}: {len(run_dir.finished)} finished result(s) kept{dropped}")
        check_interrupt()
        summary = COMMANDS[command].run(run_dir)
    except Interrupted:
        finished = len(run_dir.finished) if run_dir is not None else 0
        if reports:
            print(f"\ninterrupted; {finished} finished result(s) saved; continue with: {resume_command}", file=sys.stderr)
        return 130
    except BaseException as error:
        # on any failure (a bad option, a bug's traceback, an experiment's own exit) a new run
        # with no result leaves no folder that blocks the same --out, nor one --resume cannot use
        if run_dir is not None:
            run_dir.remove_if_no_results()
        if isinstance(error, (JaxsampleError, OSError)):
            fail(str(error))
        raise
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if reports:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
