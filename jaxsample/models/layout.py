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
    if is_per_layer(params):
        return params
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda leaf: leaf[index], layers) for index in range(count))}


def stack_layers(params: Params) -> Params:
    """`params` with per-layer dicts stacked into `[L, ...]` leaves (copies); stacked params
    are returned as they are. For a smaller decode program that compiles faster and runs
    slower, or a checkpoint of the stacked layout."""
    if not is_per_layer(params):
        return params
    return {**params, "layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), *params["layers"])}


def unstacked_layers(config: ModelConfig, params: Params):
    """`params["layers"]` when it is the per-layer tuple of dicts, else None (stacked)."""
    if not is_per_layer(params):
        return None
    layers = params["layers"]
    if len(layers) != config.num_hidden_layers:
        raise ArgumentError(f"per-layer params hold {len(layers)} layers, the config {config.num_hidden_layers}")
    return layers


def layer_params(config: ModelConfig, params: Params, index) -> Params:
    """Layer `index`'s params dict in either layout. A Python int picks it as it is (per-layer)
    or as a static slice (stacked); an int array, which may be traced, selects per-layer
    params with `lax.switch` (copying that one layer's weights) and slices stacked ones."""
    layers = unstacked_layers(config, params)
    static = isinstance(index, (int, np.integer))
    if static:
        index = check_int("layer", index, 0, config.num_hidden_layers - 1)
    if layers is None:
        return jax.tree.map(lambda leaf: leaf[index], params["layers"])
    if static:
        return layers[index]
    return jax.lax.switch(index, [lambda layer=layer: layer for layer in layers])


def is_per_layer(params: Params) -> bool:
    """Whether `params["layers"]` is the per-layer sequence of dicts (else stacked)."""
    return isinstance(params["layers"], (tuple, list))
