"""Run directories for experiments: resolved config, append-only JSONL results, resume, log.

A run directory holds `config.yaml` (every option, resolved), `results.jsonl` (one line per
finished unit of work, flushed and fsynced as it finishes), `log.txt`, `summary.md` and
plots. Restarting with `--resume` reads the finished units back, drops a line that a kill
cut in half, and continues with the rest: nothing already written is lost or redone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from jaxsample.errors import ArgumentError


class RunDirectory:
    """One experiment's output folder."""

    def __init__(self, path: Path, config: dict[str, Any], resume: bool):
        self.path = Path(path)
        self.results_path = self.path / "results.jsonl"
        config_path = self.path / "config.yaml"
        if resume:
            if not config_path.exists():
                raise ArgumentError(f"--resume: {self.path} holds no config.yaml to resume from")
            self.config = yaml.safe_load(config_path.read_text())
        else:
            if self.results_path.exists() and self.results_path.stat().st_size > 0:
                raise ArgumentError(
                    f"{self.path} already holds results; pass --resume to continue it or "
                    "choose another --out"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(config, sort_keys=True))
            self.config = config
        self.finished = self._read_finished()
        self.log = _file_logger(self.path / "log.txt")

    def _read_finished(self) -> list[dict[str, Any]]:
        if not self.results_path.exists():
            return []
        raw = self.results_path.read_bytes()
        complete, _, partial = raw.rpartition(b"\n")
        if partial:  # a kill mid-write: keep only whole lines
            with open(self.results_path, "wb") as f:
                f.write(complete + b"\n" if complete else b"")
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def done_keys(self) -> set[str]:
        return {record["key"] for record in self.finished}

    def append(self, record: dict[str, Any]) -> None:
        """Appends one finished unit (must carry a unique `key`) durably."""
        with open(self.results_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.finished.append(record)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path


def _file_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"jaxsample.run.{path.parent.name}.{id(path)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


def default_run_dir(command: str) -> Path:
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
