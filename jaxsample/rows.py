"""Row operations on pytrees of rows (MH chains, SMC particles, samples).

Every leaf of such a pytree is row-leading, except the parts wrapped in `Shared`: data
common to every row, such as the prompt's KV cache that all chains and particles continue.
Gathering rows (resampling) and selecting per row (MH accept/reject) go through `map_rows`,
which passes `Shared` parts through untouched, so they are never copied per row.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError

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


def expand_groups(values: Array | float, num_rows: int) -> Array:
    """Per-row values `[num_rows]` of one value for every row, or of per-group values `[P]`:
    the rows are P equal groups, group-major (the rows of P prompts, prompt-major), and row r
    takes the value of group r // (num_rows / P)."""
    if not jnp.ndim(values):
        return jnp.broadcast_to(values, (num_rows,))
    groups = jnp.shape(values)[0]
    if jnp.ndim(values) != 1 or num_rows % groups:
        raise ArgumentError(
            f"per-group values must have shape [P] with P dividing the {num_rows} rows, got shape {jnp.shape(values)}")
    return jnp.repeat(values, num_rows // groups, total_repeat_length=num_rows)


def gather_rows(tree: Any, indices: Array) -> Any:
    """Rows `indices` (int32 `[B']`) of every row-leading leaf.

    A large leaf with as many rows out as in (resampling) is gathered in place, in about
    `_IN_PLACE_SLICES` slices along one non-row axis: each slice's rows all come from that
    same slice, so it is read whole before being overwritten, and the peak holds the leaf
    plus one slice instead of twice the leaf (a KV cache is most of the state). When
    `indices` are `0..B-1` (no particle resampled), no slice is moved.
    """
    indices = jnp.asarray(indices, jnp.int32)
    return map_rows(lambda x: _gather(x, indices), tree)


def _gather(x: Array, indices: Array) -> Array:
    if x.ndim < 2 or x.size < _IN_PLACE_SIZE or indices.shape[0] != x.shape[0]:
        return jnp.take(x, indices, axis=0)
    # The slices run along the axis before the last (axis 1 for fewer axes): a KV cache
    # [B, L, K, S, H] is sliced along its slots and keeps its kv-head axis whole, which a
    # tensor-parallel model axis splits (`jaxsample.parallel`); sliced across it, GSPMD
    # would gather the whole cache's heads onto every device.
    axis = max(1, x.ndim - 2)
    length = x.shape[axis]
    width = -(-length // _IN_PLACE_SLICES)
    whole, rest = divmod(length, width)

    def gather_slice(start, x, size):
        part = jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.take(part, indices, axis=0), start, axis=axis)

    # The identity skips the work through the loops' trip counts rather than a `lax.cond`:
    # a while loop updates its carry in place, while XLA:GPU gives a leaf that passes
    # through a conditional a second buffer (a second KV cache at the peak).
    moves = jnp.any(indices != jnp.arange(x.shape[0], dtype=jnp.int32)).astype(jnp.int32)
    x = jax.lax.fori_loop(0, moves * whole, lambda i, x: gather_slice(i * width, x, width), x)
    if rest:  # the shorter last slice
        x = jax.lax.fori_loop(0, moves, lambda _, x: gather_slice(whole * width, x, rest), x)
    return x
