"""Cut laws: where a Metropolis–Hastings move starts resampling.

A cut law is a pure function of one chain's current trace,

    cut_law(log_p [N], log_q [N], entropy [N], tokens [N], length []) -> log c [N],

returning the normalised log-probability of cutting at each generated position
`0..length-1` and `-inf` elsewhere (N = max_new_tokens; arrays hold zeros / pad after
`length`). The move keeps `tokens[:i]` and resamples from position i on. The law must be a
deterministic function of the trace, because the acceptance ratio evaluates it on both the
current and the proposed trace (`log c(i | x') − log c(i | x)`); any law of this form,
including ones that look at tokens at or after the cut, keeps the target exact.
Laws are vmapped over chains by the kernel. `power_sample` passes a law that is a pytree of
float leaves (`EntropyJump`, a `jax.tree_util.Partial` of float arrays) to `jax.jit` as a
traced argument, so changing β reuses the compiled sampler and β may be traced or vmapped;
any other law (a module-level function, a hashable, value-comparable object) is static.
"""

from __future__ import annotations

from typing import Protocol, Union

import jax
import jax.numpy as jnp
from flax import struct
from jax.tree_util import Partial

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_real

Array = jax.Array


class CutLaw(Protocol):
    """A cut law c(i | x): any callable with this `__call__`, a function (`uniform`) or an
    object (`EntropyJump`). See the module docstring for what makes a law valid."""

    def __call__(self, log_p: Array, log_q: Array, entropy: Array, tokens: Array, length: Array, /) -> Array:
        """log c(· | x) for one chain's trace x (N = max_new_tokens slots; vmapped over chains).

        Args:
          log_p: float `[N]` log p(x_t | x_<t), untempered; 0 after `length`.
          log_q: float `[N]` log q(x_t | x_<t) under the proposal; 0 after `length`.
          entropy: float `[N]` entropy of p(· | x_<t); 0 after `length`.
          tokens: int `[N]` the trace; pad after `length`.
          length: int `[]` generated tokens (a final stop token included), in [0, N]; the
            result is used only when it is ≥ 1 (SMC can hold empty particles).

        Returns:
          float `[N]` (the dtype of `log_p`: float32 in the samplers, float64 in
          `jaxsample.testing`): log c(i | x), normalised over i < `length` (logsumexp 0),
          `-inf` at i ≥ `length`. Must be deterministic in the trace and traceable
          (it runs under `jit` and `vmap`).
        """
        ...


def uniform(log_p: Array, log_q: Array, entropy: Array, tokens: Array, length: Array) -> Array:
    """c(i | x) = 1/n over the n generated positions (Karan & Du)."""
    del log_q, entropy, tokens
    valid = jnp.arange(log_p.shape[-1]) < length
    return jnp.where(valid, -jnp.log(length.astype(log_p.dtype)), -jnp.inf)


@struct.dataclass
class EntropyJump:
    """c(i | x) ∝ max(H_i − H_{i−1}, 0)^β with H_{−1} := 0 (Zhou, Mehrotra & Liu).

    H_i is the entropy of p(· | x_<i), the distribution that produced token i, so the law
    cuts where the model's uncertainty jumps up: at decisions. When no position has a
    positive jump (W = Σ w = 0) it falls back to uniform. H here is the full-vocabulary
    entropy stored by the decoder; Zhou's code uses the top-50-renormalised entropy.

    β is a pytree leaf, traced like α: `power_sample` compiles once for every β, and β may
    be a traced value (`jax.jit(lambda b: power_sample(..., cut=EntropyJump(b)))`). With a
    Python float β the law is also hashable, as `jaxsample.testing` requires.

    Attributes:
      beta: β > 0, the exponent on the entropy jumps (default 4): larger β concentrates
        the cuts on the largest jumps. A float or a float `[]` array (traced).
    """

    beta: float = 4.0

    def __call__(self, log_p, log_q, entropy, tokens, length):
        valid = jnp.arange(entropy.shape[-1]) < length
        previous = jnp.concatenate([jnp.zeros_like(entropy[:1]), entropy[:-1]])
        jump = jnp.where(valid, entropy - previous, 0.0)
        # A traced float64 β (x64) must not promote the float32 MH carry.
        beta = jnp.asarray(self.beta).astype(entropy.dtype)
        # Log space: jump^β underflows float32 for small jumps at β = 4.
        log_w = jnp.where(jump > 0, beta * jnp.log(jnp.where(jump > 0, jump, 1.0)), -jnp.inf)
        log_total = jax.nn.logsumexp(log_w)
        fallback = uniform(log_p, log_q, entropy, tokens, length)
        return jnp.where(jnp.isneginf(log_total), fallback, log_w - log_total)


def entropy_jump(beta: float = 4.0) -> EntropyJump:
    """The entropy-jump cut law with exponent `beta` > 0 (default 4, as in Zhou's code)."""
    check_real("beta", beta, "(0, inf)")
    return EntropyJump(beta if isinstance(beta, jax.core.Tracer) else float(beta))


def resolve_cut_law(cut: Union[str, CutLaw]) -> CutLaw:
    """`"uniform"`, `"entropy"` (β = 4) or a callable cut law → the cut law."""
    if isinstance(cut, str) and cut == "uniform":
        return uniform
    if isinstance(cut, str) and cut == "entropy":
        return entropy_jump()
    if isinstance(cut, EntropyJump):
        return entropy_jump(cut.beta)
    if callable(cut):
        return cut
    raise ArgumentError(f"cut must be 'uniform', 'entropy' or a cut-law function, got {cut!r}")


def as_jit_argument(cut_law: CutLaw) -> CutLaw:
    """The law as a pytree `jax.jit` can take: itself when its leaves are floats (traced),
    else wrapped in a leafless `Partial` (static, hashed like a static argument)."""
    if all(_is_float(leaf) for leaf in jax.tree_util.tree_leaves(cut_law)):
        return cut_law
    return Partial(cut_law)


def _is_float(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return isinstance(leaf, float) or (dtype is not None and jnp.issubdtype(dtype, jnp.floating))
