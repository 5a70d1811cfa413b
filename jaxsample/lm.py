"""`LanguageModel`: the one interface every sampler uses.

A `LanguageModel` is a pytree. Its only array leaves are `params`; everything else (pure
functions, vocabulary size, stop tokens, tokenizer) is static metadata. It can therefore be
passed straight through `jax.jit` / `vmap`: parameters are traced arguments, never
closed-over constants, and two calls with the same model hit the same compiled program.

Cache contract (shared by the Flax ports and `from_logits_fn`): a cache is a pytree whose
leaves all have the batch as their leading axis, and which has an int32 field
`length: [B]`, the number of filled positions per row. Positions are slot indices (prompts
are right-padded), so rewinding a row is `cache._replace(length=shorter)`: stale slots are
masked, never read. Resampling particles is `jax.tree.map(lambda x: x[idx], cache)`.

- `prefill(tokens [B, T], lengths [B], cache)` writes slots `0..T-1` of every row, sets
  `length = lengths` and returns the logits of the token after each row's last real one,
  `[B, V]` float32.
- `decode(tokens [B], cache)` writes each row's token at slot `length`, increments it and
  returns the next-token logits `[B, V]` float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, is_int

Array = jax.Array


class TokenCache(NamedTuple):
    """Recompute-based cache for models given only as a full causal forward.

    Attributes:
      tokens: int32 `[B, S]` token buffer (S = capacity); slots past `length` are stale.
      length: int32 `[B]` filled slots per row.
    """

    tokens: Array
    length: Array


@struct.dataclass
class LanguageModel:
    """A causal language model as pure functions over an explicit params pytree.

    Attributes:
      params: parameter pytree (the only traced leaves); `None` for wrapped logits functions.
      forward_fn: `(params, tokens [B, T]) -> logits [B, T, V]` float32, full causal forward.
      init_cache_fn: `(batch_size, capacity) -> cache` (see module docstring).
      prefill_fn: `(params, tokens [B, T], lengths [B], cache) -> (logits [B, V], cache)`.
      decode_fn: `(params, tokens [B], cache) -> (logits [B, V], cache)`.
      vocab_size: V, the width of the logits.
      max_length: positions the model supports (prompt + generation).
      eos_token_ids: the stop set: the union of the config's and generation config's ids.
      pad_token_id: written after a sequence's stop token.
      tokenizer: a `jaxsample.models.Tokenizer`, or `None`.
      config: the model's `ModelConfig` (Flax ports) or `None`.
      name: a human-readable name for logs and results.
    """

    params: Any
    forward_fn: Callable = struct.field(pytree_node=False)
    init_cache_fn: Callable = struct.field(pytree_node=False)
    prefill_fn: Callable = struct.field(pytree_node=False)
    decode_fn: Callable = struct.field(pytree_node=False)
    vocab_size: int = struct.field(pytree_node=False)
    max_length: int = struct.field(pytree_node=False)
    eos_token_ids: tuple[int, ...] = struct.field(pytree_node=False)
    pad_token_id: int = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    config: Any = struct.field(pytree_node=False, default=None)
    name: str = struct.field(pytree_node=False, default="model")

    def logits(self, tokens: Array) -> Array:
        """Full causal forward. `tokens` int32 `[T]` or `[B, T]` → float32 `[T, V]` / `[B, T, V]`."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim == 1:
            return self.forward_fn(self.params, tokens[None])[0]
        if tokens.ndim != 2:
            raise ArgumentError(f"tokens must have shape [T] or [B, T], got {tokens.shape}")
        return self.forward_fn(self.params, tokens)

    def init_cache(self, batch_size: int, capacity: int):
        """An empty cache of `batch_size` rows holding up to `capacity` positions."""
        if capacity > self.max_length:
            raise ArgumentError(
                f"cache capacity {capacity} exceeds the {self.max_length} positions of model "
                f"{self.name!r}"
            )
        return self.init_cache_fn(batch_size, capacity)

    def prefill(self, tokens: Array, lengths: Array, cache) -> tuple[Array, Any]:
        """Writes right-padded prompts `[B, T]` (real lengths `[B]`) into `cache`."""
        return self.prefill_fn(self.params, tokens, lengths, cache)

    def decode(self, tokens: Array, cache) -> tuple[Array, Any]:
        """Appends one token per row `[B]`; returns next-token logits `[B, V]`."""
        return self.decode_fn(self.params, tokens, cache)

    def is_stop(self, tokens: Array) -> Array:
        """Boolean mask of stop tokens, same shape as `tokens`."""
        return jnp.isin(tokens, jnp.asarray(self.eos_token_ids, jnp.int32))

    @classmethod
    def from_logits_fn(
        cls,
        logits_fn: Callable[[Array], Array],
        vocab_size: int,
        eos_token_id: int | tuple[int, ...],
        max_length: int,
        pad_token_id: int | None = None,
        tokenizer: Any = None,
        name: str = "logits_fn",
    ) -> "LanguageModel":
        """Wraps any pure `logits_fn(tokens [T]) -> logits [T, V]` (a full causal forward).

        The wrapper supplies a recompute-based cache: every decode step re-runs `logits_fn`
        on the row's whole token buffer (capacity-length, stale slots after `length`), which
        is exact for a causal function and cheap for the toy models this is meant for.
        `logits_fn` must be causal: the logits at position t may depend only on tokens ≤ t.
        """
        vocab_size = check_int("vocab_size", vocab_size, 1)
        max_length = check_int("max_length", max_length, 2)
        eos = (eos_token_id,) if is_int(eos_token_id) else tuple(eos_token_id)
        if not eos:
            raise ArgumentError("eos_token_id must name at least one stop token, got ()")
        eos = tuple(check_int("eos_token_id", t, 0, vocab_size - 1) for t in eos)
        if pad_token_id is not None:
            pad_token_id = check_int("pad_token_id", pad_token_id, 0, vocab_size - 1)

        batched = jax.vmap(lambda tokens: logits_fn(tokens).astype(jnp.float32))

        def forward_fn(params, tokens):
            del params
            return batched(tokens)

        def init_cache_fn(batch_size, capacity):
            return TokenCache(
                tokens=jnp.zeros((batch_size, capacity), jnp.int32),
                length=jnp.zeros((batch_size,), jnp.int32),
            )

        def next_logits(cache):
            logits = batched(cache.tokens)
            return jnp.take_along_axis(logits, (cache.length - 1)[:, None, None], axis=1)[:, 0]

        def prefill_fn(params, tokens, lengths, cache):
            del params
            buffer = jax.lax.dynamic_update_slice(cache.tokens, tokens.astype(jnp.int32), (0, 0))
            cache = TokenCache(tokens=buffer, length=jnp.asarray(lengths, jnp.int32))
            return next_logits(cache), cache

        def decode_fn(params, tokens, cache):
            del params
            rows = jnp.arange(cache.tokens.shape[0])
            buffer = cache.tokens.at[rows, cache.length].set(tokens, mode="drop")
            cache = TokenCache(tokens=buffer, length=cache.length + 1)
            return next_logits(cache), cache

        return cls(
            params=None,
            forward_fn=forward_fn,
            init_cache_fn=init_cache_fn,
            prefill_fn=prefill_fn,
            decode_fn=decode_fn,
            vocab_size=vocab_size,
            max_length=max_length,
            eos_token_ids=eos,
            pad_token_id=eos[0] if pad_token_id is None else pad_token_id,
            tokenizer=tokenizer,
            name=name,
        )
