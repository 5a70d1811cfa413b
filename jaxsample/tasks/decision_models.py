"""The decision task's exact data distribution as a model, and exact accuracies of any model.

`data_model(config)` is p* as a `LanguageModel` (`-inf` logits for tokens p* never
writes), for sampler tests whose every answer is known in closed form.

`exact_accuracies(lm, problem, alpha)` measures a model (a trained one, say) against its
*own* probabilities: base and temperature accuracy are the probabilities of the one correct
trace under p and under the tempered proposal, read off one forward pass. Power accuracy
p(x*)^α / Σ_x p(x)^α needs the normaliser. It is computed item by item along the correct
history: for item k, Z_k sums p^α over the options and all m^L stretches (exact
enumeration of the digit strings, or, above `max_enumerated` strings, their per-token
factorisation along the item's own digits). The product Π_k Z_k is the normaliser when an
item's probabilities do not depend on how earlier items went, which holds for p* and is what
training on p* teaches; for K = 1 it is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_real
from jaxsample.lm import LanguageModel
from jaxsample.tasks.decisions import (
    EOS,
    ITEM,
    PAD,
    RIGHT,
    SEP,
    Accuracies,
    DecisionProblem,
    DecisionTaskConfig,
    DecisionVocabulary,
)


def data_model(config: DecisionTaskConfig) -> LanguageModel:
    """p* as a `LanguageModel` over `DecisionVocabulary(config)` (max_length: the longest problem).

    Logits are log-probabilities with `-inf` outside p*'s support. Prompt positions predict
    uniformly; the rules for impossible prefixes match `data_token_log_probs`. Every rule is
    a lookup at a fixed offset, as a transformer would learn it: a digit after `R` is the
    token P − 1 positions back, and a separator is `<sep>` iff the next prompt slot opens
    with `<item>`.
    """
    vocab = DecisionVocabulary(config)
    P, L, n = config.prompt_length, config.stretch_length, config.item_length
    ids = jnp.arange(vocab.size)
    never = jnp.full(vocab.size, -jnp.inf)
    decision_row = never.at[vocab.option_ids].set(jnp.log(config.decision_probs))
    uniform_digits = never.at[vocab.digit_ids].set(-jnp.log(config.num_symbols))

    def one_hot(token):
        return jnp.where(ids == token[..., None], 0.0, -jnp.inf)

    def logits_fn(tokens):
        size = tokens.shape[0]
        num_items = jnp.sum(tokens[:P] == ITEM)
        # Position t predicts the token at t + 1: trace token j = t + 1 − P, slot `slot` of
        # item k.
        t = jnp.arange(size)
        k, slot = jnp.divmod(t + 1 - P, n)
        decision = tokens[jnp.clip(P + k * n, 0, size - 1)]
        copied = one_hot(tokens[jnp.clip(t + 1 - (P - 1), 0, size - 1)])
        stretch = jnp.where((decision == RIGHT)[:, None], copied, uniform_digits)
        next_slot_opens = tokens[jnp.clip(1 + (k + 1) * n, 0, P - 1)]
        separator = one_hot(jnp.where(next_slot_opens == ITEM, SEP, EOS))
        logits = jnp.where((slot <= L)[:, None], stretch, separator)
        logits = jnp.where((slot == 0)[:, None], decision_row, logits)
        logits = jnp.where((k >= num_items)[:, None], one_hot(jnp.full(size, EOS)), logits)
        return jnp.where((t + 1 < P)[:, None], 0.0, logits)

    return LanguageModel.from_logits_fn(
        logits_fn, vocab.size, EOS, config.max_sequence_length, pad_token_id=PAD,
        name="decision-task-data")


@jax.jit
def _log_probs(lm: LanguageModel, tokens: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(lm.logits(tokens), axis=-1)


@jax.jit
def _prefix_log_probs(lm: LanguageModel, sequence: jax.Array, length: jax.Array):
    """(log p of the token after `sequence[:length]` `[V]`, its one-row cache as a prefix)."""
    cache = lm.init_cache(1, sequence.shape[0])
    logits, cache = lm.prefill(sequence[None], length[None], cache)
    return jax.nn.log_softmax(logits[0]), cache


@jax.jit
def _continuation_log_probs(lm: LanguageModel, prefix, rows: jax.Array) -> jax.Array:
    """`[R, n, V]` log p after each token of `rows [R, n]`, every row continuing `prefix`."""

    def feed(cache, tokens):
        logits, cache = lm.decode(tokens, cache, prefix=prefix)
        return cache, jax.nn.log_softmax(logits, axis=-1)

    _, log_p = jax.lax.scan(feed, lm.init_cache(rows.shape[0], rows.shape[1]), rows.T)
    return jnp.swapaxes(log_p, 0, 1)


def _forward(lm: LanguageModel, tokens: np.ndarray) -> np.ndarray:
    """float64 `[1, T, V]` log-probabilities of one sequence `[1, T]`."""
    return np.asarray(_log_probs(lm, jnp.asarray(tokens))).astype(np.float64)


def _continuations(lm: LanguageModel, sequence: np.ndarray, start: int, rows: np.ndarray,
                   batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 log p before and after each token of `rows [R, n]` written at `start`.

    The shared history `sequence[:start]` is prefilled once (padded to the sequence's
    length, so every `start` reuses one program); rows are decoded in chunks of one size.
    Returns `(before [V], after [R, n, V])`.
    """
    before, prefix = _prefix_log_probs(lm, jnp.asarray(sequence), jnp.int32(start))
    size = min(batch_rows, rows.shape[0])
    chunks = []
    for first in range(0, rows.shape[0], size):
        chunk = rows[first : first + size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], size - chunk.shape[0], 0)])
        chunks.append(np.asarray(_continuation_log_probs(lm, prefix, jnp.asarray(padded)))[: chunk.shape[0]])
    return np.asarray(before, np.float64), np.concatenate(chunks).astype(np.float64)


def _all_strings(m: int, length: int) -> np.ndarray:
    return (np.arange(m**length)[:, None] // m ** np.arange(length - 1, -1, -1)) % m


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(x[..., :1]), np.cumsum(x[..., :-1], axis=-1)], axis=-1)


def _off_mass(log_p: np.ndarray, allowed: np.ndarray, alpha: float) -> np.ndarray:
    """log Σ_{v ∉ allowed} p(v)^α over the last axis (−inf when nothing is outside)."""
    outside = np.ones(log_p.shape[-1], bool)
    outside[allowed] = False
    if not outside.any():
        return np.full(log_p.shape[:-1], -np.inf)
    return scipy.special.logsumexp(alpha * log_p[..., outside], axis=-1)


def exact_accuracies(
    lm: LanguageModel,
    problem: DecisionProblem,
    alpha: float,
    temperature: float | None = None,
    max_enumerated: int = 4096,
    batch_rows: int = 256,
) -> Accuracies:
    """A model's accuracies on one problem, from its own probabilities.

    Args:
      lm: a model over the task's vocabulary (its vocabulary may be larger).
      problem: the problem (its prompt is what the model is conditioned on).
      alpha: α ≥ 1 of the power target.
      temperature: τ of the temperature baseline; defaults to 1/α.
      max_enumerated: enumerate all m^L stretches up to this many, else factorise.
      batch_rows: rows decoded at once.

    Returns:
      `Accuracies`; `base` and `temperature` are exact, `power` and `power_lower_bound`
      bracket π(x*) under the item-independence described in the module docstring.
    """
    cfg = problem.config
    vocab = DecisionVocabulary(cfg)
    check_real("alpha", alpha, "[1, inf)")
    temperature = 1.0 / alpha if temperature is None else check_real("temperature", temperature, "(0, inf)")
    if lm.vocab_size < vocab.size:
        raise ArgumentError(
            f"model {lm.name!r} has {lm.vocab_size} tokens; the task needs {vocab.size}")
    sequence = np.concatenate([problem.prompt, problem.correct_trace])
    if sequence.shape[0] > lm.max_length:
        raise ArgumentError(
            f"the problem needs {sequence.shape[0]} positions; model {lm.name!r} has "
            f"{lm.max_length}")

    prompt_length = problem.prompt.shape[0]
    positions = np.arange(prompt_length - 1, sequence.shape[0] - 1)
    log_p = _forward(lm, sequence[None])[0, positions]
    targets = sequence[positions + 1]
    log_q = log_p / temperature
    log_q -= scipy.special.logsumexp(log_q, axis=-1, keepdims=True)
    token_log_p = log_p[np.arange(len(targets)), targets]
    log_p_correct = float(np.sum(token_log_p))

    log_z = np.empty(problem.num_decisions)
    log_off = np.empty(problem.num_decisions)
    decision_probs = np.empty((problem.num_decisions, vocab.num_options))
    for k in range(problem.num_decisions):
        log_z[k], log_off[k], decision_probs[k] = _item_sums(
            lm, problem, sequence, k, alpha, max_enumerated, batch_rows)
    # Z over everything ≤ U_1 with U_k = Z_k U_{k+1} + E_k: leaving the format inside item k
    # weighs at most E_k, since any continuation's Σ p^α ≤ 1 for α ≥ 1.
    log_upper = 0.0
    for k in reversed(range(problem.num_decisions)):
        log_upper = np.logaddexp(log_z[k] + log_upper, log_off[k])

    item_log_p = token_log_p.reshape(problem.num_decisions, cfg.item_length)
    return Accuracies(
        base=float(np.exp(log_p_correct)),
        temperature=float(np.exp(np.sum(log_q[np.arange(len(targets)), targets]))),
        power=float(np.exp(alpha * log_p_correct - np.sum(log_z))),
        power_lower_bound=float(np.exp(alpha * log_p_correct - log_upper)),
        decision_probs=decision_probs,
        continuation_probs=np.exp(np.sum(item_log_p[:, 1:], axis=1)),
    )


def _item_sums(lm, problem, sequence, k, alpha, max_enumerated, batch_rows):
    """(log Z_k, log E_k, p(options)) for item k along the correct history.

    Z_k = Σ_d p(d)^α Σ_s p(s, sep | d)^α over options d and digit strings s; E_k bounds the
    p^α-weight of leaving the format inside the item (a non-option, non-digit or wrong
    separator token, each followed by a continuation of weight ≤ 1).
    """
    cfg = problem.config
    vocab = DecisionVocabulary(cfg)
    L, m = cfg.stretch_length, cfg.num_symbols
    start = problem.prompt.shape[0] + k * cfg.item_length  # index of the decision token
    enumerate_all = m**L <= max_enumerated
    strings = _all_strings(m, L) if enumerate_all else problem.digits[k][None]
    num_options, num_strings = vocab.num_options, strings.shape[0]

    fed = np.concatenate([
        np.repeat(vocab.option_ids, num_strings)[:, None],
        vocab.first_digit + np.tile(strings, (num_options, 1)),
    ], axis=1)  # [D·S, 1 + L]: the decision and the stretch; the separator is read, not fed
    decision, after = _continuations(lm, sequence, start, fed, batch_rows)
    after = after.reshape(num_options, num_strings, L + 1, -1)
    stretch_dists = after[:, :, :L]  # [D, S, L, V] before each digit
    separator = sequence[start + L + 1]
    separator_dist = after[:, :, L]  # [D, S, V]
    off_decision = _off_mass(decision, vocab.option_ids, alpha)
    off_digits = _off_mass(stretch_dists, vocab.digit_ids, alpha)  # [D, S, L]
    off_separator = _off_mass(separator_dist, np.array([separator]), alpha)  # [D, S]
    log_separator = separator_dist[..., separator]
    option_weight = alpha * decision[vocab.option_ids]  # [D]

    if enumerate_all:
        written = (vocab.first_digit + strings)[None, :, :, None]
        taken = np.take_along_axis(stretch_dists, written, -1)[..., 0]  # [D, S, L]
        before = alpha * _exclusive_cumsum(taken)  # log p(s_<j)^α, [D, S, L]
        # Each depth-j node is shared by m^(L−j) enumerated strings.
        node_off = scipy.special.logsumexp(before + off_digits - (L - np.arange(L)) * np.log(m), axis=(1, 2))
        stretch_weight = alpha * np.sum(taken, axis=-1)  # [D, S]
        log_s = scipy.special.logsumexp(stretch_weight + alpha * log_separator, axis=1)
        separator_off = scipy.special.logsumexp(stretch_weight + off_separator, axis=1)
    else:
        # Factorised: digit distributions taken not to depend on earlier digits of the stretch.
        level = scipy.special.logsumexp(alpha * stretch_dists[:, 0][..., vocab.digit_ids], axis=-1)  # [D, L]
        node_off = scipy.special.logsumexp(_exclusive_cumsum(level) + off_digits[:, 0], axis=1)
        log_s = np.sum(level, axis=-1) + alpha * log_separator[:, 0]
        separator_off = np.sum(level, axis=-1) + off_separator[:, 0]

    log_z = scipy.special.logsumexp(option_weight + log_s)
    log_off = scipy.special.logsumexp(np.concatenate(
        [[off_decision], option_weight + node_off, option_weight + separator_off]))
    return log_z, log_off, np.exp(decision[vocab.option_ids])
