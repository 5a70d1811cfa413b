"""Argument checks shared by every public function.

Each check raises `jaxsample.errors.ArgumentError` with one message shape: the argument's
name, the value it got and the allowed range, e.g.
`alpha must be a number in (0, inf), got inf`. Values that are traced inside `jit` cannot be
inspected and pass unchecked; numpy integers count as integers everywhere, and `check_int` and
`check_real` also take 0-d numpy and JAX arrays (a count or level computed with jnp).
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError


def is_int(value: Any) -> bool:
    """True for Python and numpy integers (bools excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _concrete_int_scalar(value: Any) -> Any:
    """A 0-d integer array (numpy or concrete JAX) as a numpy integer; anything else unchanged."""
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer) and (
        value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    ):
        return np.asarray(value)[()]
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Returns `value` as a Python int; raises unless it is an integer in `[minimum, maximum]`.

    Python and numpy integers and 0-d integer arrays count; bools and traced values do not.
    """
    value = _concrete_int_scalar(value)
    if not is_int(value) or (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        shown = int(value) if is_int(value) else repr(value)
        raise ArgumentError(f"{name} must be an integer in [{low}, {high}], got {shown}")
    return int(value)


def check_choice(name: str, value: Any, allowed: Collection) -> Any:
    """Returns `value`; raises unless it is one of `allowed`."""
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


_OPEN = {"(": operator.gt, "[": operator.ge}
_CLOSE = {")": operator.lt, "]": operator.le}


def check_real(name: str, value: Any, interval: str) -> Any:
    """Raises unless every element of a concrete `value` lies in `interval` (NaN never does).

    Args:
      name: the argument's name, as the caller's signature spells it.
      value: a number or array; traced values are returned unchecked.
      interval: the allowed range in interval notation, e.g. `"(0, inf)"`, `"(0, 1]"`,
        `"[-inf, inf]"` (any number but NaN), `"(-inf, inf)"` (finite).

    Returns:
      `value`, unchanged.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if value is None:  # np.asarray would read None as NaN
        raise ArgumentError(f"{name} must be a number in {interval}, got None")
    low_ok, high_ok = _OPEN[interval[0]], _CLOSE[interval[-1]]
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or isinstance(value, (str, bytes)) or np.asarray(value).dtype == bool:
        raise ArgumentError(f"{name} must be a number in {interval}, got {value!r}")
    inside = low_ok(values, low) & high_ok(values, high)
    if not np.all(inside):
        bad = values[~inside] if values.ndim else values
        shown = float(np.ravel(bad)[0])
        where = "" if values.ndim == 0 else f" (element {tuple(int(i) for i in np.argwhere(~inside)[0])})"
        raise ArgumentError(f"{name} must be a number in {interval}, got {shown!r}{where}")
    return value


def check_int_array(name: str, values: Any, low: int | None = None, high: int | None = None, what: str = "") -> Any:
    """Raises unless `values` hold integers in `[low, high)` (a bound of None is open); returns
    `values` unchanged.

    The one check of integer arrays (token ids, lengths, indices). It reads the values as
    given, before any int32 cast, so a float cannot truncate and an int64 ≥ 2³¹ cannot wrap
    into range. The dtype is checked even when traced (it is static), the range only on
    concrete values, so the check never adds a device-to-host copy to a compiled loop.

    Args:
      name: the argument's name, as the caller's signature spells it.
      values: an array or number of any rank.
      low, high: the allowed range `[low, high)`.
      what: names the range in the message, e.g. `"the vocabulary of model 'toy'"`.
    """
    traced = isinstance(values, jax.core.Tracer)
    array = values if traced else np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer):
        raise ArgumentError(f"{name} must hold integers, got dtype {array.dtype}")
    if traced or array.size == 0:
        return values
    outside = np.zeros(array.shape, bool)
    if low is not None:
        outside |= array < low
    if high is not None:
        outside |= array >= high
    if outside.any():
        index = tuple(int(i) for i in np.argwhere(outside)[0])
        where = f" at index {index}" if array.ndim else ""
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high})"
        raise ArgumentError(f"{name} holds {int(array[index])}{where}, outside {what + ' ' if what else ''}{interval}")
    return values


def check_scalar(name: str, value: Any, interval: str) -> Any:
    """`check_real` for a single number (0-d arrays included): also raises on arrays of rank ≥ 1."""
    if np.ndim(value) != 0:
        raise ArgumentError(f"{name} must be a number in {interval}, got an array of shape {np.shape(value)}")
    return check_real(name, value, interval)


def check_keys(name: str, keys: Any, count: int) -> Any:
    """Returns `keys`; raises unless they are `count` PRNG keys: typed `[count]`
    (`jax.random.split(key, count)`) or raw `[count, 2]` of the default implementation."""
    raw = jax.eval_shape(jax.random.PRNGKey, 0)
    dtype = getattr(keys, "dtype", None)
    if dtype is not None and (
        (jnp.issubdtype(dtype, jax.dtypes.prng_key) and keys.shape == (count,))
        or (dtype == raw.dtype and keys.shape == (count, *raw.shape))
    ):
        return keys
    got = repr(keys) if dtype is None else f"dtype {dtype} and shape {keys.shape}"
    raise ArgumentError(
        f"{name} must be {count} PRNG keys, e.g. jax.random.split(key, {count}) (typed [{count}] "
        f"or raw [{count}, 2]), got {got}"
    )


def check_key(name: str, key: Any) -> Any:
    """Returns `key`; raises unless it is one PRNG key: a typed key (`jax.random.key(seed)`,
    shape []) or a raw key of the default implementation (`jax.random.PRNGKey(seed)`, uint32
    [2]). Only the dtype and shape are read, so traced keys are checked too."""
    raw = jax.eval_shape(jax.random.PRNGKey, 0)
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        got = repr(key)
    elif jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return key
        got = f"typed keys of shape {key.shape}"
    elif dtype == raw.dtype and key.shape == raw.shape:
        return key
    else:
        got = f"an array of dtype {dtype} and shape {key.shape}"
    raise ArgumentError(
        f"{name} must be one PRNG key, jax.random.key(seed) or a raw jax.random.PRNGKey(seed) "
        f"({raw.dtype}{list(raw.shape)}), got {got}"
    )
