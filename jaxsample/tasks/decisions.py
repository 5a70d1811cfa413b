"""A stylized reasoning task with decision points, with its exact data distribution p*.

A trace handles K items in order. Each item opens with a *decision* token: the right option
`R` with probability r or one of W wrong options `W1..WW` with probability w = (1 − r)/W
each. A stretch of L digits follows: after `R` it writes the item's value (its L base-m
digits, most significant first) with probability 1; after a wrong option every digit is
uniform over the m symbols. A separator the model is certain about closes the item: `<sep>`,
or `<eos>` after the last item. The trace is correct iff it is the unique trace that takes
`R` at every item (it then writes every value right), so under p* its accuracy is r^K while
p^α accuracy approaches 1: the gap power samplers exist to close (specs/decision_task.md).

Token layout: the prompt holds `max_decisions` item slots of L + 2 tokens each, shaped like
the trace's items, so every prompt has the same length P = 2 + K_max (L + 2). A problem with
K = 2 items 180 = 10110100₂ and 47 = 00101111₂ (defaults: K_max = 4, L = 8, m = 2):

    prompt  <bos> <item> 1 0 1 1 0 1 0 0 <sep> <item> 0 0 1 0 1 1 1 1 <sep>
                  <none> × 10  <none> × 10  <go>                               P = 42
    trace   R 1 0 1 1 0 1 0 0 <sep> W2 0 1 1 0 1 1 1 0 <eos>

Trace token s of item k sits at position P + k (L + 2) + s and its prompt counterpart at
1 + k (L + 2) + s: every digit R copies lies exactly P − 1 positions back, one fixed offset
that a RoPE attention head learns quickly. Whether item k closes with `<sep>` or `<eos>` is
read from the first token of prompt slot k + 1 (`<item>`, or `<none>` / `<go>`).
A trace has at most K_max (L + 2) = 40 tokens, so sequences have at most 82. Generated
positions are 0-based and trace-relative, as in `DecodeState`: item k's decision is trace
position k·(L + 2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy

from jaxsample.errors import ArgumentError, ConfigError
from jaxsample.tasks.rng import numpy_rng
from jaxsample.validation import check_int, check_real, is_int

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>", "<go>", "<item>", "<none>")
PAD, UNK, BOS, EOS, SEP, GO, ITEM, NONE = range(len(SPECIAL_TOKENS))
RIGHT = len(SPECIAL_TOKENS)  # token id of the right option `R`; wrong options follow it


@dataclass(frozen=True)
class DecisionTaskConfig:
    """Parameters of the task (frozen, hashable).

    Attributes:
      right_prob: r, p*(R) at every decision, in (0, 1).
      num_wrong: W ≥ 1 wrong options, each with probability (1 − r)/W. The task shows its
        point (temperature hurts, p^α helps) when each wrong option beats R: (1 − r)/W > r.
      stretch_length: L ≥ 1 digits after each decision.
      num_symbols: m ≥ 2 digit symbols; a diffuse stretch has entropy log m per token.
      max_decisions: K_max, the most items a problem holds: the prompt's number of item
        slots (sets `prompt_length` and `max_sequence_length`).
    """

    right_prob: float = 0.30
    num_wrong: int = 2
    stretch_length: int = 8
    num_symbols: int = 2
    max_decisions: int = 4

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ConfigError(f"DecisionTaskConfig: {message}")

        check(0.0 < self.right_prob < 1.0, f"right_prob must lie in (0, 1), got {self.right_prob}")
        for name, low in (("num_wrong", 1), ("stretch_length", 1), ("num_symbols", 2),
                          ("max_decisions", 1)):
            value = getattr(self, name)
            check(is_int(value) and value >= low,
                  f"{name} must be an integer in [{low}, inf], got {value!r}")

    @property
    def wrong_prob(self) -> float:
        """w = (1 − r)/W, p* of each wrong option."""
        return (1.0 - self.right_prob) / self.num_wrong

    @property
    def decision_probs(self) -> np.ndarray:
        """float64 `[1 + W]` p* over the options, the right one first."""
        return np.array([self.right_prob] + [self.wrong_prob] * self.num_wrong)

    @property
    def item_length(self) -> int:
        """Tokens per item, in the trace (decision, L digits, separator) and per prompt slot."""
        return self.stretch_length + 2

    @property
    def prompt_length(self) -> int:
        """P = 2 + K_max (L + 2), the same for every problem."""
        return 2 + self.max_decisions * self.item_length

    def trace_length(self, num_decisions: int) -> int:
        """Tokens of the trace of a problem with `num_decisions` items: K (L + 2)."""
        return num_decisions * self.item_length

    @property
    def max_sequence_length(self) -> int:
        """Prompt plus trace of the longest problem: the positions a model needs."""
        return self.prompt_length + self.trace_length(self.max_decisions)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "DecisionTaskConfig":
        """The config of a `to_dict` dict; raises `ConfigError` on an unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"DecisionTaskConfig: unknown fields {unknown}")
        return cls(**fields)


@dataclass(frozen=True)
class DecisionVocabulary:
    """Token ids of a config: specials, options, then digits."""

    config: DecisionTaskConfig

    @property
    def num_options(self) -> int:
        """1 + W: the right option and the W wrong ones."""
        return 1 + self.config.num_wrong

    @property
    def first_digit(self) -> int:
        """Token id of digit 0 (the digits follow the options)."""
        return RIGHT + self.num_options

    @property
    def size(self) -> int:
        """V, the vocabulary size: specials, options, digits."""
        return self.first_digit + self.config.num_symbols

    @property
    def option_ids(self) -> np.ndarray:
        """int `[1 + W]` token ids of R, W1, …, WW."""
        return RIGHT + np.arange(self.num_options)

    @property
    def digit_ids(self) -> np.ndarray:
        """int `[m]` token ids of the digits 0 … m − 1."""
        return self.first_digit + np.arange(self.config.num_symbols)

    def tokens(self) -> list[str]:
        """Token strings in id order."""
        cfg = self.config
        options = ["R"] + [f"W{i + 1}" for i in range(cfg.num_wrong)]
        digits = [str(i) for i in range(cfg.num_symbols)]
        return list(SPECIAL_TOKENS) + options + digits


@dataclass(frozen=True)
class DecisionProblem:
    """One problem: the values of its K items.

    Attributes:
      config: the task.
      items: K item values, each in [0, m^L).
    """

    config: DecisionTaskConfig
    items: tuple[int, ...]

    def __post_init__(self):
        cfg = self.config
        if not 1 <= len(self.items) <= cfg.max_decisions:
            raise ArgumentError(
                f"a problem holds 1..{cfg.max_decisions} items (max_decisions), "
                f"got {len(self.items)}")
        top = cfg.num_symbols**cfg.stretch_length
        for value in self.items:
            if not 0 <= value < top:
                raise ArgumentError(f"item value {value} outside [0, {top}) = [0, m^L)")

    @property
    def num_decisions(self) -> int:
        """K, the items of this problem."""
        return len(self.items)

    @property
    def digits(self) -> np.ndarray:
        """int64 `[K, L]` the items' base-m digits, most significant first."""
        return _digits(self.config, np.asarray(self.items, np.int64))

    @property
    def prompt(self) -> np.ndarray:
        """int32 `[P]`: `<bos>`, K item slots, K_max − K `<none>` slots, `<go>`."""
        items = np.asarray(self.items, np.int64)[None]
        return _encode_prompt(self.config, items, np.array([self.num_decisions]))[0]

    @property
    def correct_trace(self) -> np.ndarray:
        """int32 `[K (L + 2)]`: the one correct trace (`R` and the item's digits everywhere)."""
        decisions = np.zeros((1, self.num_decisions), np.int64)
        num_decisions = np.array([self.num_decisions])
        return _encode_trace(self.config, decisions, self.digits[None], num_decisions)[0]


def parse_prompt(config: DecisionTaskConfig, prompt_tokens) -> DecisionProblem:
    """The problem a prompt states (the inverse of `DecisionProblem.prompt`).

    Args:
      config: the task.
      prompt_tokens: int `[P]`, P = `config.prompt_length`: `<bos>`, K slots `<item>` d_1 ..
        d_L `<sep>`, K_max − K slots of L + 2 `<none>`, `<go>` (no padding).
    """
    tokens = np.asarray(prompt_tokens)
    vocab = DecisionVocabulary(config)
    L = config.stretch_length

    def reject(reason):
        raise ArgumentError(
            f"not a decision-task prompt ({reason}); expected <bos>, {config.max_decisions} "
            f"slots of {config.item_length} tokens (<item> + {L} digits + <sep>, or all "
            f"<none>), <go>: {tokens.tolist()}")

    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        reject(f"need a 1-D integer array, got shape {tokens.shape} of {tokens.dtype}")
    if tokens.shape[0] != config.prompt_length:
        reject(f"length {tokens.shape[0]}, not {config.prompt_length}")
    if tokens[0] != BOS or tokens[-1] != GO:
        reject("must start with <bos> and end with <go>")
    slots = tokens[1:-1].astype(np.int64).reshape(config.max_decisions, config.item_length)
    is_item = slots[:, 0] == ITEM
    num_decisions = int(np.sum(is_item))
    if num_decisions == 0 or not np.all(is_item[:num_decisions]):
        reject("item slots must come first, at least one of them")
    digits = slots[:num_decisions, 1 : L + 1] - vocab.first_digit
    if not (np.all((digits >= 0) & (digits < config.num_symbols))
            and np.all(slots[:num_decisions, L + 1] == SEP)):
        reject("an item slot must hold <item>, digits, <sep>")
    if not np.all(slots[num_decisions:] == NONE):
        reject("a slot after the last item must be all <none>")
    powers = config.num_symbols ** np.arange(L - 1, -1, -1, dtype=np.int64)
    return DecisionProblem(config, tuple(int(v) for v in digits @ powers))


def _digits(config: DecisionTaskConfig, items: np.ndarray) -> np.ndarray:
    powers = config.num_symbols ** np.arange(config.stretch_length - 1, -1, -1, dtype=np.int64)
    return (items[..., None] // powers) % config.num_symbols


def _encode_prompt(config: DecisionTaskConfig, items: np.ndarray, num_decisions: np.ndarray):
    """int32 `[S, P]` prompts of the first `num_decisions [S]` of items `[S, K]` (K ≤ K_max)."""
    rows, k = items.shape
    real = np.concatenate(
        [np.full((rows, k, 1), ITEM),
         DecisionVocabulary(config).first_digit + _digits(config, items),
         np.full((rows, k, 1), SEP)], axis=2)
    slots = np.full((rows, config.max_decisions, config.item_length), NONE, np.int64)
    slots[:, :k] = np.where((np.arange(k) < num_decisions[:, None])[..., None], real, NONE)
    return np.concatenate(
        [np.full((rows, 1), BOS), slots.reshape(rows, -1), np.full((rows, 1), GO)],
        axis=1).astype(np.int32)


def _encode_trace(config: DecisionTaskConfig, decisions: np.ndarray, stretches: np.ndarray,
                  num_decisions: np.ndarray) -> np.ndarray:
    """int32 `[S, K (L + 2)]` traces of the first `num_decisions [S]` items, `<pad>` after:
    option indices `[S, K]` (0 = right), digits `[S, K, L]`."""
    rows, k = decisions.shape
    item = np.arange(k)
    separators = np.where(item == num_decisions[:, None] - 1, EOS, SEP)[..., None]
    items = np.concatenate(
        [(RIGHT + decisions)[..., None], DecisionVocabulary(config).first_digit + stretches,
         separators], axis=2)
    items = np.where((item < num_decisions[:, None])[..., None], items, PAD)
    return items.reshape(rows, -1).astype(np.int32)


def _check_num_decisions(config: DecisionTaskConfig, num_decisions: int) -> None:
    check_int("num_decisions", num_decisions, 1, config.max_decisions)


def _tempered_decision_probs(config: DecisionTaskConfig, temperature: float) -> np.ndarray:
    check_real("temperature", temperature, "(0, inf)")
    scores = np.log(config.decision_probs) / temperature
    return np.exp(scores - np.logaddexp.reduce(scores))


def _sample_stretches(rng, config, decisions, items) -> np.ndarray:
    noise = rng.integers(0, config.num_symbols, decisions.shape + (config.stretch_length,))
    return np.where((decisions == 0)[..., None], _digits(config, items), noise)


def sample_problem(rng, config: DecisionTaskConfig, num_decisions: int) -> DecisionProblem:
    """A problem of `num_decisions` items with values uniform in [0, m^L).

    Args:
      rng: `np.random.Generator`, int seed or JAX PRNG key.
      config: the task.
      num_decisions: K in 1..max_decisions.
    """
    _check_num_decisions(config, num_decisions)
    values = numpy_rng(rng).integers(0, config.num_symbols**config.stretch_length, num_decisions)
    return DecisionProblem(config, tuple(int(v) for v in values))


def sample_traces(
    rng, problem: DecisionProblem, num_samples: int, temperature: float = 1.0
) -> np.ndarray:
    """Traces drawn from p* (every token tempered by `temperature`).

    Tempering p* token-wise only changes the decisions: digits after `R` and separators stay
    certain and diffuse digits stay uniform.

    Returns:
      int32 `[num_samples, K (L + 2)]`; every trace ends with `<eos>`.
    """
    num_samples = check_int("num_samples", num_samples, 1)
    rng = numpy_rng(rng)
    cfg = problem.config
    probs = _tempered_decision_probs(cfg, temperature)
    decisions = rng.choice(len(probs), size=(num_samples, problem.num_decisions), p=probs)
    items = np.broadcast_to(np.asarray(problem.items, np.int64), decisions.shape)
    stretches = _sample_stretches(rng, cfg, decisions, items)
    return _encode_trace(cfg, decisions, stretches, np.full(num_samples, problem.num_decisions))


def sample_batch(rng, config: DecisionTaskConfig, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training sequences (prompt + trace) drawn from p*, K uniform in 1..max_decisions.

    Returns:
      tokens: int32 `[B, T]`, T = `config.max_sequence_length`, right-padded with `<pad>`.
      loss_mask: bool `[B, T]`, True at trace tokens (the `<eos>` included): the targets of
        next-token prediction from position t − 1.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    rng = numpy_rng(rng)
    cfg = config
    num_decisions = rng.integers(1, cfg.max_decisions + 1, batch_size)
    items = rng.integers(0, cfg.num_symbols**cfg.stretch_length, (batch_size, cfg.max_decisions))
    decisions = rng.choice(1 + cfg.num_wrong, size=items.shape, p=cfg.decision_probs)
    stretches = _sample_stretches(rng, cfg, decisions, items)
    tokens = np.concatenate([_encode_prompt(cfg, items, num_decisions),
                             _encode_trace(cfg, decisions, stretches, num_decisions)], axis=1)
    trace_end = cfg.prompt_length + num_decisions * cfg.item_length
    positions = np.arange(cfg.max_sequence_length)
    loss_mask = (positions >= cfg.prompt_length) & (positions < trace_end[:, None])
    return tokens, loss_mask


def grade(problem: DecisionProblem, generated_tokens) -> bool | np.ndarray:
    """Whether generation is the correct trace (every decision right, every value written).

    Args:
      problem: the problem.
      generated_tokens: int `[N]` or `[B, N]` generated tokens; tokens after the trace's
        `<eos>` (padding) are ignored, a generation without it is wrong.

    Returns:
      bool, or bool `[B]`.
    """
    tokens = np.asarray(generated_tokens)
    if tokens.ndim not in (1, 2):
        raise ArgumentError(f"generated_tokens must have shape [N] or [B, N], got {tokens.shape}")
    target = problem.correct_trace
    if tokens.shape[-1] < target.shape[0]:
        correct = np.zeros(tokens.shape[:-1], bool)
    else:
        correct = np.all(tokens[..., : target.shape[0]] == target, axis=-1)
    return bool(correct) if tokens.ndim == 1 else correct


def _trim(trace) -> np.ndarray:
    trace = np.asarray(trace).astype(np.int64)
    if trace.ndim != 1:
        raise ArgumentError(f"trace must have shape [N], got {trace.shape}")
    stops = np.flatnonzero(trace == EOS)
    return trace[: stops[0] + 1] if stops.size else trace


def _next_token_log_probs(problem: DecisionProblem, trace: np.ndarray) -> np.ndarray:
    """float64 `[n, V]`: log p*(· | prompt, trace[:j]) for j < n.

    Defined for every prefix, possible or not (the same rules as `data_model`): a stretch
    after a token that is not `R` is uniform; after the last item only `<eos>` follows.
    """
    cfg = problem.config
    vocab = DecisionVocabulary(cfg)
    rows = np.full((len(trace), vocab.size), -np.inf)
    digits = problem.digits
    for j in range(len(trace)):
        k, slot = divmod(j, cfg.item_length)
        if k >= problem.num_decisions:
            rows[j, EOS] = 0.0
        elif slot == 0:
            rows[j, vocab.option_ids] = np.log(cfg.decision_probs)
        elif slot <= cfg.stretch_length:
            if trace[j - slot] == RIGHT:
                rows[j, vocab.first_digit + digits[k, slot - 1]] = 0.0
            else:
                rows[j, vocab.digit_ids] = -math.log(cfg.num_symbols)
        else:
            rows[j, EOS if k == problem.num_decisions - 1 else SEP] = 0.0
    return rows


def data_token_log_probs(problem: DecisionProblem, trace) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-token log p* and the entropy of p* before each token.

    Args:
      problem: the problem.
      trace: int `[N]` generated tokens; anything after the first `<eos>` is ignored.

    Returns:
      `(log_p [n], entropy [n])` float64 (n = tokens up to the first `<eos>`); `-inf` marks a
      token p* never writes.
    """
    trace = _trim(trace)
    log_p = _next_token_log_probs(problem, trace)
    entropy = np.sum(scipy.special.entr(np.exp(log_p)), axis=-1)
    return log_p[np.arange(len(trace)), trace], entropy


def data_log_prob(problem: DecisionProblem, trace) -> float:
    """log p*(trace | prompt): of the whole trace if it ends with `<eos>`, else of the prefix."""
    return float(np.sum(data_token_log_probs(problem, trace)[0]))


def decision_positions(problem: DecisionProblem, trace) -> np.ndarray:
    """Trace positions (0-based, generated-relative) of the decision tokens present in `trace`."""
    length = len(_trim(trace))
    positions = problem.config.item_length * np.arange(problem.num_decisions)
    return positions[positions < length]


class Accuracies(NamedTuple):
    """P(correct trace) under three ways of sampling, with per-decision probabilities.

    Attributes:
      base: under p (ancestral sampling at temperature 1).
      temperature: sampling every token at temperature τ (default 1/α).
      power: under π ∝ p^α over well-formed traces.
      power_lower_bound: under π ∝ p^α with every token outside the task's format charged at
        its largest possible weight (equals `power` when p never leaves the format).
      decision_probs: float64 `[K, 1 + W]` p(option | the correct trace so far); column 0 = R.
      continuation_probs: float64 `[K]` p(the correct digits and separator | R).
    """

    base: float
    temperature: float
    power: float
    power_lower_bound: float
    decision_probs: np.ndarray
    continuation_probs: np.ndarray


def closed_form_accuracies(
    config: DecisionTaskConfig, num_decisions: int, alpha: float, temperature: float | None = None
) -> Accuracies:
    """Accuracies of p* in closed form (decisions are independent, so per item to the K).

    Per item: base r; temperature r^{1/τ} / (r^{1/τ} + W w^{1/τ}); power r^α / (r^α +
    W w^α m^{−(α−1)L}), since all m^L diffuse stretches after a wrong option together weigh
    m^L · m^{−αL}.
    """
    _check_num_decisions(config, num_decisions)
    check_real("alpha", alpha, "[1, inf)")
    temperature = 1.0 / alpha if temperature is None else temperature
    r, w, k = config.right_prob, config.wrong_prob, num_decisions
    log_wrong = math.log(config.num_wrong) + alpha * math.log(w) - (
        (alpha - 1.0) * config.stretch_length * math.log(config.num_symbols))
    log_power = alpha * math.log(r) - np.logaddexp(alpha * math.log(r), log_wrong)
    power = math.exp(k * log_power)
    return Accuracies(
        base=r**k,
        temperature=float(_tempered_decision_probs(config, temperature)[0] ** k),
        power=power,
        power_lower_bound=power,
        decision_probs=np.tile(config.decision_probs, (k, 1)),
        continuation_probs=np.ones(k),
    )
