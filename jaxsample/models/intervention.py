"""Residual-stream interventions applied inside the decoder's layer loop.

An `Intervention` edits the residual stream after chosen decoder blocks, position-wise, in
every forward the model runs: the full forward, prefill and each cached decode step. It is
how activation steering (A-LQR feedback, ActAdd, mean-difference vectors) runs inside the
jitted samplers: `lm.with_intervention(iv)` and every sampler uses it.

Which positions are edited (`positions`):
- `"all"`: every position the model processes.
- `"last"`: in prefill, each row's last real prompt token; in a decode step, the fed token
  (so a generation gets the edit at its last prompt token and at every generated token).
  In a full forward, every position from `intervene_from` on (int32 `[B]`, default T − 1,
  the final position): passing the prompt length − 1 there (as `js.score` does) reproduces
  exactly the edits a steered generation saw.

A carried intervention (`carry_init` set) also threads a per-position state through the
layers of one forward or decode step, e.g. the running error sum of S-PID: it starts fresh
at the first block of every forward, prefill and decode step, and is updated only where the
edit applies. Without `carry_init` the decoder's program is the same as with no carry.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxsample.errors import ArgumentError

Array = jax.Array

POSITIONS = ("last", "all")


@struct.dataclass
class Intervention:
    """A position-wise edit of the residual stream after the blocks in `layers`.

    Attributes:
      fn: `fn(layer int32[], h [..., D], params) -> h [..., D]`, the edited output of block
        `layer` (traced index, so one function serves every layer: index `params` by it).
        With `reads_block_input=True` it is called as `fn(layer, h, params, x)`, `x` the
        block's input at the same positions (state feedback such as A-LQR's u_k(x_k)).
        Static: define it once (a module-level function), not as a fresh lambda per call,
        or each call compiles anew.
      params: pytree of traced arrays (steering vectors, gains, coefficients); changing
        their values never recompiles, and gradients flow into them.
      layers: block indices in `[0, L)` after which `fn` is applied.
      positions: `"last"` or `"all"` (module docstring).
      reads_block_input: pass the block input `x` to `fn` as a fourth argument.
      carry_init: None, or `carry_init(h [B, T, D], params) -> carry`, a pytree of arrays
        with leading dims `[B, T]` (one state per position), made from the first block's
        input. Then `fn` takes the carry as its last argument and returns
        `(h, carry)`; the carry passes from block to block within one forward / step.
        Static, like `fn`.
    """

    fn: Callable = struct.field(pytree_node=False)
    params: Any
    layers: tuple[int, ...] = struct.field(pytree_node=False)
    positions: str = struct.field(pytree_node=False, default="last")
    reads_block_input: bool = struct.field(pytree_node=False, default=False)
    carry_init: Callable | None = struct.field(pytree_node=False, default=None)

    def check(self, num_layers: int) -> None:
        """Raises `ArgumentError` unless `layers` lie in `[0, num_layers)` and `positions`
        is `"last"` or `"all"`."""
        if not callable(self.fn):
            raise ArgumentError(f"Intervention fn must be callable, got {self.fn!r}")
        if self.carry_init is not None and not callable(self.carry_init):
            raise ArgumentError(f"Intervention carry_init must be callable or None, got {self.carry_init!r}")
        if self.positions not in POSITIONS:
            raise ArgumentError(f"Intervention positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ArgumentError(f"Intervention layers must be a non-empty tuple of ints, got {self.layers!r}")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ArgumentError(
                    f"Intervention layer {layer!r} is outside [0, {num_layers}) (the model's layers)"
                )

    def init_carry(self, h: Array):
        """The carry entering the first block, whose input is `h [B, T, D]` (None if the
        intervention carries nothing)."""
        return None if self.carry_init is None else self.carry_init(h, self.params)

    def apply(self, layer: Array, block_input: Array, h: Array, mask: Array, carry=None):
        """Block `layer`'s output `h [B, T, D]` (input `block_input`), edited where `mask`
        (bool `[B, T]`) and `layer` is one of `layers`; returns `(h, carry)`, the carry
        updated where the edit applies (None stays None)."""
        args = (layer, h, self.params) + ((block_input,) if self.reads_block_input else ())
        if self.carry_init is None:
            edited, new_carry = self.fn(*args), None
        else:
            edited, new_carry = self.fn(*args, carry)
        if edited.shape != h.shape:
            raise ArgumentError(f"Intervention fn returned shape {edited.shape} for h of shape {h.shape}")
        on = jnp.isin(layer, jnp.asarray(self.layers, jnp.int32)) & mask
        if self.carry_init is not None:
            new_carry = self._keep_where_off(on, new_carry, carry)
        return jnp.where(on[..., None], edited.astype(h.dtype), h), new_carry

    @staticmethod
    def _keep_where_off(on: Array, new_carry, carry):
        if jax.tree.structure(new_carry) != jax.tree.structure(carry):
            raise ArgumentError(
                f"Intervention fn returned a carry of structure {jax.tree.structure(new_carry)}, "
                f"expected {jax.tree.structure(carry)} (that of carry_init)"
            )
        return jax.tree.map(
            lambda new, old: jnp.where(on.reshape(on.shape + (1,) * (old.ndim - 2)), new.astype(old.dtype), old),
            new_carry,
            carry,
        )


def forward_mask(intervention: Intervention, positions: Array, intervene_from: Array | None) -> Array:
    """bool `[B, T]`: where a full forward over positions `[B, T]` applies the edit."""
    if intervention.positions == "all":
        return jnp.ones(positions.shape, bool)
    if intervene_from is None:
        intervene_from = jnp.full(positions.shape[:1], positions.shape[1] - 1, jnp.int32)
    return positions >= jnp.asarray(intervene_from, jnp.int32)[:, None]


def prefill_mask(intervention: Intervention, positions: Array, lengths: Array) -> Array:
    """bool `[B, T]`: where prefill applies the edit (`"last"`: each row's last real token)."""
    if intervention.positions == "all":
        return jnp.ones(positions.shape, bool)
    return positions == (lengths - 1)[:, None]
