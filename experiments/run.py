"""jaxsample experiments: `python experiments/run.py [COMMAND] [OPTIONS]`.

With no arguments, runs the default experiment: power sampling on the embedded model.
Every command writes a run directory (config.yaml, results.jsonl, summary.md, plots, log.txt)
and continues an interrupted run with `--out DIR --resume`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import power_experiment  # noqa: E402
import route_experiment  # noqa: E402
import smc_experiment  # noqa: E402
from run_directory import RunDirectory, default_run_dir, fail  # noqa: E402

from jaxsample.errors import JaxsampleError  # noqa: E402

COMMANDS = {"power": power_experiment, "smc": smc_experiment, "route": route_experiment}
DEFAULT_COMMAND = "power"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.add_argument("--config", type=Path, help="YAML file of option values (keys as the long option names, dashes or underscores); flags given on the command line win")
        sub.add_argument("--out", type=Path, help="run directory (default runs/COMMAND-TIMESTAMP)")
        sub.add_argument("--resume", action="store_true", help="continue the run in --out from its saved config, skipping finished work")
        sub.add_argument("--seed", type=int, default=0, help="PRNG seed of the whole run")
        module.add_arguments(sub)
    return parser


def parse(argv: list[str]) -> tuple[str, dict]:
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_COMMAND, *argv]
    args = parser.parse_args(argv)
    if args.config is not None:
        if not args.config.is_file():
            fail(f"config file {args.config} does not exist")
        values = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(values, dict):
            fail(f"config file {args.config} must hold a mapping of option names to values")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        defaults = vars(parser.parse_args([args.command]))
        unknown = sorted(set(values) - set(defaults) - {"command"})
        if unknown:
            fail(f"config file {args.config}: unknown option(s) {', '.join(unknown)}")
        # Config values replace defaults; explicit command-line flags still win.
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return args.command, config


def main(argv: list[str] | None = None) -> int:
    command, config = parse(sys.argv[1:] if argv is None else argv)
    module = COMMANDS[command]
    out = Path(config.pop("out") or default_run_dir(command))
    resume = config.pop("resume")
    config.pop("config")
    try:
        run_dir = RunDirectory(out, config, resume)
        if resume:
            print(f"resuming {out}: {len(run_dir.finished)} finished result(s) kept")
        module.check_config(run_dir.config)
        summary = module.run(run_dir)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python experiments/run.py {command} --out {out} --resume", file=sys.stderr)
        return 130
    except (JaxsampleError, FileNotFoundError) as error:
        fail(str(error))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
