"""`PowerSampleResult`: what power sampling and its baselines return."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.mcmc.kernel import PowerMHInfo

Array = jax.Array


class PowerSampleResult(NamedTuple):
    """Completions of one prompt (C chains, K blocks, S MH steps per block, N tokens).

    Attributes:
      tokens: int32 `[C, N]`; the pad id after the first stop token.
      lengths: int32 `[C]` generated tokens, the stop token included.
      done: bool `[C]` the completion ended with a stop token (else it has N tokens).
      log_p: float32 `[C, N]` base log p of each token (untempered, full vocab); 0 after.
      info: `PowerMHInfo` with leaves `[K, S, C]`, every MH step of every block (baselines:
        K = 1, S = 0); zeros (`non_finite` −1) in the blocks where a chain was frozen.
      active: bool `[K, C]` the chain was still running in block k (not terminated after
        block k − 1's MH steps); inactive chains are frozen and decode nothing.
      tokens_decoded: int32 `[C]` every token sampled for the chain: block extensions and all
        MH proposals, rejected ones included (best-of-N: the candidates within the budget).
        Each MH step also re-decodes one kept token to rewind the cache, not counted here.
    """

    tokens: Array
    lengths: Array
    done: Array
    log_p: Array
    info: PowerMHInfo
    active: Array
    tokens_decoded: Array

    @property
    def log_likelihood(self) -> Array:
        """float32 `[C]` log p(completion | prompt), the stop token's factor included."""
        return jnp.sum(self.log_p, axis=-1)

    @property
    def acceptance_rate(self) -> Array:
        """float32 `[K]` accepted moves / moves made by active chains, per block (NaN for a
        block without moves)."""
        accepted = jnp.sum(self.info.accepted & self.active[:, None, :], axis=(1, 2))
        moves = self.info.accepted.shape[1] * jnp.sum(self.active, axis=1)
        return accepted / moves

    @property
    def accepted_tokens(self) -> Array:
        """int32 `[C]` tokens decoded by accepted proposals."""
        return jnp.sum(jnp.where(self.info.accepted, self.info.tokens_decoded, 0), axis=(0, 1))

    @property
    def rejected_tokens(self) -> Array:
        """int32 `[C]` tokens decoded by rejected proposals (wasted compute)."""
        return jnp.sum(jnp.where(self.info.accepted, 0, self.info.tokens_decoded), axis=(0, 1))
