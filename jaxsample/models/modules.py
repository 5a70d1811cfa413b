"""Flax Linen modules of the Qwen2 / Llama decoder layer, and rotate-half RoPE.

Parameter names mirror Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`, ...) so the
checkpoint name map is a transpose away. Projection kernels are `[in, out]`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.models.config import Llama3RopeScaling, ModelConfig

Array = jax.Array

# A finite mask value: a fully masked row (never produced by the callers) gives a uniform
# softmax instead of NaN.
_MASKED = float(np.finfo(np.float32).min)


def at_least_float32(dtype) -> np.dtype:
    """The dtype of the numerically sensitive parts (norms, attention scores, logits):
    float32 for float32 / bf16 / f16 models, float64 for float64 ones (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """`[H/2]` float32 inverse frequencies theta^(-2j/H), llama3-remapped when configured.

    Computed in float32 by transformers' formula, but numpy's float32 power rounds
    differently from torch's: some frequencies differ from transformers' in the last bits, by
    up to two float32 ulps (relative 1.5e-7; e.g. 7 of the 32 of Llama-3.2-1B, 14 of the 64
    of Qwen2.5-1.5B), so angles agree to float32 rounding, not bit for bit. Per-dimension
    factors (GGUF `rope_freqs`) divide the frequencies, as llama.cpp applies them.
    """
    inv_freq = rope_base_frequencies(config.head_dim, config.rope_theta)
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    if config.rope_scaling is None:
        return inv_freq
    return llama3_remap(inv_freq, config.rope_scaling)


def rope_base_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """`[H/2]` float32 theta^(-2j/H), before any remap."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (np.float32(theta) ** exponents)


def llama3_remap(inv_freq: np.ndarray, scaling: Llama3RopeScaling) -> np.ndarray:
    """The llama3 remap of `[H/2]` float32 inverse frequencies (transformers' formula)."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = np.float32(2 * np.pi) / inv_freq
    remapped = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * remapped / scaling.factor + smooth * remapped
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, remapped).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE.

    Args:
      x: `[B, T, heads, H]`.
      positions: int32 `[B, T]`.
      inv_freq: float32 `[H/2]`.

    Returns:
      `[B, T, heads, H]` in `x.dtype`; angles are float32 (bf16 cannot hold positions > 256).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def grouped_attention(q: Array, keys: Array, values: Array, mask: Array) -> Array:
    """Softmax attention of N query heads over K kv heads, without repeating K/V.

    Args:
      q: `[B, T, N, H]` (already rotated).
      keys, values: `[B, S, K, H]`.
      mask: bool `[B, T, S]`, True where query t may attend to slot s.

    Returns:
      `[B, T, N, H]` in `q.dtype`; scores and softmax in float32.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv = keys.shape[2]
    # Query head n reads kv head n // G, matching transformers' repeat_kv order.
    q = q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, keys, preferred_element_type=at_least_float32(q.dtype))
    scores = scores * np.float32(head_dim**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, values)
    return out.reshape(batch, length, num_heads, head_dim)


def decode_attention(
    q: Array, keys: Array, values: Array, visible: Array, prefix: tuple[Array, Array, Array] | None = None
) -> Array:
    """Attention of one new token per row over the row's cache slots and, optionally, a
    prefix shared by a group of rows (read once per group, never copied per row).

    Args:
      q: `[B, 1, N, H]` (already rotated).
      keys, values: `[B, K, S, H]`, the rows' own slots (kv heads first, as the cache holds
        them: the batched dots' batch axes B and K lead).
      visible: bool `[B, S]`, the slots each row may read.
      prefix: `(keys [G, K, P, H], values [G, K, P, H], visible bool [G, P])` or None: G
        prefixes, each read by B / G consecutive rows (G = 1: one prefix for every row).

    Returns:
      `[B, 1, N, H]` in `q.dtype`; scores and softmax in float32, one softmax over both parts.
    """
    batch, _, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    q = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    accumulate = at_least_float32(q.dtype)
    scale = np.float32(head_dim**-0.5)
    own = jnp.einsum("bkgh,bksh->bkgs", q, keys, preferred_element_type=accumulate) * scale
    scores = jnp.where(visible[:, None, None, :], own, _MASKED)
    if prefix is not None:
        prefix_keys, prefix_values, prefix_visible = prefix[0].astype(q.dtype), prefix[1].astype(q.dtype), prefix[2]
        groups = prefix_keys.shape[0]
        by_group = lambda x: x.reshape(groups, batch // groups, *x.shape[1:])
        shared = jnp.einsum("crkgh,ckph->crkgp", by_group(q), prefix_keys, preferred_element_type=accumulate)
        shared = jnp.where(prefix_visible[:, None, None, None, :], shared * scale, _MASKED)
        scores = jnp.concatenate([shared.reshape(batch, *shared.shape[2:]), scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    split = 0 if prefix is None else prefix_keys.shape[2]
    out = jnp.einsum("bkgs,bksh->bkgh", probs[..., split:], values, preferred_element_type=accumulate)
    if prefix is not None:
        from_prefix = jnp.einsum("crkgp,ckph->crkgh", by_group(probs[..., :split]), prefix_values,
                                 preferred_element_type=accumulate)
        out = out + from_prefix.reshape(out.shape)
    return out.astype(q.dtype).reshape(batch, 1, num_heads, head_dim)


class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x²) + eps), normalised in float32 and cast back before the gain."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(at_least_float32(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


def _dense(features: int, use_bias: bool, dtype: Any, name: str, accumulate: bool = False) -> nn.Dense:
    """A projection in `dtype`; `accumulate=True` returns its sum over the input features
    unrounded, in `at_least_float32(dtype)`, for `_project` to round once.

    The attention-output and down projections accumulate: a tensor-parallel model axis
    splits their input features (`jaxsample.parallel`), so each device holds a partial sum
    and the all-reduce adds them. Rounded to bf16 per device first, the sum would differ
    from one device's by several bf16 roundings."""
    dot_general = partial(jax.lax.dot_general, preferred_element_type=at_least_float32(dtype)) if accumulate else None
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, dot_general=dot_general, name=name)


def _project(dense: nn.Dense, x: Array, lora: dict | None) -> Array:
    """`dense(x)`, plus the unmerged low-rank update `scaling · (x A) B` when `lora` holds
    this projection (see `jaxsample.models.lora`), in the projection's dtype."""
    y = dense(x)
    if lora is not None and dense.name in lora["weights"]:
        weights = lora["weights"][dense.name]
        update = (x @ weights["lora_A"].astype(x.dtype)) @ weights["lora_B"].astype(x.dtype)
        y = y + (lora["scaling"] * update).astype(y.dtype)
    return y.astype(dense.dtype)


class SelfAttention(nn.Module):
    """GQA self-attention projections (q/k/v/o) with RoPE applied after the bias."""

    config: ModelConfig
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.q_proj = _dense(c.num_attention_heads * c.head_dim, c.qkv_bias, self.param_dtype, "q_proj")
        self.k_proj = _dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.param_dtype, "k_proj")
        self.v_proj = _dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.param_dtype, "v_proj")
        self.o_proj = _dense(c.hidden_size, c.o_bias, self.param_dtype, "o_proj", accumulate=True)

    def project(self, x: Array, positions: Array, lora: dict | None = None) -> tuple[Array, Array, Array]:
        """`x [B, T, D]` → rotated q `[B, T, N, H]`, rotated k and v `[B, T, K, H]`."""
        c = self.config
        batch, length, _ = x.shape
        q = _project(self.q_proj, x, lora).reshape(batch, length, c.num_attention_heads, c.head_dim)
        k = _project(self.k_proj, x, lora).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        v = _project(self.v_proj, x, lora).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        inv_freq = rope_inverse_frequencies(c)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def output(self, attended: Array, lora: dict | None = None) -> Array:
        """`[B, T, N, H]` → `[B, T, D]`."""
        batch, length = attended.shape[:2]
        return _project(self.o_proj, attended.reshape(batch, length, -1), lora)


class GatedMLP(nn.Module):
    """(silu(x Wg) * (x Wu)) Wd."""

    config: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, lora: dict | None = None) -> Array:
        c = self.config
        gate = _project(_dense(c.intermediate_size, c.mlp_bias, self.param_dtype, "gate_proj"), x, lora)
        up = _project(_dense(c.intermediate_size, c.mlp_bias, self.param_dtype, "up_proj"), x, lora)
        down = _dense(c.hidden_size, c.mlp_bias, self.param_dtype, "down_proj", accumulate=True)
        return _project(down, nn.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block. The attention pattern is supplied by the caller.

    `__call__` takes `attend(q, k, v) -> (attended, aux)`, which decides which keys each query
    sees (causal among the new tokens, or a KV cache) and may return auxiliary state (the
    updated cache or the new k/v); this keeps a single definition of the block for the full
    forward, prefill and cached decoding.
    """

    config: ModelConfig
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, self.param_dtype)
        self.self_attn = SelfAttention(c, self.param_dtype)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, self.param_dtype)
        self.mlp = GatedMLP(c, self.param_dtype)

    def __call__(
        self, h: Array, positions: Array, attend=None, lora: dict | None = None, mlp=None
    ) -> tuple[Array, Any]:
        """Args: h `[B, T, D]`; positions int32 `[B, T]`; attend (default: causal); lora:
        this layer's LoRA weights `{"weights": {proj_name: {"lora_A": [in, r], "lora_B":
        [r, out]}}, "scaling": α/r}` or None; mlp: `x -> y` in place of the block's
        `GatedMLP` (which then needs no params), or None.

        Returns:
          (h `[B, T, D]`, aux from `attend`).
        """
        q, k, v = self.self_attn.project(self.input_layernorm(h), positions, lora)
        if attend is None:
            causal = positions[:, :, None] >= positions[:, None, :]
            attended, aux = grouped_attention(q, k, v, causal), (k, v)
        else:
            attended, aux = attend(q, k, v)
        h = h + self.self_attn.output(attended, lora)
        normed = self.post_attention_layernorm(h)
        h = h + (self.mlp(normed, lora) if mlp is None else mlp(normed))
        return h, aux
