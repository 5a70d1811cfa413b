"""Saving and loading an A-LQR controller (safetensors: d, v, β and the settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxsample.errors import CheckpointError
from jaxsample.steering.alqr import Controller


def save_controller(path: str | os.PathLike, ctrl: Controller, settings: dict | None = None) -> None:
    """Writes `d [T, n]`, `v [T, n]`, `beta [T]` and JSON `settings` (q, r, λ, ...) to `path`."""
    tensors = {name: np.asarray(value, np.float32) for name, value in ctrl._asdict().items()}
    save_file(tensors, str(path), metadata={"settings": json.dumps(settings or {})})


def load_controller(path: str | os.PathLike) -> tuple[Controller, dict]:
    """Reads a controller written by `save_controller`; returns `(controller, settings)`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such steering controller file")
    try:
        with safe_open(str(path), framework="np") as f:
            missing = [name for name in Controller._fields if name not in f.keys()]
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing} (expected {Controller._fields})")
            ctrl = Controller(**{name: jnp.asarray(f.get_tensor(name)) for name in Controller._fields})
            settings = json.loads((f.metadata() or {}).get("settings", "{}"))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    T, n = ctrl.d.shape
    if ctrl.v.shape != (T, n) or ctrl.beta.shape != (T,):
        raise CheckpointError(f"{path}: inconsistent shapes d {ctrl.d.shape}, v {ctrl.v.shape}, beta {ctrl.beta.shape}")
    return ctrl, settings
