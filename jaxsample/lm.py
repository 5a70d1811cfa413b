"""`LanguageModel`: the one interface every sampler uses.

A `LanguageModel` is a pytree. Its only array leaves are `params`; everything else (pure
functions, vocabulary size, stop tokens, tokenizer) is static metadata. It can therefore be
passed straight through `jax.jit` / `vmap`: parameters are traced arguments, never
closed-over constants, and two calls with the same model hit the same compiled program.

Cache contract (shared by the Flax ports and `from_logits_fn`): a cache is a pytree whose
leaves all have the batch as their leading axis, and which has an int32 field
`length: [B]`, the number of filled positions per row. Positions are slot indices (prompts
are right-padded), so rewinding a row is `cache._replace(length=shorter)`: stale slots are
masked, never read. Resampling particles gathers every leaf (`jaxsample.rows.gather_rows`).

- `prefill(tokens [B, T], lengths [B], cache)` writes slots `0..T-1` of every row, sets
  `length = lengths` and returns the logits of the token after each row's last real one,
  `[B, V]` float32 (NaN for a row whose length is outside `[1, T]`).
- `decode(tokens [B], cache, prefix=None)` writes each row's token at slot `length`,
  increments it and returns the next-token logits `[B, V]` float32 (NaN for a row already
  at capacity, whose write is dropped). `prefix` is a cache from `prefill` of G rows
  (G divides B) shared by groups of B / G consecutive rows (one copy of a prompt for all MH
  chains or SMC particles; G prompts for G groups of chains): prefix row g's `length[g]`
  slots precede each of its rows' own, so their slot s is position `prefix.length[g] + s`.
  Row operations (resampling, accept/reject) never touch it; the decode loop keeps it in
  `DecodeState.prompt_cache`, wrapped in `Shared`.

Model internals (one forward, behind static switches; nothing changes for callers that do
not ask, so samplers without them compile to the same programs):

- Features: `lm.features(tokens)` is the final-norm hidden state at every position `[.., T, D]`
  float32 (D = `lm.feature_size`; for `from_logits_fn` models the logits themselves unless a
  `features_fn` is given); `lm.logits_and_features(tokens)` returns both from one forward.
  `prefill` / `decode` return `(logits, features [B, D], cache)` with `with_features=True`,
  which the decode loop records (`init_decode(..., record_features=True)`).
- Per-layer access (Flax ports): `lm.hidden_states(tokens) -> [L+1, B, T, D]`, and for
  Jacobians `lm.embed(tokens)`, `lm.apply_layer(i, h, positions)`, `lm.final_logits(h)`;
  `lm.num_layers`, `lm.hidden_size`. `logits == final_logits(apply_layer(L-1, ...
  apply_layer(0, embed(tokens))))` up to float rounding.
- `adapters` (`jaxsample.models.lora.LoraAdapters`) and `intervention`
  (`jaxsample.Intervention`) are traced pytree fields: `lm.with_adapters(a)`,
  `lm.with_intervention(iv)` return a model that every sampler, `score` and forward runs
  with them; `lm.replace(adapters=None)` drops them. Gradients flow through `params`,
  `adapters` and the intervention's params (`jax.grad` of a function of `lm`).
  `apply_layer` applies the adapters but never the intervention (it is the raw block).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_int_array, is_int

Array = jax.Array


def token_ids(name: str, tokens: Any, vocab_size: int) -> Array:
    """`tokens` as int32, after `check_int_array` has checked that they are ids in `[0, V)`.

    An id outside the vocabulary would read the wrong embedding row (negative ids wrap) or a
    NaN one (ids ≥ V); traced values (inside every sampler's decode loop) get the dtype check
    only.
    """
    check_int_array(name, tokens, 0, vocab_size, "the vocabulary")
    return jnp.asarray(tokens, jnp.int32)


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
      params: parameter pytree (traced); `None` for wrapped logits functions.
      forward_fn: `(params, tokens [B, T], *, intervene_from=None, select=None,
        output="logits", **hooks)`, the full causal forward (see `forward`).
      init_cache_fn: `(batch_size, capacity) -> cache` (see module docstring).
      prefill_fn: `(params, tokens [B, T], lengths [B], cache, *, with_features=False,
        **hooks) -> (logits [B, V], [features [B, D],] cache)`.
      decode_fn: `(params, tokens [B], cache, *, with_features=False, prefix=None, **hooks)
        -> (logits [B, V], [features [B, D],] cache)`; `prefix` is passed only when set.
      vocab_size: V, the width of the logits.
      max_length: positions the model supports (prompt + generation).
      eos_token_ids: the stop set: the union of the config's and generation config's ids.
      pad_token_id: written after a sequence's stop token.
      feature_size: D, the width of `features` (static).
      adapters: LoRA adapters (traced) or None; passed to the fns as `hooks` when set.
      intervention: a `jaxsample.Intervention` (traced params) or None; likewise.
      layer_fns: the per-layer functions (`jaxsample.models.decoder.LayerFunctions`) of a
        decoder with layers, or None (then adapters, interventions and per-layer access
        raise `ArgumentError`).
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
    feature_size: int = struct.field(pytree_node=False)
    adapters: Any = None
    intervention: Any = None
    layer_fns: Any = struct.field(pytree_node=False, default=None)
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    config: Any = struct.field(pytree_node=False, default=None)
    name: str = struct.field(pytree_node=False, default="model")

    def _hooks(self) -> dict:
        """The adapters / intervention to pass to the fns (only those that are set)."""
        hooks = {k: v for k, v in (("adapters", self.adapters), ("intervention", self.intervention)) if v is not None}
        if hooks and self.layer_fns is None:
            raise ArgumentError(
                f"model {self.name!r} has no decoder layers (a wrapped logits function): "
                f"{' and '.join(hooks)} need a Flax decoder port"
            )
        return hooks

    def _layers(self, what: str):
        if self.layer_fns is None:
            raise ArgumentError(
                f"{what} needs a decoder with layers; model {self.name!r} is a wrapped logits function"
            )
        return self.layer_fns

    def forward(
        self,
        tokens: Array,
        *,
        output: str = "logits",
        select: Array | None = None,
        intervene_from: Array | None = None,
    ):
        """The one full causal forward; `logits`, `features`, `logits_and_features` and
        `hidden_states` are shorthands for it.

        Args:
          tokens: int32 `[T]` or `[B, T]`.
          output: `"logits"` (float32 `[.., T, V]`), `"features"` (float32 `[.., T, D]`),
            `"logits_and_features"` (both) or `"hidden_states"` (float32 `[L+1, .., T, D]`,
            Flax ports only).
          select: int32 `[M]` / `[B, M]` positions to return instead of all T (not with
            `"hidden_states"`): only they go through the final norm and head.
          intervene_from: int32 `[]` / `[B]`, the first position a `positions="last"`
            intervention edits (default T − 1); see `jaxsample.models.intervention`.

        Raises:
          ArgumentError: tokens that are not integer ids in `[0, V)` (traced values pass
            unchecked), or a bad shape.
        """
        tokens = token_ids("tokens", tokens, self.vocab_size)
        if tokens.ndim not in (1, 2):
            raise ArgumentError(f"tokens must have shape [T] or [B, T], got {tokens.shape}")
        if output == "hidden_states":
            self._layers("hidden_states")
            if select is not None:
                raise ArgumentError("select is not supported with output='hidden_states'")
        single = tokens.ndim == 1
        if single:
            tokens = tokens[None]
            select = None if select is None else jnp.asarray(select, jnp.int32)[None]
            intervene_from = None if intervene_from is None else jnp.reshape(jnp.asarray(intervene_from, jnp.int32), (1,))
        if intervene_from is not None:
            intervene_from = jnp.broadcast_to(jnp.asarray(intervene_from, jnp.int32), tokens.shape[:1])
        out = self.forward_fn(
            self.params, tokens, intervene_from=intervene_from, select=select, output=output, **self._hooks()
        )
        if not single:
            return out
        if output == "hidden_states":
            return out[:, 0]
        return jax.tree.map(lambda x: x[0], out)

    def logits(self, tokens: Array) -> Array:
        """Full causal forward. `tokens` int32 `[T]` or `[B, T]` → float32 `[T, V]` / `[B, T, V]`."""
        return self.forward(tokens)

    def features(self, tokens: Array) -> Array:
        """Final-norm hidden states: int32 `[T]` / `[B, T]` → float32 `[.., T, D]`."""
        return self.forward(tokens, output="features")

    def logits_and_features(self, tokens: Array) -> tuple[Array, Array]:
        """`(logits [.., T, V], features [.., T, D])` from one forward."""
        return self.forward(tokens, output="logits_and_features")

    def hidden_states(self, tokens: Array) -> Array:
        """The residual stream: int32 `[B, T]` → float32 `[L+1, B, T, D]` (`[L+1, T, D]` for
        `[T]`): the embedding output, then each block's output (with the intervention's edit,
        `"last"` meaning the final position)."""
        return self.forward(tokens, output="hidden_states")

    @property
    def num_layers(self) -> int:
        """L, the decoder blocks (Flax ports)."""
        return self._layers("num_layers").num_layers

    @property
    def hidden_size(self) -> int:
        """D, the residual-stream width (Flax ports)."""
        return self._layers("hidden_size").hidden_size

    def embed(self, tokens: Array) -> Array:
        """Token embeddings, the residual stream entering block 0: `[B, T]` → `[B, T, D]`
        in the params' dtype."""
        return self._layers("embed").embed(self.params, token_ids("tokens", tokens, self.vocab_size))

    def apply_layer(self, i: int | Array, h: Array, positions: Array | None = None) -> Array:
        """Block `i` (may be traced) with causal attention among the T positions, adapters
        applied, no intervention: `h [B, T, D]` → `[B, T, D]`. `positions`: int32 `[T]` or
        `[B, T]` RoPE positions, default `0..T-1`."""
        layers = self._layers("apply_layer")
        if positions is None:
            positions = jnp.arange(h.shape[-2], dtype=jnp.int32)
        return layers.apply_layer(self.params, self.adapters, i, h, positions)

    def apply_layer_at_last(self, i: int | Array, context: Array, last: Array, positions: Array | None = None) -> Array:
        """Block `i`'s output at the last position only (equal to `apply_layer` on the
        concatenation, at the last position): context `[B, T-1, D]`, last `[B, D]` → `[B, D]`.
        The earlier positions enter through their keys and values alone, so differentiating
        in `last` costs one position's work."""
        layers = self._layers("apply_layer_at_last")
        if positions is None:
            positions = jnp.arange(context.shape[-2] + 1, dtype=jnp.int32)
        return layers.apply_layer_at_last(self.params, self.adapters, i, context, last, positions)

    def final_logits(self, h: Array) -> Array:
        """Final norm and LM head on the last block's output: `[..., D]` → float32 `[..., V]`."""
        return self._layers("final_logits").final_logits(self.params, h)

    def with_adapters(self, adapters) -> "LanguageModel":
        """This model with LoRA `adapters` applied unmerged everywhere (None removes them).

        Raises:
          ArgumentError: adapters built for another config, or a model without layers.
        """
        if adapters is not None:
            self._layers("LoRA adapters").check_adapters(adapters)
        return self.replace(adapters=adapters)

    def with_intervention(self, intervention) -> "LanguageModel":
        """This model with a residual-stream `jaxsample.Intervention` in every forward,
        prefill and decode step (None removes it).

        Raises:
          ArgumentError: layers outside `[0, L)`, bad positions, or a model without layers.
        """
        if intervention is not None:
            intervention.check(self._layers("an intervention").num_layers)
        return self.replace(intervention=intervention)

    def init_cache(self, batch_size: int, capacity: int):
        """An empty cache of `batch_size` rows holding up to `capacity` positions."""
        if capacity > self.max_length:
            raise ArgumentError(
                f"cache capacity {capacity} exceeds the {self.max_length} positions of model "
                f"{self.name!r}"
            )
        return self.init_cache_fn(batch_size, capacity)

    def prefill(self, tokens: Array, lengths: Array, cache, *, with_features: bool = False):
        """Writes right-padded prompts `[B, T]` (real lengths `[B]`) into `cache`; returns
        `(logits [B, V], cache)`, or `(logits, features [B, D], cache)` with `with_features`
        (at each row's last real token). Every token, padding included, must be an id in
        `[0, V)` (checked when concrete; `pad_token_id` is one)."""
        tokens = token_ids("prompt tokens", tokens, self.vocab_size)
        return self.prefill_fn(self.params, tokens, lengths, cache, with_features=with_features, **self._hooks())

    def decode(self, tokens: Array, cache, *, with_features: bool = False, prefix=None):
        """Appends one token per row `[B]`; returns `(next-token logits [B, V], cache)`, or
        `(logits, features [B, D], cache)` with `with_features` (at the fed token).
        `prefix`: a prefilled cache of G rows, each continued by B / G consecutive rows
        (module docstring). Tokens
        must be ids in `[0, V)` (checked when concrete)."""
        tokens = token_ids("decode tokens", tokens, self.vocab_size)
        if prefix is not None and tokens.shape[0] % prefix.length.shape[0]:
            raise ArgumentError(
                f"a shared prefix's rows must divide the {tokens.shape[0]} decoded rows (each "
                f"continues one prefix row), got {prefix.length.shape[0]} prefix rows")
        shared = {} if prefix is None else {"prefix": prefix}
        return self.decode_fn(self.params, tokens, cache, with_features=with_features, **shared, **self._hooks())

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
        features_fn: Callable[[Array], Array] | None = None,
    ) -> "LanguageModel":
        """Wraps any pure `logits_fn(tokens [T]) -> logits [T, V]` (a full causal forward).

        The wrapper supplies a recompute-based cache: every decode step re-runs `logits_fn`
        on the row's whole token buffer (capacity-length, stale slots after `length`; with a
        shared prefix, the prefix's capacity plus the row's), which
        is exact for a causal function and cheap for the toy models this is meant for.
        `logits_fn` must be causal: the logits at position t may depend only on tokens ≤ t.
        Its features are the logits themselves, or `features_fn(tokens [T]) -> [T, D]`
        (causal too) when given. Such a model has no layers: adapters, interventions,
        `hidden_states` and the per-layer functions raise `ArgumentError`.
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
        batched_features = (
            batched if features_fn is None else jax.vmap(lambda tokens: features_fn(tokens).astype(jnp.float32))
        )
        if features_fn is None:
            feature_size = vocab_size
        else:
            shape = jax.eval_shape(features_fn, jax.ShapeDtypeStruct((max_length,), jnp.int32)).shape
            if len(shape) != 2 or shape[0] != max_length:
                raise ArgumentError(f"features_fn must map tokens [T] to features [T, D], got shape {shape}")
            feature_size = shape[1]

        def pick(values, select):
            if select is None:
                return values
            return jnp.take_along_axis(values, select[:, :, None], axis=1)

        def forward_fn(params, tokens, intervene_from=None, select=None, output="logits"):
            del params, intervene_from  # no layers, hence no interventions
            if output not in ("logits", "features", "logits_and_features"):
                raise ArgumentError(f"output {output!r} needs a decoder with layers; model {name!r} has none")
            logits = None if output == "features" else pick(batched(tokens), select)
            if output == "logits":
                return logits
            features = logits if features_fn is None and logits is not None else pick(batched_features(tokens), select)
            return features if output == "features" else (logits, features)

        def init_cache_fn(batch_size, capacity):
            return TokenCache(
                tokens=jnp.zeros((batch_size, capacity), jnp.int32),
                length=jnp.zeros((batch_size,), jnp.int32),
            )

        def at_last(values, length, valid):
            # A row without a last token (prefill length 0, or a decode past capacity) gets
            # NaN, as from the Flax ports, rather than a wrapped or clamped read.
            last = jnp.take_along_axis(values, jnp.maximum(length - 1, 0)[:, None, None], axis=1)[:, 0]
            return jnp.where(valid[:, None], last, jnp.nan)

        def outputs(cache, valid, with_features, prefix=None):
            tokens, length = cache.tokens, cache.length
            if prefix is not None:
                # The rows' slots follow their prefix: one buffer per row, prefix first.
                # P + S wide, so that a row placed after a full prefix (length P) fits whole:
                # a narrower buffer would make dynamic_update_slice shift the row left, over
                # the prefix's last token.
                rows_per_prefix = tokens.shape[0] // prefix.tokens.shape[0]
                width = prefix.tokens.shape[1] + cache.tokens.shape[1]
                bases = jnp.zeros((prefix.tokens.shape[0], width), jnp.int32).at[:, : prefix.tokens.shape[1]].set(
                    prefix.tokens)
                place = lambda base, row, at: jax.lax.dynamic_update_slice(base, row, (at,))
                offsets = jnp.repeat(prefix.length, rows_per_prefix)
                tokens = jax.vmap(place)(jnp.repeat(bases, rows_per_prefix, axis=0), cache.tokens, offsets)
                length = offsets + cache.length
            logits = at_last(batched(tokens), length, valid)
            if not with_features:
                return logits, cache
            features = logits if features_fn is None else at_last(batched_features(tokens), length, valid)
            return logits, features, cache

        def prefill_fn(params, tokens, lengths, cache, with_features=False):
            del params
            lengths = jnp.asarray(lengths, jnp.int32)
            if lengths.shape != tokens.shape[:1]:
                raise ArgumentError(
                    f"lengths must have shape [B] = {tokens.shape[:1]} for prompt tokens of shape "
                    f"{tokens.shape}, got {lengths.shape}"
                )
            buffer = jax.lax.dynamic_update_slice(cache.tokens, tokens, (0, 0))
            valid = (lengths >= 1) & (lengths <= tokens.shape[1])
            return outputs(TokenCache(tokens=buffer, length=lengths), valid, with_features)

        def decode_fn(params, tokens, cache, with_features=False, prefix=None):
            del params
            rows = jnp.arange(cache.tokens.shape[0])
            buffer = cache.tokens.at[rows, cache.length].set(tokens, mode="drop")
            valid = cache.length < cache.tokens.shape[1]
            return outputs(TokenCache(tokens=buffer, length=cache.length + 1), valid, with_features, prefix)

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
            feature_size=feature_size,
            tokenizer=tokenizer,
            name=name,
        )
