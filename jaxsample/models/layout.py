"""Layouts of a decoder's layer params: stacked `[L, ...]` leaves (one array per weight kind,
the layers on the leading axis, what checkpoints load into) or unstacked (a tuple of L
per-layer dicts, whole arrays that no compiler copies out of a stack before its matmuls).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxsample.errors import ArgumentError
from jaxsample.models.config import ModelConfig

Params = Any


def unstack_layers(params: Params) -> Params:
    """`params` with the stacked `[L, ...]` layer leaves split into a tuple of L per-layer
    dicts (copies: the layer weights are held twice while both exist). Each layer's matrices
    are then whole arrays, which no compiler copies out of a stack before its matmuls (XLA:CPU
    and XLA:GPU copy a layer's slice of the stack at every decode step). `forward`, `prefill`
    and `decode_step` with `unroll_layers=True` read this layout, running the layers unrolled;
    the layer-wise functions (`apply_layer`), LoRA `merge`, `save_pretrained` and mesh
    sharding take stacked params and refuse these. `with_unstacked_layers` makes a model of it."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda leaf: leaf[index], layers) for index in range(count))}


def check_stacked_layers(params: Params, what: str) -> None:
    """Raises `ArgumentError` if `params` hold `unstack_layers`' per-layer dicts: `what`
    indexes or rewrites the `[L, ...]` stack."""
    if isinstance(params["layers"], (tuple, list)):
        raise ArgumentError(f"{what} takes stacked layer params ([L, ...] leaves); these are unstacked "
                            "(unstack_layers): use the model's stacked params")


def unstacked_layers(config: ModelConfig, params: Params):
    """`params["layers"]` when it is `unstack_layers`' sequence of per-layer dicts, else None."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return None
    if len(layers) != config.num_hidden_layers:
        raise ArgumentError(f"unstacked params hold {len(layers)} layers, the config {config.num_hidden_layers}")
    return layers
