"""Run directories for experiments: resolved config, append-only JSONL results, resume, log.

A run directory holds `config.yaml` (every option, resolved), `results.jsonl` (one line per
finished unit of work, flushed and fsynced as it finishes), `log.txt`, `summary.md` and
plots. Restarting with `--resume` reads the finished units back, drops a line that a kill
cut in half, and continues with the rest: nothing already written is lost or redone.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from jaxsample.errors import ArgumentError, DataError


class Interrupted(Exception):
    """Ctrl-C was pressed: raised between units, after the last finished one was saved."""


_interrupts = {"count": 0, "resume_command": ""}


def install_interrupt_handler(resume_command: str):
    """Handles SIGINT without raising inside running code (XLA compilation, callbacks).

    The first Ctrl-C only sets a flag: the run stops at the next unit boundary
    (`RunDirectory.append` or `check_interrupt`) by raising `Interrupted`. A second Ctrl-C
    exits at once with status 130; the finished units are already on disk.

    Returns:
      the previous handler, for `signal.signal(signal.SIGINT, previous)` when the run ends.
    """
    _interrupts.update(count=0, resume_command=resume_command)

    def handler(signum, frame):
        del signum, frame
        _interrupts["count"] += 1
        if _interrupts["count"] == 1:
            print("\ninterrupt: stopping after the current unit (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
        else:
            print(f"\ninterrupted; continue with: {_interrupts['resume_command']}", file=sys.stderr, flush=True)
            os._exit(130)

    return signal.signal(signal.SIGINT, handler)


def set_resume_command(resume_command: str) -> None:
    """The command a second Ctrl-C prints, once the run's folder is known (a default --out
    may have taken a numbered name)."""
    _interrupts["resume_command"] = resume_command


def check_interrupt() -> None:
    """Raises `Interrupted` if Ctrl-C was pressed; call it between units of work."""
    if _interrupts["count"]:
        raise Interrupted


def strict_json(value: Any) -> Any:
    """`value` with NaN and ±inf floats replaced by None, so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def read_saved_config(path: Path) -> dict[str, Any]:
    """The `config.yaml` of a run directory to resume, as a mapping (values unchecked)."""
    path = Path(path)
    config_path = path / "config.yaml"
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"--out {path} is a file, not a run directory")
    if not config_path.is_file():
        raise ArgumentError(f"--resume: {path} holds no config.yaml to resume from")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{config_path} is corrupted (not valid YAML: {e}); start a new run with another --out") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_path} is corrupted: expected a mapping of options, got {type(config).__name__}")
    return config


class RunDirectory:
    """One experiment's output folder.

    Attributes:
      path: the folder.
      config: the run's resolved options.
      finished: every finished unit's record, each `key` exactly once.
      created: this process created the folder (it is removed again if the run fails
        before writing a result).
      resume: the run continues one already in the folder.
    """

    def __init__(self, path: Path, config: dict[str, Any], resume: bool, numbered: bool = False):
        """Opens the run in `path` (`resume`) or starts a new one there. `numbered`: `path` is
        a default name that another run may hold; a new run then takes the first free one of
        `path`, `path-2`, `path-3`, ...."""
        path = Path(path)
        if path.exists() and not path.is_dir() and not numbered:
            raise ArgumentError(f"--out {path} is a file, not a run directory")
        self.config = config
        self.resume = resume
        self.created = False
        # a new run may clean up the folder once it made it or wrote config.yaml there first
        self._owned = resume
        self._created_parents: list[Path] = []
        self.path = path if resume else self._make_folder(path, numbered)
        self.results_path = self.path / "results.jsonl"
        self.finished: list[dict[str, Any]] = []
        self.log = None
        try:
            if not resume:
                self._write_config()
            self.finished, self.dropped = self._read_finished()
            self.log = _file_logger(self.path / "log.txt")
        except BaseException:
            self.remove_if_no_results()
            raise

    def _make_folder(self, path: Path, numbered: bool) -> Path:
        # The exclusive mkdir decides between two runs started at once: each gets its own folder.
        self._created_parents = [p for p in path.parents if not p.exists()]
        candidate, number = path, 1
        while True:
            try:
                candidate.mkdir(parents=True)
                self.created = self._owned = True
                return candidate
            except FileExistsError:
                if not numbered:
                    break
                number += 1
                candidate = path.with_name(f"{path.name}-{number}")
        # a started run's cached model or features belong to its options, not these
        if any(path.iterdir()):
            raise ArgumentError(self._holds_a_run(path))
        return path

    def _write_config(self) -> None:
        try:  # exclusive: of two runs given the same empty folder, one alone goes on
            with open(self.path / "config.yaml", "x") as f:
                f.write(yaml.safe_dump(self.config, sort_keys=True))
        except FileExistsError:
            raise ArgumentError(self._holds_a_run(self.path)) from None
        self._owned = True

    @staticmethod
    def _holds_a_run(path: Path) -> str:
        return (
            f"{path} already holds a run ({', '.join(sorted(p.name for p in path.iterdir())[:4])}); "
            "pass --resume to continue it, or choose another --out (a new run needs a new or empty folder)"
        )

    @classmethod
    def replica(cls, config: dict[str, Any], finished: list[dict[str, Any]]) -> "RunDirectory":
        """A multi-host run's directory as a process other than 0 holds it: process 0's config
        and finished units, in a temporary folder removed at exit (what the experiment writes
        there, plots and caches, is thrown away: process 0 alone writes the run directory)."""
        scratch = Path(tempfile.mkdtemp(prefix="jaxsample-replica-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        (scratch / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in finished))
        return cls(scratch, config, resume=True)

    def _read_finished(self) -> tuple[list[dict[str, Any]], int]:
        """Whole records, each key once; a line a kill cut in half and repeated keys are
        dropped from the file. Any other malformed line is a `DataError`."""
        if not self.results_path.exists():
            return [], 0
        raw = self.results_path.read_bytes()
        complete, _, partial = raw.rpartition(b"\n")
        records: dict[str, dict[str, Any]] = {}
        lines = complete.split(b"\n") if complete else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{self.results_path} line {number} is corrupted ({e}); delete that line to "
                    "redo its unit, then resume again"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise DataError(f"{self.results_path} line {number} is not a result record (no 'key')")
            records.setdefault(record["key"], record)
        dropped = sum(1 for line in lines if line.strip()) - len(records)
        if partial or dropped:  # rewrite whole, unique lines atomically
            temporary = self.results_path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records.values()))
            os.replace(temporary, self.results_path)
        return list(records.values()), dropped

    def done_keys(self) -> set[str]:
        return {record["key"] for record in self.finished}

    def append(self, record: dict[str, Any]) -> None:
        """Appends one finished unit (must carry a new, unique `key`) durably as strict JSON
        (NaN and ±inf become null), then stops the run here if Ctrl-C was pressed."""
        if record["key"] in self.done_keys():
            # an option that lists one value twice (e.g. --decisions 1,1) gives one unit twice
            raise ArgumentError(
                f"unit {record['key']!r} is repeated: it is already in {self.results_path}; an option "
                "lists the same value twice, so drop the repeat and start a new run with another --out"
            )
        record = strict_json(record)
        with open(self.results_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.finished.append(record)
        check_interrupt()

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Writes a cache file whole or not at all (a kill mid-write leaves no torn file)."""
        path = self.path / name
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return path

    def remove_if_no_results(self) -> None:
        """Undoes a new run that failed before its first result, so that its --out can be used
        again: removes the folder with everything in it (caches too) if this run created it,
        and the parent folders it created if they are left empty; in a folder that was there
        (empty) before, removes only what the run put there. A resumed run, a run with a
        result, and a folder another run holds are left alone."""
        if self.resume or not self._owned or self.finished or _has_content(self.results_path):
            return
        if self.log is not None:
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self._created_parents:  # innermost first
                try:
                    parent.rmdir()
                except OSError:  # another run uses it meanwhile
                    break
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _file_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"jaxsample.run.{path.parent.name}.{id(path)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


def share_from_process_0(value: Any) -> Any:
    """Process 0's `value` (JSON-able; the others pass anything) in every process of a
    multi-host run. Every process must call it, in the same order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    data = multihost_utils.broadcast_one_to_all(data if jax.process_index() == 0 else np.zeros(size, np.uint8))
    return json.loads(data.tobytes())


def default_run_dir(command: str) -> Path:
    """`runs/COMMAND-TIMESTAMP`: open it with `RunDirectory(..., numbered=True)`, which takes
    `-2`, `-3`, ... when a run started in the same second holds it."""
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-markdown table; floats get 3 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def fail(message: str) -> "None":
    """One-line error and exit status 2 — the CLI's answer to bad input."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    raise SystemExit(2)
