"""A tiny MDLM-style masked discrete-diffusion LM: bidirectional denoiser, absorbing MASK.

The forward process masks every position of a clean sequence x_0 ∈ {0..V−1}^T independently
with probability t (MDLM's linear schedule α_t = 1 − t); MASK is the extra token id V. The
denoiser reads a partially masked x_t ∈ {0..V}^T and returns, at every position, a law
p_θ(x_0^i | x_t) over the V clean tokens (MDLM's "carry-over": unmasked positions keep their
token; only masked positions are ever read). The reverse process (`sampler.py`) unmasks a
fixed number of positions per step.

The block is the library's `DecoderLayer` (pre-norm, RoPE, gated MLP) with an all-True
attention mask instead of the causal one (a different model class, not a second decoder),
plus learned absolute position embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ConfigError
from jaxsample.models.config import ModelConfig
from jaxsample.models.modules import DecoderLayer, RMSNorm, grouped_attention
from jaxsample.validation import is_int

Array = jax.Array


@dataclass(frozen=True)
class DiffusionConfig:
    """Architecture and sampling schedule (frozen, hashable: a jit static argument).

    Attributes:
      vocab_size: V clean tokens; the MASK token is id V (so embeddings have V + 1 rows).
      seq_len: T, the fixed sequence length.
      num_steps: K unmasking steps, 1 ≤ K ≤ T; step k unmasks
        `floor((k+1) T / K) − floor(k T / K)` positions (`unmask_counts`).
      hidden_size, num_layers, num_heads, head_dim, mlp_size: the bidirectional transformer.
    """

    vocab_size: int
    seq_len: int
    num_steps: int
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    mlp_size: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"DiffusionConfig: {f.name} must be a positive integer, got {value!r}")
        if self.num_steps > self.seq_len:
            raise ConfigError(f"DiffusionConfig: num_steps must lie in [1, seq_len={self.seq_len}], "
                              f"got {self.num_steps}")
        if self.head_dim % 2:
            raise ConfigError(f"DiffusionConfig: head_dim must be even (RoPE), got {self.head_dim}")

    @property
    def mask_id(self) -> int:
        """The MASK token id, V."""
        return self.vocab_size

    @property
    def unmask_counts(self) -> np.ndarray:
        """int `[K]`: positions unmasked at each step (they sum to T)."""
        edges = (np.arange(self.num_steps + 1) * self.seq_len) // self.num_steps
        return np.diff(edges).astype(np.int32)

    def block_config(self) -> ModelConfig:
        """The `ModelConfig` of the shared `DecoderLayer` blocks (Llama layout, V + 1 tokens)."""
        return ModelConfig(model_type="llama", vocab_size=self.vocab_size + 1,
                           hidden_size=self.hidden_size, intermediate_size=self.mlp_size,
                           num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_heads, head_dim=self.head_dim,
                           max_position_embeddings=self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (a checkpoint's config.json)."""
        return dataclasses.asdict(self)


def _bidirectional(q: Array, k: Array, v: Array) -> tuple[Array, None]:
    everywhere = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
    return grouped_attention(q, k, v, everywhere), None


class Denoiser(nn.Module):
    """x_t int32 `[B, T]` in {0..V} → (logits `[B, T, V]` over clean tokens, features `[B, T, D]`)."""

    config: DiffusionConfig

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        c = self.config
        block = c.block_config()
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
        # RoPE is relative only: without absolute positions an all-MASK input would give every
        # position the same output.
        h = (nn.Embed(c.vocab_size + 1, c.hidden_size, name="embed")(tokens)
             + nn.Embed(c.seq_len, c.hidden_size, name="position_embed")(positions))
        for i in range(c.num_layers):
            h, _ = DecoderLayer(block, name=f"layer_{i}")(h, positions, _bidirectional)
        features = RMSNorm(block.rms_norm_eps, name="norm")(h)
        return nn.Dense(c.vocab_size, name="head")(features), features


@flax.struct.dataclass
class MaskedDiffusionLM:
    """A denoiser and its parameters (a pytree: params are traced, the config is static).

    Attributes:
      params: the `Denoiser`'s flax params pytree (float32 from `init_model` / `load`).
      config: its `DiffusionConfig` (static).
    """

    params: Any
    config: DiffusionConfig = flax.struct.field(pytree_node=False)

    def logits_and_features(self, tokens: Array) -> tuple[Array, Array]:
        """tokens int32 `[..., T]` → (log p_θ(x_0^i = v | x_t) `[..., T, V]`, features `[..., T, D]`)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        flat = tokens.reshape(-1, tokens.shape[-1])
        logits, features = Denoiser(self.config).apply({"params": self.params}, flat)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return (log_probs.reshape(*tokens.shape, -1), features.reshape(*tokens.shape, -1))

    def log_probs(self, tokens: Array) -> Array:
        """log p_θ(x_0^i = v | x_t), f32 `[..., T, V]`."""
        return self.logits_and_features(tokens)[0]

    @property
    def feature_size(self) -> int:
        """D, the width of `logits_and_features`' features."""
        return self.config.hidden_size


def init_model(key: Array, config: DiffusionConfig) -> MaskedDiffusionLM:
    """A randomly initialised model (flax default initialisers).

    Args:
      key: PRNG key.
      config: the architecture.

    Returns:
      `MaskedDiffusionLM` with float32 params: embed `[V + 1, D]` (MASK included),
      position_embed `[T, D]`, layer_0 … layer_{L−1}, norm, head (kernel `[D, V]`, bias `[V]`).
    """
    dummy = jnp.full((1, config.seq_len), config.mask_id, jnp.int32)
    params = Denoiser(config).init(key, dummy)["params"]
    return MaskedDiffusionLM(params=params, config=config)


def mdlm_loss(model: MaskedDiffusionLM, key: Array, clean: Array) -> Array:
    """Masked-token cross-entropy at a random noise level: E_t [mean over masked i of −log p_θ(x_0^i | x_t)].

    t ~ U(0, 1), every position masked independently with probability t (MDLM's linear
    schedule). Its minimiser is the exact conditional p(x_0^i | x_t) at every masked position,
    the same as that of MDLM's ELBO E_t [(1/t) Σ_masked −log p_θ]; dropping the 1/t weight (and
    averaging over the masked positions) keeps the gradient's variance low at small t.

    Args:
      clean: int32 `[B, T]` clean sequences.
    Returns:
      f32 `[]`, nats per masked token (batch mean).
    """
    t_key, m_key = jax.random.split(key)
    batch, length = clean.shape
    t = jax.random.uniform(t_key, (batch, 1))
    masked = jax.random.uniform(m_key, (batch, length)) < t
    noisy = jnp.where(masked, model.config.mask_id, clean)
    log_probs = model.log_probs(noisy)
    token_nll = -jnp.take_along_axis(log_probs, clean[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, token_nll, 0.0)) / jnp.maximum(jnp.sum(masked), 1)
