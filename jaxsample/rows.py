"""Row operations on pytrees of rows (MH chains, SMC particles, samples).

Every leaf of such a pytree is row-leading, except the parts wrapped in `Shared`: data
common to every row, such as the prompt's KV cache that all chains and particles continue.
Gathering rows (resampling) and selecting per row (MH accept/reject) go through `map_rows`,
which passes `Shared` parts through untouched, so they are never copied per row.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# A gathered leaf of more than this many elements is gathered in place, a slice at a time.
_IN_PLACE_SIZE = 1 << 16
_IN_PLACE_SLICES = 16


class Shared(NamedTuple):
    """A pytree common to every row (no row axis); row operations leave it as it is."""

    value: Any


def is_shared(node: Any) -> bool:
    return isinstance(node, Shared)


def map_rows(fn: Callable, tree: Any, *rest: Any) -> Any:
    """`jax.tree.map(fn, tree, *rest)` over the row-leading leaves; `Shared` parts of `tree`
    are kept as they are (those of `rest` are ignored)."""
    return jax.tree.map(lambda x, *r: x if is_shared(x) else fn(x, *r), tree, *rest, is_leaf=is_shared)


def select_rows(mask: Array, new: Any, old: Any) -> Any:
    """Per row: `new` where `mask` (bool `[B]`) else `old` (the MH accept step); `Shared`
    parts, such as the prompt cache, are taken from `new`."""
    return map_rows(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def gather_rows(tree: Any, indices: Array) -> Any:
    """Rows `indices` (int32 `[B']`) of every row-leading leaf.

    A large leaf with as many rows out as in (resampling) is gathered in place, in
    `_IN_PLACE_SLICES` slices of its non-row elements: each slice's rows all come from that
    same slice, so it is read whole before being overwritten, and the peak holds the leaf
    plus one slice instead of twice the leaf (a KV cache is most of the state).
    """
    indices = jnp.asarray(indices, jnp.int32)
    return map_rows(lambda x: _gather(x, indices), tree)


def _gather(x: Array, indices: Array) -> Array:
    if x.ndim < 2 or x.size < _IN_PLACE_SIZE or indices.shape[0] != x.shape[0]:
        return jnp.take(x, indices, axis=0)
    width = math.prod(x.shape[1:])
    slices = math.gcd(width, _IN_PLACE_SLICES)
    flat = x.reshape(x.shape[0], slices, width // slices)

    def gather_slice(i, flat):
        part = jax.lax.dynamic_index_in_dim(flat, i, axis=1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(flat, jnp.take(part, indices, axis=0), i, axis=1)

    return jax.lax.fori_loop(0, slices, gather_slice, flat).reshape(x.shape)
