"""Layouts of a decoder's layer params, both read by every function of `jaxsample.models`:

- per-layer (what `load` gives): `params["layers"]` is a tuple of L dicts, one per layer,
  each matrix a whole array. The layers run unrolled in the program: a larger program (the
  Qwen2.5-7B decode step compiles in 12 s instead of 10 s on an H200) that reads every
  weight in place. On 2026-12-04 it decoded the 7B shape at 61% of an H200's memory
  roofline against 28% for the stack (`experiments/results/gpu/`), and SmolLM2-135M 1.7x
  faster on CPU.
- stacked (what `init_params` gives): `params["layers"]` is one dict of `[L, ...]` leaves,
  the layer loop one `lax.scan` that compiles once whatever the depth. XLA:CPU and XLA:GPU
  copy each layer's slice out of the stack before its matmuls read it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.models.config import ModelConfig
from jaxsample.validation import check_int

Params = Any


def unstack_layers(params: Params) -> Params:
    """`params` with stacked `[L, ...]` layer leaves split into a tuple of L per-layer dicts
    (copies: the layer weights are held twice while both exist); per-layer params are
    returned as they are."""
    layers = params["layers"]
    if _is_per_layer(layers):
        return params
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda leaf: leaf[index], layers) for index in range(count))}


def stack_layers(params: Params) -> Params:
    """`params` with per-layer dicts stacked into `[L, ...]` leaves (copies); stacked params
    are returned as they are. For a smaller decode program that compiles faster and runs
    slower, or a checkpoint of the stacked layout."""
    layers = params["layers"]
    if not _is_per_layer(layers):
        return params
    return {**params, "layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)}


def unstacked_layers(config: ModelConfig, params: Params):
    """`params["layers"]` when it is the per-layer tuple of dicts, else None (stacked)."""
    layers = params["layers"]
    if not _is_per_layer(layers):
        return None
    if len(layers) != config.num_hidden_layers:
        raise ArgumentError(f"per-layer params hold {len(layers)} layers, the config {config.num_hidden_layers}")
    return layers


def layer_params(config: ModelConfig, params: Params, index) -> Params:
    """Layer `index`'s params dict in either layout. A Python int picks it as it is (per-layer)
    or as a static slice (stacked); an int array, which may be traced, selects per-layer
    params with `lax.switch` (copying that one layer's weights) and slices stacked ones."""
    layers = unstacked_layers(config, params)
    if isinstance(index, (int, np.integer)):
        index = check_int("layer", index, 0, config.num_hidden_layers - 1)
        return layers[index] if layers is not None else jax.tree.map(lambda leaf: leaf[index], params["layers"])
    if layers is None:
        return jax.tree.map(lambda leaf: leaf[index], params["layers"])
    return jax.lax.switch(index, [lambda layer=layer: layer for layer in layers])


def _is_per_layer(layers) -> bool:
    return isinstance(layers, (tuple, list))
