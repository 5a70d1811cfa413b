"""Saving and loading masked-diffusion checkpoints (a directory: config.json, params.msgpack,
optionally decision_task.json with the task and the fixed problem the model was trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp

from jaxsample.diffusion.model import DiffusionConfig, MaskedDiffusionLM, init_model
from jaxsample.errors import CheckpointError, ModelNotFoundError
from jaxsample.tasks.decisions import DecisionProblem, DecisionTaskConfig

SHIPPED = {"toy-diffusion": Path(__file__).resolve().parent.parent / "checkpoints" / "toy-diffusion"}


def resolve(name_or_path: str | Path) -> Path:
    """A shipped name (`toy-diffusion`) or a checkpoint directory → its path."""
    path = SHIPPED.get(str(name_or_path), Path(name_or_path))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"no diffusion checkpoint {str(name_or_path)!r}: expected one of "
                                 f"{sorted(SHIPPED)} or a directory holding config.json and params.msgpack")
    return path


def save(directory: str | Path, model: MaskedDiffusionLM, problem: DecisionProblem | None = None,
         training: dict | None = None) -> Path:
    """Writes `model` (and the decision problem it models, and training metadata) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (directory / "params.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(model.params)))
    if problem is not None:
        task = {"task": problem.config.to_dict(), "items": list(problem.items)}
        (directory / "decision_task.json").write_text(json.dumps(task, indent=2) + "\n")
    if training is not None:
        (directory / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return directory


def load(name_or_path: str | Path = "toy-diffusion") -> MaskedDiffusionLM:
    """The `MaskedDiffusionLM` of a shipped name or a checkpoint directory (no network)."""
    path = resolve(name_or_path)
    try:
        config = DiffusionConfig(**json.loads((path / "config.json").read_text()))
        template = init_model(jax.random.key(0), config)
        params = flax.serialization.from_bytes(template.params, (path / "params.msgpack").read_bytes())
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"cannot read the diffusion checkpoint at {path}: {error}") from error
    return MaskedDiffusionLM(params=jax.tree.map(jnp.asarray, params), config=config)


def load_problem(name_or_path: str | Path = "toy-diffusion") -> DecisionProblem:
    """The fixed decision problem whose traces the checkpoint models.

    Args:
      name_or_path: a shipped name (`toy-diffusion`) or a checkpoint directory.

    Returns:
      `jaxsample.tasks.DecisionProblem` (its task config and K item values), read from the
      checkpoint's decision_task.json.

    Raises:
      ModelNotFoundError: no such checkpoint. CheckpointError: it holds no decision_task.json.
    """
    path = resolve(name_or_path) / "decision_task.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint was not trained on a decision problem")
    fields = json.loads(path.read_text())
    return DecisionProblem(DecisionTaskConfig.from_dict(fields["task"]), tuple(fields["items"]))
