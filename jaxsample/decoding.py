"""The batched decode loop shared by every sampler.

A `DecodeState` holds B rows (samples, MH chains or SMC particles) of one generation in
progress: generated tokens with their per-token log p, log q and entropy, the model cache
and the logits for each row's next position. `extend` grows rows inside one
`lax.while_loop`; `rewind` cuts rows back (an MH cut); `take_rows` gathers rows (SMC
resampling); `select_rows` picks per row between two states (MH accept/reject).

Rows that continue one `[T]` prompt share its KV cache (`prompt_cache`): it is prefilled
once, and every row's own cache holds only the prompt's last token and the generated part,
so the memory of B rows is one prompt plus B generations, and resampling or accept/reject
moves only the generated part. P prompts `[P, T]` continued by several rows each (a batch
of problems with C chains each) are prefilled once per prompt in the same way.

Generation-relative indexing everywhere: position j is the j-th generated token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.lm import LanguageModel
from jaxsample.rows import Shared, gather_rows, select_rows
from jaxsample.sampling import Proposal, draw_tokens
from jaxsample.validation import check_int, check_int_array, check_key, check_keys

Array = jax.Array


class DecodeState(NamedTuple):
    """Rows of a generation in progress (B rows, N = max_new_tokens slots).

    Attributes:
      tokens: int32 `[B, N]` generated tokens; `pad_token_id` at positions ≥ length.
      log_p: float32 `[B, N]` log p(x_j | x_<j), untempered, full vocabulary; 0 after length.
      log_q: float32 `[B, N]` log-prob under the distribution actually sampled; 0 after length.
      entropy: float32 `[B, N]` entropy of p(· | x_<j); 0 after length.
      length: int32 `[B]` generated tokens, a final stop token included.
      done: bool `[B]` the row ended with a stop token.
      prompt_length: int32 `[B]` real prompt tokens of the row.
      last_prompt_token: int32 `[B]` the prompt's last real token (fed again on a rewind to 0).
      cache: the rows' own model cache. With a `prompt_cache` it holds the prompt's last
        token (slot 0) and the generated tokens fed so far; without one (a prompt per row),
        the whole prompt_length + length positions.
      next_logits: float32 `[B, V]` logits of generated position `length`.
      features: float32 `[B, N, D]` final-norm hidden state at each generated token's
        position (written when the token is fed; 0 after length), or None when the state
        was built without `record_features`.
      next_features: float32 `[B, D]` hidden state of the last fed token (the one whose
        logits are `next_logits`; the prompt's last token at first), or None likewise.
      log_twist: float32 `[B, N]` log ψ(x_<j, x_j) of each generated token under the
        proposal's twist, recorded when it was sampled (0 after length); `None` unless
        `init_decode(..., record_twist=True)`.
      prompt_cache: `Shared` cache of the prompt(s) without the last token: one row,
        continued by every row, or P rows, each continued by B / P consecutive rows (see
        `jaxsample.lm`); None when each row holds its own prompt.
    """

    tokens: Array
    log_p: Array
    log_q: Array
    entropy: Array
    length: Array
    done: Array
    prompt_length: Array
    last_prompt_token: Array
    cache: Any
    next_logits: Array
    features: Array | None = None
    next_features: Array | None = None
    log_twist: Array | None = None
    prompt_cache: Shared | None = None


def check_prompt(
    lm: LanguageModel, prompt_tokens: Any, max_new_tokens: Any, shapes: tuple[int, ...] = (1,),
    name: str = "prompt_tokens",
) -> tuple[Array, int]:
    """Validates a prompt and the generation length; returns `(prompt int32, max_new_tokens)`.

    The one prompt check of every sampler entry point. Raises `ArgumentError` unless
    `max_new_tokens` is a positive integer (numpy integers included), the prompt has
    `ndim` in `shapes` (1: `[T]`, 2: `[B, T]`), an integer dtype (floats and bools are not
    token ids), at least one token, fits with the generation in the model's positions and,
    when its values are concrete, holds only ids in `[0, vocab_size)`. The range is checked
    on the values as given, before the cast to int32, so an int64 id ≥ 2³¹ cannot wrap into
    range.
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    expected = " or ".join({1: "[T]", 2: "[P, T]"}[n] for n in shapes)
    try:
        shape = np.shape(prompt_tokens)
    except ValueError:  # a ragged nest of lists
        raise ArgumentError(f"{name} must have shape {expected}, got a {type(prompt_tokens).__name__} "
                            "of rows of different lengths (pad them: decoding.pad_prompts)") from None
    if len(shape) not in shapes:
        raise ArgumentError(f"{name} must have shape {expected}, got {shape}")
    check_int_array(name, prompt_tokens, 0, lm.vocab_size, f"the vocabulary of model {lm.name!r}")
    if shape[-1] < 1:
        raise ArgumentError(f"{name} must hold at least one token (e.g. BOS), got an empty prompt")
    if shape[-1] + max_new_tokens > lm.max_length:
        raise ArgumentError(
            f"prompt of {shape[-1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"{lm.max_length} positions of model {lm.name!r}"
        )
    return jnp.asarray(prompt_tokens, jnp.int32), max_new_tokens


def first_non_finite(log_p: Array, lengths: Array) -> Array:
    """int32 `[B]`: each row's first generated position whose log p is not finite, −1 if none.

    Works traced (inside samplers' jitted loops) and on concrete arrays.

    Args:
      log_p: float `[B, N]` per-token log p.
      lengths: int `[B]` generated tokens per row; positions from `lengths` on are padding.
    """
    position = jnp.arange(log_p.shape[-1])
    bad = (position[None, :] < jnp.asarray(lengths)[:, None]) & ~jnp.isfinite(log_p)
    return jnp.where(jnp.any(bad, axis=-1), jnp.argmax(bad, axis=-1), -1).astype(jnp.int32)


def raise_on_non_finite(lm: LanguageModel, first_bad: Array, rows: str = "row", steps: tuple[str, ...] = ()) -> None:
    """The one NaN report of every sampler entry point: raises `NumericalError` naming the
    first row (and step) whose `first_non_finite` position is ≥ 0.

    A NaN log p comes from NaN logits; -inf from a sampled token the model gives probability
    0, which a proposal derived from the same logits cannot draw unless they are broken.

    Args:
      lm: the model (named in the message).
      first_bad: int `[..., B]` from `first_non_finite`; leading axes are named by `steps`.
      rows: what a row is ("sample", "chain", "particle", ...).
      steps: names of the leading axes (e.g. `("block", "MH step")`).
    """
    first_bad = np.asarray(first_bad)
    hits = np.argwhere(first_bad >= 0)
    if hits.size:
        index = tuple(int(i) for i in hits[0])
        where = "".join(f", {name} {i}" for name, i in zip(steps, index[:-1]))
        raise NumericalError(
            f"model {lm.name!r} produced a non-finite log-probability (NaN logits, or a sampled "
            f"token of probability 0) at {rows} {index[-1]}, generated position "
            f"{int(first_bad[index])}{where}"
        )


def check_finite_log_p(lm: LanguageModel, log_p: Array, lengths: Array, rows: str = "row") -> None:
    """Raises `NumericalError` if a generated position of a concrete result has a non-finite
    log p (`first_non_finite` + `raise_on_non_finite`)."""
    raise_on_non_finite(lm, first_non_finite(jnp.asarray(log_p), jnp.asarray(lengths)), rows)


def pad_prompt(lm: LanguageModel, prompt: Array, max_new_tokens: int) -> tuple[Array, Array]:
    """Right-pads a `[T]` prompt to a length bucket, so nearby lengths share one compilation.

    Buckets are powers of two (at least 16), capped so that the bucket plus `max_new_tokens`
    fits the model. Pass both results on: `init_decode(lm, tokens, ..., prompt_lengths=length)`.

    Returns:
      `(tokens int32 [T_bucket], length int32 [])`; padding holds the pad id and is never read.
    """
    length = prompt.shape[0]
    padded = jnp.pad(jnp.asarray(prompt, jnp.int32), (0, _bucket(lm, length, max_new_tokens) - length),
                     constant_values=lm.pad_token_id)
    return padded, jnp.asarray(length, jnp.int32)


def pad_prompts(lm: LanguageModel, prompt_tokens: Any, max_new_tokens: int) -> tuple[Array, Array]:
    """Checks and right-pads one prompt `[T]`, or a batch of P prompts (a sequence of `[T_p]`
    token arrays or lists, or a `[P, T]` array), to `pad_prompt`'s bucket of the longest.

    Returns:
      `(tokens int32 [T_bucket], length int32 [])` for one prompt, `(tokens int32
      [P, T_bucket], lengths int32 [P])` for a batch.
    """
    listed = isinstance(prompt_tokens, (list, tuple)) and len(prompt_tokens) and np.ndim(prompt_tokens[0]) > 0
    if not listed and np.ndim(prompt_tokens) != 2:
        return pad_prompt(lm, check_prompt(lm, prompt_tokens, max_new_tokens)[0], max_new_tokens)
    prompts = [check_prompt(lm, prompt, max_new_tokens, name=f"prompt_tokens[{p}]")[0]
               for p, prompt in enumerate(prompt_tokens)]
    if not prompts:
        raise ArgumentError("prompt_tokens: the batch of prompts is empty")
    lengths = [prompt.shape[0] for prompt in prompts]
    width = _bucket(lm, max(lengths), max_new_tokens)
    padded = jnp.stack([jnp.pad(prompt, (0, width - prompt.shape[0]), constant_values=lm.pad_token_id)
                        for prompt in prompts])
    return padded, jnp.asarray(lengths, jnp.int32)


class Prompts(NamedTuple):
    """Checked prompts of a sampler call (`prompts_and_keys`).

    Attributes:
      tokens: int32 `[T_bucket]` one padded prompt, or `[P, T_bucket]` (`pad_prompts`).
      lengths: int32 `[]`, or `[P]`.
      keys: PRNG keys `[P]` each prompt's rows draw from (`prompt_row_keys`).
      max_new_tokens: the checked generation length.
    """

    tokens: Array
    lengths: Array
    keys: Array
    max_new_tokens: int

    @property
    def batched(self) -> bool:
        return self.tokens.ndim == 2

    @property
    def num_prompts(self) -> int:
        return self.keys.shape[0]


def prompts_and_keys(lm: LanguageModel, key: Any, prompt_tokens: Any, max_new_tokens: Any) -> Prompts:
    """The one prompt, key and length check of samplers that take one prompt or a batch of
    them: one key for one prompt `[T]` (P = 1), P keys (`jax.random.split(key, P)`) for a
    batch of P prompts."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    tokens, lengths = pad_prompts(lm, prompt_tokens, max_new_tokens)
    return Prompts(tokens, lengths, prompt_keys(key, tokens), max_new_tokens)


def check_per_prompt(prompts: Prompts, **settings: Any) -> None:
    """Raises unless each float setting is one number, or, for a batch of P prompts, one per
    prompt (shape `[P]`; their rows take it: `jaxsample.rows.expand_groups`)."""
    for name, value in settings.items():
        shape = jnp.shape(value)
        if shape == () or (prompts.batched and shape == (prompts.num_prompts,)):
            continue
        per_prompt = f", or one per prompt (shape [{prompts.num_prompts}])" if prompts.batched else ""
        raise ArgumentError(f"{name} must be one number{per_prompt}, got shape {shape}")


def prompt_keys(key: Any, prompt_tokens: Array) -> Array:
    """Checked keys `[P]`: one key for one prompt `[T]`, P keys for prompts `[P, T]`."""
    if np.ndim(prompt_tokens) == 1:
        return jnp.expand_dims(check_key("key", key), 0)
    return check_keys("key", key, prompt_tokens.shape[0])


def is_key_batch(key: Array) -> bool:
    """Whether `key` is a batch of PRNG keys (typed `[B]` or raw `[B, 2]`) rather than one."""
    return key.ndim == (1 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def as_key_batch(key: Array) -> Array:
    """PRNG keys `[P]`: a batch of keys as it is, one key as a batch of one."""
    return key if is_key_batch(key) else jnp.expand_dims(key, 0)


def split_keys(keys: Array, num: int) -> Array:
    """PRNG keys `[num, P]`: each of P keys split `num` ways, as `jax.random.split` splits one
    (row i holds every key's i-th part)."""
    return jax.vmap(lambda key: jax.random.split(key, num), out_axes=1)(keys)


def prompt_row_keys(keys: Array, rows_per_prompt: int) -> Array:
    """PRNG keys `[P·R]`, prompt-major: row r of prompt p gets `fold_in(keys[p], r)`, the key
    of row r in a run of prompt p alone with key p (`extend`'s per-row keys)."""
    rows = jax.vmap(fold_in_rows, in_axes=(0, None))(keys, rows_per_prompt)
    return rows.reshape(-1, *keys.shape[1:])


def _bucket(lm: LanguageModel, length: int, max_new_tokens: int) -> int:
    bucket = max(16, 1 << max(length - 1, 0).bit_length())
    return max(length, min(bucket, lm.max_length - max_new_tokens))


def init_decode(
    lm: LanguageModel,
    prompt_tokens: Array,
    num_rows: int,
    max_new_tokens: int,
    prompt_lengths: Array | None = None,
    record_features: bool = False,
    record_twist: bool = False,
) -> DecodeState:
    """Prefills the prompt(s) and returns an empty generation of `num_rows` rows.

    Args:
      lm: the model.
      prompt_tokens: int32 `[T]` shared by every row (prefilled once into `prompt_cache`), or
        `[P, T]` right-padded prompts, P dividing B: rows `p·B/P … (p+1)·B/P − 1` continue
        prompt p. With several rows per prompt each prompt is prefilled once into
        `prompt_cache`; with one (P = B), each row holds its prompt in its own cache.
      num_rows: B.
      max_new_tokens: N, the generation slots per row.
      prompt_lengths: real lengths of right-padded prompts (default T), each in `[1, T]`: an
        int32 scalar for a `[T]` prompt (see `pad_prompt`), `[P]` for `[P, T]` prompts. May be
        traced; concrete ones are checked (`ArgumentError`), since a length of 0 or past T
        would decode from the wrong prompt token, or give NaN log p.
      record_features: static; the state then carries `features` / `next_features` and every
        `extend` / `rewind` maintains them (from the same decode steps, no second forward).
      record_twist: keep `log_twist` (needed to extend with a twisted proposal).
    """
    num_rows = check_int("num_rows", num_rows, 1)
    prompt, max_new_tokens = check_prompt(lm, prompt_tokens, max_new_tokens, shapes=(1, 2))
    if prompt_lengths is not None:
        _check_prompt_lengths(prompt_lengths, prompt.shape)
    prompt_cache = None
    prompts = prompt.reshape(-1, prompt.shape[-1])  # [P, T]
    if num_rows % prompts.shape[0]:
        raise ArgumentError(f"num_rows={num_rows} must be a multiple of the {prompts.shape[0]} prompts given")
    rows_per_prompt = num_rows // prompts.shape[0]
    lengths = jnp.broadcast_to(
        jnp.asarray(prompt.shape[-1] if prompt_lengths is None else prompt_lengths, jnp.int32), prompts.shape[:1])
    last_tokens = jnp.take_along_axis(prompts, (lengths - 1)[:, None], axis=1)[:, 0]
    if prompt.ndim == 1 or rows_per_prompt > 1:
        # Each prompt is prefilled once; its last token is fed again on top of the shared
        # prefix so that every row's cache starts with it (a rewind to 0 refeeds it there).
        prefix = prefill_prompts(lm, prompts, lengths)._replace(length=lengths - 1)
        decoded = lm.decode(last_tokens, lm.init_cache(prompts.shape[0], max_new_tokens + 1),
                            with_features=record_features, prefix=prefix)
        prefilled = jax.tree.map(lambda x: jnp.repeat(x, rows_per_prompt, axis=0), decoded)
        prompt_cache = Shared(prefix)
    else:
        capacity = prompt.shape[1] + max_new_tokens
        prefilled = lm.prefill(prompt, lengths, lm.init_cache(num_rows, capacity), with_features=record_features)
    prompt_length = jnp.repeat(lengths, rows_per_prompt)
    last = jnp.repeat(last_tokens, rows_per_prompt)
    logits, cache = prefilled[0], prefilled[-1]
    features = next_features = None
    if record_features:
        next_features = prefilled[1]
        features = jnp.zeros((num_rows, max_new_tokens, lm.feature_size), jnp.float32)
    zeros = jnp.zeros((num_rows, max_new_tokens), jnp.float32)
    return DecodeState(
        tokens=jnp.full((num_rows, max_new_tokens), lm.pad_token_id, jnp.int32),
        log_p=zeros,
        log_q=zeros,
        entropy=zeros,
        length=jnp.zeros((num_rows,), jnp.int32),
        done=jnp.zeros((num_rows,), bool),
        prompt_length=prompt_length,
        last_prompt_token=last,
        cache=cache,
        next_logits=logits.astype(jnp.float32),
        features=features,
        next_features=next_features,
        log_twist=zeros if record_twist else None,
        prompt_cache=prompt_cache,
    )


# Prompt tokens prefilled in one model call: the prefill's attention scores grow with the
# prompts in a call times their width squared, so a batch of long prompts goes a few at a time.
PREFILL_TOKENS = 2048


def prefill_prompts(lm: LanguageModel, prompts: Array, lengths: Array):
    """The KV caches (G rows) of G right-padded prompts `[G, T]` with real lengths `[G]`,
    prefilled `PREFILL_TOKENS // T` prompts per call (all at once when they fit)."""
    num_prompts, width = prompts.shape
    per_call = max(1, PREFILL_TOKENS // width)

    def prefill(tokens, call_lengths):
        return lm.prefill(tokens, call_lengths, lm.init_cache(tokens.shape[0], width))[1]

    if per_call >= num_prompts:
        return prefill(prompts, lengths)

    def call(index, cache):
        # The last call starts early enough to stay inside: it prefills some prompts again.
        first = jnp.minimum(index * per_call, num_prompts - per_call)
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, first, per_call)  # noqa: E731
        written = prefill(rows(prompts), rows(lengths))
        return jax.tree.map(lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x, first, axis=0), cache, written)

    # Written in place into the caches of all the prompts, so that none is copied afterwards.
    return jax.lax.fori_loop(0, -(-num_prompts // per_call), call, lm.init_cache(num_prompts, width))


def _check_prompt_lengths(prompt_lengths: Any, prompt_shape: tuple[int, ...]) -> None:
    # A [T] prompt's single length is `prompt_length` at every sampler entry point.
    name = "prompt_length" if len(prompt_shape) == 1 else "prompt_lengths"
    if np.shape(prompt_lengths) != prompt_shape[:-1]:
        expected = "a scalar for a [T] prompt" if len(prompt_shape) == 1 else f"shape [P] = [{prompt_shape[0]}]"
        raise ArgumentError(f"{name} must be {expected}, got shape {np.shape(prompt_lengths)}")
    check_int_array(name, prompt_lengths, 1, prompt_shape[-1] + 1, "the prompt width")


def extend(
    key: Array,
    lm: LanguageModel,
    state: DecodeState,
    limit: Array | int,
    proposal: Proposal,
    forced: Array | None = None,
) -> tuple[DecodeState, Array]:
    """Samples every unfinished row forward until a stop token or `length == limit`.

    Row r draws its token at generated position j with `fold_in(fold_in(key, r), j)`, so a
    row's randomness does not depend on the other rows.

    Args:
      key: PRNG key, or a batch of keys, one per row (typed `[B]` or raw `[B, 2]`), that
        replace `fold_in(key, r)`.
      lm: the model.
      state: rows to extend.
      limit: int32 scalar or `[B]`, the length cap (≤ N); traced.
      proposal: the sampling distribution (log q is taken from it exactly). A twisted
        proposal reads `next_features` (the next-token logits when the state records no
        features) and records log ψ of each sampled token in `log_twist` (the state must
        come from `init_decode(..., record_twist=True)`).
      forced: optional int32 `[B, N]`: where `forced[r, j] >= 0`, row r takes that token at
        generated position j instead of sampling (its log q, log p and log ψ are recorded as
        for a sampled token); -1 elsewhere. Conditional SMC clamps its reference row this way.

    Returns:
      `(state, num_decoded int32[B])`, the tokens each row decoded.
    """
    batch = state.tokens.shape[0]
    limit = row_limits(state, limit)
    row_keys = key if is_key_batch(key) else fold_in_rows(key, batch)
    final = jax.lax.while_loop(
        lambda s: jnp.any(extendable(s, limit)),
        lambda s: advance(lm, s, row_keys, limit, proposal, forced),
        state,
    )
    return final, final.length - state.length


def fold_in_rows(key: Array, num_rows: int) -> Array:
    """PRNG keys `[B]`: `fold_in(key, r)` for each row r, so that a row's randomness does not
    depend on the other rows."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_rows))


def row_limits(state: DecodeState, limit: Array | int) -> Array:
    """int32 `[B]`: a scalar or per-row length cap, at most the N slots."""
    batch, slots = state.tokens.shape
    return jnp.broadcast_to(jnp.minimum(jnp.asarray(limit, jnp.int32), slots), (batch,))


def extendable(state: DecodeState, limit: Array) -> Array:
    """bool `[B]`: the rows `advance` samples a token for (unfinished, below `limit` `[B]`)."""
    return ~state.done & (state.length < limit)


def advance(
    lm: LanguageModel,
    state: DecodeState,
    row_keys: Array | None,
    limit: Array,
    proposal: Proposal | None,
    forced: Array | None = None,
    refeed: Array | None = None,
) -> DecodeState:
    """One model step for every row: the body of `extend`'s loop, and a rewind's recompute.

    Rows that are `extendable` (and not refeeding) sample their next token with
    `fold_in(row_keys[r], length)` and feed it. Rows with `refeed` (bool `[B]`, after
    `truncate`) instead feed their last kept token again at its own slot, which recomputes
    their `next_logits` (and `next_features`); they sample nothing. The other rows keep
    their state. Every row goes through the one `lm.decode` call, so samplers that
    restart some rows while others decode (`jaxsample.mcmc.power_sample`) pay one model
    step per iteration.

    Args:
      lm: the model.
      state: the rows.
      row_keys: PRNG keys `[B]`, one per row (unused when `proposal` is None).
      limit: int32 `[B]` length caps (`row_limits`).
      proposal: the sampling distribution (see `extend`), or None when no row draws.
      forced: as in `extend`.
      refeed: bool `[B]` rows to refeed (default none).
    """
    if proposal is not None and proposal.twist is not None and state.log_twist is None:
        raise ArgumentError(
            "a twisted proposal records log ψ per token: build the state with "
            "init_decode(..., record_twist=True)"
        )
    batch, slots = state.tokens.shape
    rows = jnp.arange(batch)
    refeed = jnp.zeros((batch,), bool) if refeed is None else refeed
    is_active = jnp.zeros((batch,), bool) if proposal is None else extendable(state, limit) & ~refeed
    fed = is_active | refeed
    feed = jnp.where(refeed, last_kept_token(state), lm.pad_token_id)
    cache = state.cache._replace(length=jnp.where(refeed, refeed_slot(state), state.cache.length))
    if proposal is not None:
        keys = jax.vmap(jax.random.fold_in)(row_keys, state.length)
        clamp = None
        if forced is not None:
            clamp = jnp.take_along_axis(forced, jnp.minimum(state.length, slots - 1)[:, None], axis=1)[:, 0]
        prefixes = None
        if proposal.twist is not None:
            hidden = state.next_logits if state.next_features is None else state.next_features
            prefixes = (state.tokens, state.length, hidden)
        draw = draw_tokens(keys, state.next_logits, proposal, clamp, prefixes)
        feed = jnp.where(is_active, draw.token, feed)
    slot = jnp.where(is_active, state.length, slots)  # out of range: dropped

    def write(buffer, value):
        return buffer.at[rows, slot].set(value, mode="drop")

    recording = state.features is not None
    decoded = lm.decode(feed, cache, with_features=recording, prefix=_prefix(state))
    logits, new_cache = decoded[0], decoded[-1]
    state = state._replace(
        cache=new_cache._replace(length=jnp.where(fed, new_cache.length, state.cache.length)),
        next_logits=jnp.where(fed[:, None], logits.astype(jnp.float32), state.next_logits),
    )
    if recording:
        state = state._replace(
            features=state.features.at[rows, slot].set(decoded[1], mode="drop"),
            next_features=jnp.where(fed[:, None], decoded[1], state.next_features),
        )
    if proposal is None:
        return state
    return state._replace(
        tokens=write(state.tokens, draw.token),
        log_p=write(state.log_p, draw.log_p),
        log_q=write(state.log_q, draw.log_q),
        entropy=write(state.entropy, draw.entropy),
        length=state.length + is_active,
        done=state.done | (is_active & lm.is_stop(draw.token)),
        log_twist=state.log_twist if proposal.twist is None else write(state.log_twist, draw.log_twist),
    )


def rewind(lm: LanguageModel, state: DecodeState, new_length: Array) -> DecodeState:
    """Cuts each row back to its first `new_length` generated tokens (int32 `[B]`).

    Positions from `new_length` on are cleared; the next-token logits (and features, when
    recorded) are recomputed with one decode step on the last kept token (the prompt's last
    token when `new_length` is 0).
    """
    state = truncate(lm, state, new_length)
    batch = state.tokens.shape[0]
    return advance(lm, state, None, state.length, None, refeed=jnp.ones((batch,), bool))


def truncate(lm: LanguageModel, state: DecodeState, new_length: Array) -> DecodeState:
    """`rewind` without its model step: rows keep their first `new_length` tokens (int32
    `[B]`; positions from there on are cleared), but `next_logits`, `next_features` and the
    cache's length are stale until `advance(..., refeed=...)` feeds the last kept token again.

    A row truncated to its own length is unchanged.
    """
    new_length = jnp.asarray(new_length, jnp.int32)
    keep = jnp.arange(state.tokens.shape[1])[None, :] < new_length[:, None]
    state = state._replace(length=new_length)
    return state._replace(
        tokens=jnp.where(keep, state.tokens, lm.pad_token_id),
        log_p=jnp.where(keep, state.log_p, 0.0),
        log_q=jnp.where(keep, state.log_q, 0.0),
        entropy=jnp.where(keep, state.entropy, 0.0),
        done=(new_length > 0) & lm.is_stop(last_kept_token(state)),
        features=None if state.features is None else jnp.where(keep[:, :, None], state.features, 0.0),
        log_twist=None if state.log_twist is None else jnp.where(keep, state.log_twist, 0.0),
    )


def last_kept_token(state: DecodeState) -> Array:
    """int32 `[B]`: each row's last generated token, the prompt's last token for an empty row."""
    last = jnp.take_along_axis(state.tokens, jnp.maximum(state.length - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(state.length > 0, last, state.last_prompt_token)


def refeed_slot(state: DecodeState) -> Array:
    """int32 `[B]`: the cache slot that holds each row's `last_kept_token`."""
    # With a shared prompt, row slot 0 holds the prompt's last token.
    if state.prompt_cache is not None:
        return state.length
    return state.prompt_length + state.length - 1


def _prefix(state: DecodeState):
    return None if state.prompt_cache is None else state.prompt_cache.value


def take_rows(state: DecodeState, indices: Array) -> DecodeState:
    """Gathers rows `indices` (int32 `[B']`) of every per-row array — SMC resampling.

    Only the rows' own part moves (the shared prompt cache stays); with as many rows out as
    in, the cache is gathered in place (`jaxsample.rows.gather_rows`). Rows of several
    prompts (`init_decode` with `[P, T]` prompts) would leave their prompt: refused.
    """
    if state.prompt_cache is not None and state.prompt_cache.value.length.shape[0] > 1:
        raise ArgumentError("take_rows moves rows between prompts: rows of several shared prompts cannot be resampled")
    return gather_rows(state, indices)
