"""Token-level proposals with exact log-probabilities.

Every sampler needs, per generated token, three numbers: log p under the base model
(untempered, full vocabulary), log q under the distribution that was *actually* sampled
(temperature, then top-k, then top-p, renormalised), and the entropy of p. Getting log q
from the processed distribution is what keeps Metropolis–Hastings and SMC weights exact.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsample.errors import ArgumentError
from jaxsample.rows import expand_groups
from jaxsample.validation import check_int, check_real

Array = jax.Array


@struct.dataclass
class Twist:
    """A twist ψ over the next token: log ψ(prefix, v) for every candidate token v.

    Attributes:
      log_twist_fn: `(params, tokens int32 [S], length int32 [], features f32 [D]) -> f32 [V]`,
        pure; `tokens[:length]` is the generated prefix (pad after), `features` the model's
        features at the prefix's last position (those that produced the next-token logits).
        `-inf` entries are legal (ψ = 0); any other shape is an `ArgumentError` when a token
        is drawn (`draw_tokens`). Static: a new function object recompiles.
      params: the twist's parameters (traced).
    """

    log_twist_fn: Callable = struct.field(pytree_node=False)
    params: Any = None

    def log_values(self, tokens: Array, length: Array, features: Array) -> Array:
        """log ψ of every candidate next token of B rows: `[B, S]`, `[B]`, `[B, D]` → f32 `[B, V]`."""
        values = jax.vmap(self.log_twist_fn, in_axes=(None, 0, 0, 0))(
            self.params, tokens, length, features
        )
        return jnp.asarray(values, jnp.float32)


@struct.dataclass
class Proposal:
    """Tempered, truncated, optionally twisted sampling distribution over the next token.

    Attributes:
      temperature: τ > 0, a traced float (changing it does not recompile); a concrete τ must
        lie in [2⁻¹²⁶, 2¹²⁶] ≈ [1.2e-38, 8.5e37], where τ and 1/τ are normal float32 numbers.
        One τ for every row, or one per group of rows `[P]`: the rows of P prompts,
        prompt-major (`draw_tokens` gives row r the τ of group r // (B / P)).
      top_k: static int; keep the k most likely tokens, and every token tied with the k-th
        (as transformers' `TopKLogitsWarper`: `top_k=1` samples among tied maxima), 0 keeps all.
      top_p: traced float in (0, 1]; keep the smallest set of most likely tokens whose
        tempered probability reaches top_p (1 keeps all). Ties at the threshold are kept.
        One for every row, or one per group `[P]`, as τ.
      twist: `None`, or a `Twist` ψ: the proposal is then q ∝ q_τ,k,p · ψ (`twisted_log_probs`),
        the twist-induced proposal of twisted SMC when τ = 1 and nothing is truncated.
    """

    temperature: Array | float = 1.0
    top_k: int = struct.field(pytree_node=False, default=0)
    top_p: Array | float = 1.0
    twist: Optional[Twist] = None

    def validated(self) -> "Proposal":
        """Checks concrete values and returns the proposal with float32 array leaves."""
        if self.twist is not None and not isinstance(self.twist, Twist):
            raise ArgumentError(f"twist must be None or a Twist, got {self.twist!r}")
        return self.replace(
            temperature=_float32_temperature(self.temperature),
            top_k=check_int("top_k", self.top_k, 0),
            top_p=jnp.asarray(check_real("top_p", self.top_p, "(0, 1]"), jnp.float32),
        )


# τ and 1/τ must both be normal float32 numbers: XLA divides by multiplying with 1/τ, and
# CPUs flush subnormals to 0. A smaller τ (1e-46 rounds to 0) would act as τ = 0 (greedy); a
# larger one makes 1/τ = 0, and a masked logit −inf · 0 = NaN.
_TEMPERATURE_RANGE = (float(np.finfo(np.float32).tiny), 1.0 / float(np.finfo(np.float32).tiny))


def _float32_temperature(temperature: Array | float) -> Array:
    """τ as float32, refusing a concrete τ outside `_TEMPERATURE_RANGE` (ArgumentError)."""
    check_real("temperature", temperature, "(0, inf)")
    if not isinstance(temperature, jax.core.Tracer):
        low, high = _TEMPERATURE_RANGE
        values = np.asarray(temperature, np.float64)
        outside = (values < low) | (values > high)
        if np.any(outside):
            raise ArgumentError(
                f"temperature must lie in [{low:.4g}, {high:.4g}] (τ and 1/τ normal float32 "
                f"numbers), got {float(values[outside][0])!r}"
            )
    return jnp.asarray(temperature, jnp.float32)


def token_log_probs(logits: Array) -> tuple[Array, Array]:
    """Base log-probabilities and entropy.

    Args:
      logits: `[..., V]`, any float dtype.

    Returns:
      `(log_p [..., V], entropy [...])` in float32 (float64 for float64 logits); entropy
      uses 0·log 0 = 0.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    entropy = -jnp.sum(jnp.where(jnp.isneginf(log_p), 0.0, jnp.exp(log_p) * log_p), axis=-1)
    return log_p, entropy


def proposal_log_probs(logits: Array, proposal: Proposal) -> Array:
    """Exact normalised log-probabilities of the distribution `proposal` samples from.

    Args:
      logits: `[..., V]`.
      proposal: temperature, then top-k, then top-p (the order of transformers' warpers);
        τ and top-p are scalars or have the logits' leading shape `[...]` (one per row).

    Returns:
      float32 `[..., V]`, `-inf` outside the support.
    """
    # Centred first: logits / τ overflows float32 once τ < |logit| / 3.4e38 (NaN log q), while
    # (logits − max) / τ keeps the maxima at exactly 0 and sends the rest to ≤ 0 or −inf, the
    # greedy limit. The maxima are set to 0 rather than divided: a traced τ too small for
    # float32 (see `_TEMPERATURE_RANGE`) makes 1/τ = inf, and them 0 · inf = NaN.
    logits = logits.astype(jnp.float32)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    scores = jnp.where(logits == peak, 0.0, (logits - peak) / _per_token(proposal.temperature))
    if proposal.top_k:
        kth = jax.lax.top_k(scores, min(proposal.top_k, scores.shape[-1]))[0][..., -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    log_q = jax.nn.log_softmax(scores, axis=-1)
    # Skipping the sort when top-p is off matters at a 150k vocabulary.
    top_p = _per_token(proposal.top_p)
    return jax.lax.cond(jnp.any(top_p < 1.0), _truncate_top_p, lambda lq, _: lq, log_q, top_p)


def _per_token(value: Array | float) -> Array | float:
    """A scalar as it is; per-row values `[...]` as `[..., 1]`, to meet logits `[..., V]`."""
    return jnp.expand_dims(value, -1) if jnp.ndim(value) else value


def _truncate_top_p(log_q: Array, top_p: Array) -> Array:
    sorted_log_q = jnp.sort(log_q, axis=-1)[..., ::-1]
    mass_before = jnp.cumsum(jnp.exp(sorted_log_q), axis=-1) - jnp.exp(sorted_log_q)
    # The most likely token is always kept; the smallest kept value is the threshold. A row
    # with top-p 1 among truncated rows keeps all: its rounded mass may reach 1 before the end.
    kept = (mass_before < top_p) | (top_p >= 1.0) | (jnp.arange(log_q.shape[-1]) == 0)
    threshold = jnp.min(jnp.where(kept, sorted_log_q, jnp.inf), axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(log_q < threshold, -jnp.inf, log_q), axis=-1)


def twisted_log_probs(log_q: Array, log_twist: Array) -> Array:
    """log of q ∝ exp(log_q) · ψ, normalised over the last axis (f32 `[..., V]`).

    Where ψ vanishes on the whole support of q (N_ψ = Σ_v q(v) ψ(v) = 0) the row keeps q
    unchanged: every token then has ψ = 0, so a twisted-SMC weight, which carries log ψ of
    the sampled token, becomes `-inf` instead of NaN. log ψ is first shifted by its largest
    value on q's support (q ∝ q·ψ does not change), so that a large constant in it does not
    round log q away in float32 (ulp(1e8) = 8).
    """
    on_support = jnp.where(jnp.isneginf(log_q), -jnp.inf, log_twist)
    peak = jnp.max(on_support, axis=-1, keepdims=True)
    scores = log_q + (log_twist - jnp.where(jnp.isfinite(peak), peak, 0.0))
    log_norm = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    dead = jnp.isneginf(log_norm)
    return jnp.where(dead, log_q, scores - jnp.where(dead, 0.0, log_norm))


def categorical(key: Array, logits: Array) -> Array:
    """Draws one index from `softmax(logits)` (`[V]` → int32 `[]`), reading O(√V) random numbers.

    Two Gumbel-max draws: the vocabulary is cut into blocks of `b ≈ √V` consecutive ids
    (the last padded with −inf); a block is drawn from the blocks' log-masses (`logsumexp`
    over each), then an id from the chosen block's logits, so
    P(id) = P(block) · P(id | block) = softmax(logits)[id] exactly, in the log domain as
    `jax.random.categorical` is. Both draws read one Gumbel vector of `V/b + b` entries. The
    cost is a pass over the logits instead of V uniform draws and 2V logarithms: at a 49k
    vocabulary and 64 rows, 1.0 ms per step instead of 34 ms on a 2-core CPU
    (`experiments/bench_draw.py`). `-inf` logits are never drawn (a block whose every
    logit is −inf has mass 0).
    """
    if jnp.ndim(logits) != 1 or jnp.shape(logits)[0] < 1:
        raise ArgumentError(
            f"categorical draws one index: logits must have shape [V] with V >= 1, got {jnp.shape(logits)} "
            "(vmap it over rows)"
        )
    vocab = logits.shape[0]
    block = 1 << (vocab.bit_length() + 1) // 2
    blocks = -(-vocab // block)
    scores = jnp.pad(logits, (0, blocks * block - vocab), constant_values=-jnp.inf).reshape(blocks, block)
    peak = jnp.max(scores, axis=1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    log_mass = jnp.log(jnp.sum(jnp.exp(scores - peak), axis=1)) + peak[:, 0]
    # One Gumbel vector for both stages, from `key` itself: drawing the id with
    # `split(key)[1]` (equal to `fold_in(key, 1)`) measurably worsened pooled SMC estimates
    # on the tabular toy (tests/smc/test_smc_kernel.py), for a reason not found.
    noise = jax.random.gumbel(key, (blocks + block,), jnp.float32)
    chosen = jnp.argmax(log_mass + noise[:blocks])
    within = jnp.argmax(scores[chosen] + noise[blocks:])
    return (chosen * block + within).astype(jnp.int32)


class TokenDraw(NamedTuple):
    """One token per row and its numbers (all `[B]`).

    Attributes:
      token: int32, sampled (or forced).
      log_p: log p of the token under the untempered base model.
      log_q: log q of the token under the proposal actually sampled from.
      entropy: entropy of p (of the whole next-token distribution).
      log_twist: log ψ of the token (0 without a twist).
    """

    token: Array
    log_p: Array
    log_q: Array
    entropy: Array
    log_twist: Array


# Bounds the [rows, V] temporaries of one draw (log-softmaxes, the block scores of
# `categorical`, the top-p sort): 37 MiB each at 64 rows of a 152k vocabulary, a sizeable
# share of the rows' generated KV cache at the Qwen2.5-0.5B shape (experiments/bench_memory.py).
# On an accelerator the chunks run one after another: a few more kernel launches per decode
# step where B x V exceeds the bound.
DRAW_ELEMENTS = 2**21


def draw_tokens(
    keys: Array,
    logits: Array,
    proposal: Proposal,
    forced: Array | None = None,
    prefixes: tuple[Array, Array, Array] | None = None,
) -> TokenDraw:
    """Samples each row's next token from `proposal` and returns the token's numbers.

    Row r's token is `categorical(keys[r], log_q[r])`: the same draw whether rows
    are processed together or alone. Rows are processed in chunks of at most
    `DRAW_ELEMENTS // V` rows (a divisor of B), so no full `[B, V]` temporary is built; a
    chunk takes every n-th row, so rows sharded over a mesh stay on their devices.

    Args:
      keys: `[B]` PRNG keys, one per row.
      logits: `[B, V]` next-token logits.
      proposal: the sampling distribution; τ and top-p one for all rows, or one per group
        of rows `[P]` (`jaxsample.rows.expand_groups`).
      forced: optional int32 `[B]`; rows with `forced >= 0` take that token instead of the
        sampled one (its numbers are reported as for a sampled token).
      prefixes: `(tokens [B, S], length [B], features [B, D])`, the twist's inputs; required
        with a twisted proposal.
    """
    batch, vocab = logits.shape
    _check_keys(keys, batch)
    if proposal.twist is not None and prefixes is None:
        raise ArgumentError("a twisted proposal needs the rows' prefixes (tokens, length, features)")
    forced = jnp.full((batch,), -1, jnp.int32) if forced is None else forced

    per_row = {name: expand_groups(getattr(proposal, name), batch)
               for name in ("temperature", "top_p") if jnp.ndim(getattr(proposal, name))}

    def draw(rows):
        keys, logits, forced, prefixes, per_row = rows
        log_p, entropy = token_log_probs(logits)
        log_q = proposal_log_probs(logits, proposal.replace(**per_row))
        log_twist = None
        if proposal.twist is not None:
            log_twist = proposal.twist.log_values(*prefixes)
            if log_twist.shape != log_q.shape:  # static: raised while tracing
                raise ArgumentError(
                    "log_twist_fn(params, tokens [S], length [], features [D]) must return log ψ of "
                    f"every token, shape [V] = [{log_q.shape[-1]}]; vmapped over {log_q.shape[0]} "
                    f"rows it returned shape {log_twist.shape}"
                )
            log_q = twisted_log_probs(log_q, log_twist)
        token = jax.vmap(categorical)(keys, log_q)
        token = jnp.where(forced >= 0, forced, token)

        def at_token(values):
            return jnp.take_along_axis(values, token[:, None], axis=1)[:, 0]

        token_log_twist = jnp.zeros_like(entropy) if log_twist is None else at_token(log_twist)
        return TokenDraw(token, at_token(log_p), at_token(log_q), entropy, token_log_twist)

    rows = (keys, logits, forced, prefixes, per_row)
    chunk = max(d for d in range(1, batch + 1) if batch % d == 0 and d * vocab <= max(DRAW_ELEMENTS, vocab))
    if chunk == batch:
        return draw(rows)
    # Chunk i holds rows i, i + n, i + 2n, ... (n chunks): when the rows are split over a
    # mesh's data axis in contiguous blocks, every device draws its own rows of each chunk.
    chunks = batch // chunk
    grouped = jax.tree.map(lambda x: x.reshape(chunk, chunks, *x.shape[1:]), rows)  # [j, i] = row j·n + i

    def draw_chunk(_, i):
        return None, draw(jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False), grouped))

    _, drawn = jax.lax.scan(draw_chunk, None, jnp.arange(chunks))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(batch), drawn)


def _check_keys(keys: Array, batch: int) -> None:
    """Raises unless `keys` holds one key per row: typed keys `[B]` or raw uint32 keys `[B, 2]`."""
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if (keys.shape if typed else keys.shape[:-1]) != (batch,):
        raise ArgumentError(
            f"keys must hold one PRNG key per row of logits, shape [B] = [{batch}] (raw uint32 "
            f"keys: [{batch}, 2]), got {'typed' if typed else 'raw'} keys of shape {keys.shape}"
        )
