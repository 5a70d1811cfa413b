"""The Qwen2 / Llama decoder as pure functions over a params pytree, with a KV cache.

Params layout (HF-like names):

    {"embed_tokens": {"embedding": [V, D]},
     "layers": ({"input_layernorm": {"scale": [D]},
                 "self_attn": {"q_proj": {"kernel": [D, N*H], "bias": [N*H]}, ...},
                 "post_attention_layernorm": {"scale": [D]},
                 "mlp": {"gate_proj": {"kernel": [D, F]}, ...}},
                ...),                        # L per-layer dicts (what `load` gives)
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}          # absent when embeddings are tied

or "layers" one dict of the same leaves stacked on a leading `[L, ...]` axis (what
`init_params` gives): `jaxsample.models.layout` says what each costs; every function reads both.

Activations run in the params' dtype; RMSNorm, RoPE angles, attention scores/softmax and
the returned logits are float32 (float64 for float64 params). All public functions are jitted with `config` static
(`apply_layer` and `apply_layer_at_last` pick the layer's weights, then call a jitted function).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_int_array
from jaxsample.models.config import ModelConfig
from jaxsample.models.intervention import Intervention, forward_mask, prefill_mask
from jaxsample.models.layout import layer_params, unstacked_layers
from jaxsample.models.lora import LoraAdapters, check_adapters
from jaxsample.models.modules import DecoderLayer, GatedMLP, RMSNorm, at_least_float32, decode_attention

Array = jax.Array
Params = Any


class KVCache(NamedTuple):
    """Per-row KV cache (all leaves batch-leading; see `jaxsample.lm`).

    Attributes:
      k: `[B, L, K, S, H]` rotated keys, in the activation dtype (S = capacity). The kv heads
        come before the slots so that a layer's `[B, K, S, H]` is what attention's batched
        dots read (batch axes B and K leading): XLA:GPU held transposed copies of the whole
        cache for them when the slots came first.
      v: `[B, L, K, S, H]` values.
      length: int32 `[B]` filled slots per row; slots ≥ length are stale and never read.
    """

    k: Array
    v: Array
    length: Array


def _dtype(params: Params):
    return params["embed_tokens"]["embedding"].dtype


def _layer(config: ModelConfig, params: Params) -> DecoderLayer:
    return DecoderLayer(config, _dtype(params))


def _check_tokens(config: ModelConfig, tokens: Array, ndim: int, what: str) -> None:
    """Shape and dtype checks. The ids are traced here (every caller is jitted), so their range
    `[0, V)` is checked where they are still concrete, by `LanguageModel` (`jaxsample.lm`)."""
    if tokens.ndim != ndim:
        raise ArgumentError(f"{what} must have {ndim} dimensions, got shape {tokens.shape}")
    check_int_array(what, tokens)
    if ndim == 2 and tokens.shape[1] > config.max_position_embeddings:
        raise ArgumentError(
            f"{what} has {tokens.shape[1]} positions; the model supports "
            f"{config.max_position_embeddings} (max_position_embeddings)"
        )


def _module_params(key: Array, config: ModelConfig, dtype) -> Params:
    """Params as the Linen modules initialise them (used for shapes and dtypes only)."""
    embed_key, layers_key, head_key = jax.random.split(key, 3)
    h = jnp.zeros((1, 1, config.hidden_size), dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    layer = DecoderLayer(config, dtype)
    params = {
        "embed_tokens": _embedder(config, dtype).init(embed_key, positions)["params"],
        "layers": jax.vmap(lambda k: layer.init(k, h, positions)["params"])(
            jax.random.split(layers_key, config.num_hidden_layers)
        ),
        "norm": RMSNorm(config.rms_norm_eps, dtype).init(embed_key, h)["params"],
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = _lm_head(config, dtype).init(head_key, h)["params"]
    return params


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: Array, config: ModelConfig, dtype=jnp.float32) -> Params:
    """Random parameters, transformers-style: N(0, 0.02²) projections and embeddings, unit
    norm gains, zero biases.

    All normal draws come from one `jax.random.normal` call: XLA compiles a separate
    threefry kernel per call, ~0.5 s each on CPU, which dominated the init of small models.
    """
    shapes = jax.eval_shape(functools.partial(_module_params, config=config, dtype=dtype), key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    drawn = [leaf for path, leaf in leaves if path[-1].key in ("kernel", "embedding")]
    noise = 0.02 * jax.random.normal(key, (sum(leaf.size for leaf in drawn),), dtype)
    values, offset = [], 0
    for path, leaf in leaves:
        kind = path[-1].key
        if kind in ("kernel", "embedding"):
            values.append(noise[offset : offset + leaf.size].reshape(leaf.shape))
            offset += leaf.size
        else:
            values.append(jnp.full(leaf.shape, 1.0 if kind == "scale" else 0.0, dtype))
    return jax.tree.unflatten(treedef, values)


def _embedder(config: ModelConfig, dtype) -> nn.Embed:
    return nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype)


def _lm_head(config: ModelConfig, dtype) -> nn.Dense:
    return nn.Dense(config.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype)


@functools.partial(jax.jit, static_argnames="config")
def embed(params: Params, config: ModelConfig, tokens: Array) -> Array:
    """Token embeddings: int `[B, T]` → `[B, T, D]` in the params' dtype.

    Ids must lie in `[0, V)`; they are traced here and not checked (`LanguageModel` checks
    concrete ones): a negative id wraps to id V + t, an id ≥ V embeds as NaN."""
    return _embedder(config, _dtype(params)).apply({"params": params["embed_tokens"]}, tokens)


def apply_layer(
    params: Params, config: ModelConfig, i: int | Array, h: Array, positions: Array, adapters: LoraAdapters | None = None
) -> Array:
    """Decoder layer `i` with causal attention among the T positions. `i` is a Python int
    (that layer's weights are read as they are; one compiled program serves every layer) or
    an int array, which may be traced (`layout.layer_params` selects the layer).

    Args:
      h: `[B, T, D]` residual stream entering the layer.
      positions: int32 `[B, T]` or `[T]` RoPE positions (causal order must follow them).
      adapters: LoRA adapters applied unmerged, or None. Interventions are not applied here.

    Returns:
      `[B, T, D]`, the residual stream leaving the layer.
    """
    return _apply_layer(layer_params(config, params, i), config, _dtype(params), i, h, positions, adapters)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _apply_layer(weights: Params, config: ModelConfig, dtype, i: Array, h: Array, positions: Array,
                 adapters: LoraAdapters | None) -> Array:
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), h.shape[:2])
    lora = None if adapters is None else adapters.layer(i)
    out, _ = DecoderLayer(config, dtype).apply({"params": weights}, h, positions, lora=lora)
    return out


def apply_layer_at_last(
    params: Params,
    config: ModelConfig,
    i: Array,
    context: Array,
    last: Array,
    positions: Array,
    adapters: LoraAdapters | None = None,
) -> Array:
    """Decoder layer `i`'s output at the last of T positions, computing only that position
    (`i` as in `apply_layer`).

    Equals `apply_layer(..., concat(context, last))[:, -1]`. The T − 1 earlier positions
    enter only through their keys and values, so a change of `last` (a Jacobian column)
    costs one position's work, not T.

    Args:
      context: `[B, T-1, D]` residual stream of the earlier positions (T − 1 may be 0).
      last: `[B, D]` residual stream at the last position.
      positions: int32 `[B, T]` or `[T]` RoPE positions, the last one the query's.

    Returns:
      `[B, D]`, the residual stream leaving the layer at the last position.
    """
    return _apply_layer_at_last(layer_params(config, params, i), config, _dtype(params), i, context, last,
                                positions, adapters)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _apply_layer_at_last(weights: Params, config: ModelConfig, dtype, i: Array, context: Array, last: Array,
                         positions: Array, adapters: LoraAdapters | None) -> Array:
    batch, length = last.shape[0], context.shape[1] + 1
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, length))
    layer = DecoderLayer(config, dtype)
    weights = {"params": weights}
    lora = None if adapters is None else adapters.layer(i)

    def project(module, h):
        return module.self_attn.project(module.input_layernorm(h), positions[:, :-1], lora)

    _, context_k, context_v = layer.apply(weights, context, method=project)

    def attend(q, k, v):
        keys = jnp.concatenate([context_k, k], axis=1).swapaxes(1, 2)
        values = jnp.concatenate([context_v, v], axis=1).swapaxes(1, 2)
        return decode_attention(q, keys, values, jnp.ones((batch, length), bool)), None

    out, _ = layer.apply(weights, last[:, None], positions[:, -1:], attend, lora=lora)
    return out[:, 0]


@functools.partial(jax.jit, static_argnames="config")
def final_norm(params: Params, config: ModelConfig, h: Array) -> Array:
    """The final RMSNorm: `[..., D]` → the features `[..., D]` in the params' dtype."""
    return RMSNorm(config.rms_norm_eps, _dtype(params)).apply({"params": params["norm"]}, h)


@functools.partial(jax.jit, static_argnames="config")
def unembed(params: Params, config: ModelConfig, features: Array) -> Array:
    """The LM head on final-norm features: `[..., D]` → float32 logits `[..., V]`."""
    dtype = _dtype(params)
    if config.tie_word_embeddings:
        logits = _embedder(config, dtype).apply(
            {"params": params["embed_tokens"]}, features, method=nn.Embed.attend
        )
    else:
        logits = _lm_head(config, dtype).apply({"params": params["lm_head"]}, features)
    return logits.astype(at_least_float32(dtype))


@functools.partial(jax.jit, static_argnames="config")
def final_logits(params: Params, config: ModelConfig, h: Array) -> Array:
    """Final RMSNorm and LM head: `[..., D]` → float32 logits `[..., V]`."""
    return unembed(params, config, final_norm(params, config, h))


def _check_hooks(config: ModelConfig, adapters, intervention) -> None:
    if adapters is not None:
        check_adapters(adapters, config)
    if intervention is not None:
        intervention.check(config.num_hidden_layers)


def _causal_layers(
    params: Params,
    config: ModelConfig,
    h: Array,
    positions: Array,
    keep_kv: bool,
    adapters: LoraAdapters | None = None,
    intervention: Intervention | None = None,
    edit_mask: Array | None = None,
    keep_outputs: bool = False,
):
    """All layers with causal attention among the T tokens.

    Returns `(h, (kv, outputs))`: kv stacks the layers' k/v when `keep_kv`, outputs stacks
    every block's (edited) output `[L, B, T, D]` when `keep_outputs`; otherwise None.
    """
    _check_hooks(config, adapters, intervention)
    layer = _layer(config, params)
    unstacked = unstacked_layers(config, params)
    xs = {} if unstacked is not None else {"params": params["layers"]}
    if adapters is not None:
        xs["lora"] = adapters.weights
    if intervention is not None:
        xs["index"] = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)

    def body(state, x):
        h, carry = state
        lora = None if adapters is None else {"weights": x["lora"], "scaling": adapters.scaling}
        out, kv = layer.apply({"params": x["params"]}, h, positions, lora=lora)
        if intervention is not None:
            out, carry = intervention.apply(x["index"], h, out, edit_mask, carry)
        return (out, carry), (kv if keep_kv else None, out if keep_outputs else None)

    carry = None if intervention is None else intervention.init_carry(h)
    (h, _), stacked = _over_layers(body, (h, carry), xs, unstacked)
    return h, stacked


def _over_layers(body, state, xs, unstacked):
    """`lax.scan(body, state, xs)` over stacked layers, or, for per-layer params
    (`unstacked`), the layers one after another in the program, layer l's `x` the static
    slices `xs[l]` and its own `unstacked[l]` as `x["params"]`. Returns
    `(state, ys stacked [L, ...])`."""
    if unstacked is None:
        return jax.lax.scan(body, state, xs)
    ys = []
    for index, params in enumerate(unstacked):
        x = {**jax.tree.map(lambda leaf: leaf[index], xs), "params": params}
        state, y = body(state, x)
        ys.append(y)
    return state, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)


FORWARD_OUTPUTS = ("logits", "features", "logits_and_features", "hidden_states")


@functools.partial(jax.jit, static_argnames=("config", "output"))
def forward(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    adapters: LoraAdapters | None = None,
    intervention: Intervention | None = None,
    intervene_from: Array | None = None,
    select: Array | None = None,
    output: str = "logits",
):
    """Full causal forward of int `[B, T]` tokens.

    Args:
      adapters: LoRA adapters applied unmerged, or None.
      intervention: residual-stream edit, or None; with `positions="last"` it applies from
        position `intervene_from` (int32 `[B]`, default T − 1) on.
      select: int32 `[B, M]` positions whose logits / features are returned (default all T).
      output: `"logits"` → float32 `[B, T, V]`; `"features"` → float32 `[B, T, D]`, the
        final-norm hidden states; `"logits_and_features"` → both from the one forward;
        `"hidden_states"` → float32 `[L+1, B, T, D]`, the embedding output and every block's
        output (after the intervention's edit, if any).
    """
    _check_tokens(config, tokens, 2, "tokens")
    if output not in FORWARD_OUTPUTS:
        raise ArgumentError(f"output must be one of {FORWARD_OUTPUTS}, got {output!r}")
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    edit_mask = None if intervention is None else forward_mask(intervention, positions, intervene_from)
    h0 = embed(params, config, tokens)
    keep_outputs = output == "hidden_states"
    h, (_, outputs) = _causal_layers(
        params, config, h0, positions, False, adapters, intervention, edit_mask, keep_outputs
    )
    if keep_outputs:
        return jnp.concatenate([h0[None], outputs]).astype(at_least_float32(h0.dtype))
    if select is not None:
        h = jnp.take_along_axis(h, jnp.asarray(select, jnp.int32)[:, :, None], axis=1)
    features = final_norm(params, config, h)
    if output == "features":
        return features.astype(at_least_float32(features.dtype))
    logits = unembed(params, config, features)
    if output == "logits":
        return logits
    return logits, features.astype(at_least_float32(features.dtype))


def init_cache(config: ModelConfig, batch_size: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `batch_size` rows with `capacity` slots, k/v in `dtype`."""
    batch_size = check_int("batch_size", batch_size, 1)
    capacity = check_int("capacity", capacity, 1, config.max_position_embeddings)
    shape = (
        batch_size,
        config.num_hidden_layers,
        config.num_key_value_heads,
        capacity,
        config.head_dim,
    )
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch_size,), jnp.int32)
    )


def _check_cache(cache: KVCache, batch: int, what: str) -> None:
    if cache.k.shape[0] != batch:
        raise ArgumentError(f"{what} has {batch} rows but the cache has {cache.k.shape[0]}")


@functools.partial(jax.jit, static_argnames=("config", "with_features"))
def prefill(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    lengths: Array,
    cache: KVCache,
    adapters: LoraAdapters | None = None,
    intervention: Intervention | None = None,
    with_features: bool = False,
):
    """Writes right-padded prompts into slots `0..T-1` of every row.

    Args:
      tokens: int `[B, T]` prompts, right-padded (any pad ids in `[0, V)`: they are never read).
      lengths: int `[B]` real prompt lengths, each in `[1, T]`.
      cache: a cache from `init_cache` with capacity ≥ T (its previous content is replaced).
      adapters, intervention: as in `forward` (`"last"` edits each row's last real token).
      with_features: also return the final-norm hidden state of each row's last real token.

    Returns:
      (float32 `[B, V]` logits of the token after each row's last real token, [float32
      `[B, D]` features,] the cache with `length = lengths`); both NaN for rows whose length
      is outside `[1, T]`.
    """
    _check_tokens(config, tokens, 2, "prompt tokens")
    batch, length = tokens.shape
    _check_cache(cache, batch, "prompt tokens")
    if length > cache.k.shape[3]:
        raise ArgumentError(f"prompt length {length} exceeds the cache capacity {cache.k.shape[3]}")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
        raise ArgumentError(
            f"lengths must have shape [B] = ({batch},) for prompt tokens of shape {tokens.shape}, "
            f"got {lengths.shape}"
        )
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    edit_mask = None if intervention is None else prefill_mask(intervention, positions, lengths)
    h, ((k, v), _) = _causal_layers(
        params, config, embed(params, config, tokens), positions, True, adapters, intervention, edit_mask
    )
    # The layers stack k/v as [L, B, T, K, H]; the cache is [B, L, K, S, H].
    k_cache = jax.lax.dynamic_update_slice(cache.k, k.transpose(1, 0, 3, 2, 4).astype(cache.k.dtype), (0,) * 5)
    v_cache = jax.lax.dynamic_update_slice(cache.v, v.transpose(1, 0, 3, 2, 4).astype(cache.v.dtype), (0,) * 5)
    valid = (lengths >= 1) & (lengths <= length)
    last = jnp.take_along_axis(h, jnp.clip(lengths - 1, 0, length - 1)[:, None, None], axis=1)
    features = final_norm(params, config, last[:, 0])
    logits = jnp.where(valid[:, None], unembed(params, config, features), jnp.nan)
    features = jnp.where(valid[:, None], features, jnp.nan)
    if with_features:
        return logits, features.astype(at_least_float32(features.dtype)), KVCache(k_cache, v_cache, lengths)
    return logits, KVCache(k_cache, v_cache, lengths)


_NARROWEST_WIDTH = 64


def filled_widths(capacity: int) -> tuple[int, ...]:
    """The attention widths a decode step picks from, widest first: the capacity, then the
    powers of two below it down to 64 (none for a capacity ≤ 64). Each is one compiled
    branch; a step attends over the narrowest that holds every row's filled slots, so early
    steps of a long generation do not read the empty end of the cache."""
    widths = [capacity]
    while widths[-1] > _NARROWEST_WIDTH:
        # The largest power of two below the last width: ≥ 64, since that width is > 64.
        widths.append(1 << (widths[-1] - 1).bit_length() - 1)
    return tuple(widths)


# A step reads its whole cache when that costs at most this fraction of its weight read.
CAPACITY_READ_FRACTION = 0.125


def target_platform() -> str:
    """The platform the decode step is traced for ("cpu", "gpu", "tpu"): that of
    `jax.default_device` when one is set, else JAX's default backend. A compile-only device
    (`jax.experimental.topologies`) set as the default device thus traces the step as it
    would be traced on that hardware."""
    device = jax.config.jax_default_device
    if isinstance(device, str):
        return jax.devices(device)[0].platform
    return jax.default_backend() if device is None else device.platform


def attention_widths(params: Params, cache: KVCache, attend_over_capacity: bool | None) -> tuple[int, ...]:
    """The widths `decode_step` picks from: `filled_widths`, or the capacity alone with
    `attend_over_capacity` (None: on a GPU, when reading the whole cache's K and V costs
    at most `CAPACITY_READ_FRACTION` of reading the weights). Picking among several is a
    `conditional` per layer, which XLA:GPU runs by copying the branch index to the host and
    waiting for the device (`ConditionalThunk`): a sync per layer and step, after which the
    device idles while the host launches the next kernels. Other backends' conditionals
    cost nothing of the kind (on XLA:CPU, SmolLM2 at batch 8 and 96 slots decodes 3-5%
    slower reading them all, `results/bench_decode_smollm2_cpu_widths.json`)."""
    capacity = cache.k.shape[3]
    if attend_over_capacity is None:
        cache_bytes = 2 * cache.k.size * cache.k.dtype.itemsize
        weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
        attend_over_capacity = (target_platform() == "gpu"
                                and cache_bytes <= CAPACITY_READ_FRACTION * weight_bytes)
    return (capacity,) if attend_over_capacity else filled_widths(capacity)


# XLA:CPU copies a dynamic slice of the stacked layer weights before a matmul reads it.
# Copied and read in slices of at most this size, the MLP's weights stay in the core's cache
# between the copy and the matmul. Chosen from decode-step sweeps of 1-32 blocks at the
# SmolLM2 and Qwen2.5-0.5B shapes (README, Benchmarks); `bench_layer_weights.py --blocks`
# times other block counts.
CPU_MLP_SLICE_BYTES = 2 * 2**20


def default_mlp_chunks(hidden_size: int, intermediate_size: int, dtype) -> int:
    """How many column blocks of the intermediate features `decode_step` runs its MLP in by
    default: on CPU the fewest blocks that divide the intermediate size with each block's
    slice of a weight matrix within `CPU_MLP_SLICE_BYTES`; elsewhere 1 (whether XLA:GPU
    copies the slices is what `bench_layer_weights` measures there, and many small matmuls
    cost launches). A tensor-parallel model axis splits the same features, so
    `parallel.shard_model` binds 1 block (`DecodeStep.mlp_chunks`) when it splits them."""
    if target_platform() != "cpu":
        return 1
    column_bytes = hidden_size * jnp.dtype(dtype).itemsize
    fitting = (c for c in range(1, intermediate_size + 1)
               if intermediate_size % c == 0 and intermediate_size // c * column_bytes <= CPU_MLP_SLICE_BYTES)
    return next(fitting, intermediate_size)


def _chunked_mlp(config: ModelConfig, params: Params, layer: Array, lora: dict | None, chunks: int):
    """Layer `layer`'s MLP as `x -> Σ_c GatedMLP_c(x)` over `chunks` blocks of the intermediate
    features, each block's weights sliced straight from the stacked `[L, ...]` params in
    turn, so that at most one block's slices exist at a time (XLA copies each slice; the
    whole layer's gate, up and down slices would all be live together, 777 MiB at the 7B
    shape in float32). The output is summed in float32 (float64 for float64 params)."""
    width = config.intermediate_size // chunks
    block = GatedMLP(dataclasses.replace(config, intermediate_size=width), _dtype(params))
    stacked = params["layers"]["mlp"]

    def block_params(c):
        start, sliced = c * width, {}
        for name in ("gate_proj", "up_proj"):
            weights = stacked[name]
            sliced[name] = {"kernel": jax.lax.dynamic_slice(
                weights["kernel"], (layer, 0, start), (1, config.hidden_size, width))[0]}
            if "bias" in weights:
                sliced[name]["bias"] = jax.lax.dynamic_slice(weights["bias"], (layer, start), (1, width))[0]
        weights = stacked["down_proj"]
        sliced["down_proj"] = {"kernel": jax.lax.dynamic_slice(
            weights["kernel"], (layer, start, 0), (1, width, config.hidden_size))[0]}
        if "bias" in weights:
            # The down bias is added once, with the first block.
            sliced["down_proj"]["bias"] = jnp.where(c == 0, weights["bias"][layer], 0)
        return sliced

    def block_lora(c):
        if lora is None:
            return None
        start, weights = c * width, dict(lora["weights"])
        for name in ("gate_proj", "up_proj"):
            if name in weights:
                lora_b = jax.lax.dynamic_slice_in_dim(weights[name]["lora_B"], start, width, 1)
                weights[name] = {"lora_A": weights[name]["lora_A"], "lora_B": lora_b}
        if "down_proj" in weights:
            lora_a = jax.lax.dynamic_slice_in_dim(weights["down_proj"]["lora_A"], start, width, 0)
            weights["down_proj"] = {"lora_A": lora_a, "lora_B": weights["down_proj"]["lora_B"]}
        return {"weights": weights, "scaling": lora["scaling"]}

    def mlp(x):
        def add_block(c, total):
            return total + block.apply({"params": block_params(c)}, x, block_lora(c)).astype(total.dtype)

        total = jax.lax.fori_loop(0, chunks, add_block, jnp.zeros(x.shape, at_least_float32(x.dtype)))
        return total.astype(x.dtype)

    return mlp


@functools.partial(jax.jit, static_argnames=("config", "with_features", "mlp_chunks", "attend_over_capacity"))
def decode_step(
    params: Params,
    config: ModelConfig,
    tokens: Array,
    cache: KVCache,
    adapters: LoraAdapters | None = None,
    intervention: Intervention | None = None,
    with_features: bool = False,
    prefix: KVCache | None = None,
    mlp_chunks: int | None = None,
    attend_over_capacity: bool | None = None,
):
    """Appends one token per row at slot `cache.length` and returns the next-token logits.

    Rows write at their own slot (a per-row scatter into the cache carried through the
    layer scan, which XLA updates in place), so rows may have any lengths, e.g. after
    rewinding some of them with `cache._replace(length=shorter)`. Attention reads the
    narrowest of `attention_widths` that holds every row's filled slots.

    Args:
      tokens: int `[B]`.
      cache: `KVCache` with B rows.
      adapters, intervention: as in `forward` (the fed token is edited for either positions).
      with_features: also return the final-norm hidden state at the fed token.
      prefix: a `KVCache` of G rows (prompts prefilled once), or None. Rows
        `g·B/G … (g+1)·B/G − 1` continue prefix row g (G divides B; G = 1: one prompt for
        every row): its `length[g]` slots come before each of those rows' own, so their slot s
        holds position `prefix.length[g] + s`, and they attend to it without a copy of it.
      mlp_chunks: run each MLP of stacked params in this many blocks of the intermediate
        features (a divisor of `intermediate_size`); None: `default_mlp_chunks`, 1 except on
        CPU. Per-layer params run each MLP whole (None or 1).
      attend_over_capacity: attend over every slot (masked) instead of the narrowest of
        `filled_widths` that holds the rows' filled ones; None: on a GPU when the whole
        cache is cheap to read beside the weights (`attention_widths`). Same results.

    Returns:
      (float32 `[B, V]` logits, [float32 `[B, D]` features,] the cache with `length + 1`).
      A row already at capacity has its write dropped and gets NaN logits: callers must bound
      lengths by the capacity.
    """
    _check_tokens(config, tokens, 1, "decode tokens")
    batch = tokens.shape[0]
    _check_cache(cache, batch, "decode tokens")
    _check_hooks(config, adapters, intervention)
    capacity = cache.k.shape[3]
    slots = cache.length
    rows = jnp.arange(batch)
    visible = jnp.arange(capacity)[None, :] <= slots[:, None]  # [B, S]
    offset = jnp.int32(0) if prefix is None else jnp.repeat(prefix.length, batch // prefix.k.shape[0])  # [B]
    prefix_visible = None if prefix is None else jnp.arange(prefix.k.shape[3]) < prefix.length[:, None]  # [G, P]
    layer = _layer(config, params)
    unstacked = unstacked_layers(config, params)
    if unstacked is not None and mlp_chunks not in (None, 1):
        raise ArgumentError(f"per-layer params run each MLP whole (mlp_chunks None or 1), got mlp_chunks={mlp_chunks}")
    chunks = 1 if unstacked is not None else _check_mlp_chunks(config, params, mlp_chunks)

    widths = attention_widths(params, cache, attend_over_capacity)
    # Attend over the narrowest width that holds every row's slots: the rest are empty.
    width_index = jnp.sum(jnp.asarray(widths) > jnp.max(slots)) - 1

    def body(state, x):
        h, k_all, v_all, i, carry = state
        lora = None if adapters is None else {"weights": x["lora"], "scaling": adapters.scaling}
        shared = None if prefix is None else (x["prefix_k"], x["prefix_v"], prefix_visible)

        def attend_within(width):
            def attend_slots(q, k_new, v_new):
                window = (batch, 1, k_new.shape[2], width, k_new.shape[4])
                # Start indices share i's dtype: Python ints become int64 under x64.
                zero = jnp.zeros((), i.dtype)
                start = (zero, i, zero, zero, zero)
                keys = jax.lax.dynamic_slice(k_new, start, window)[:, 0]
                values = jax.lax.dynamic_slice(v_new, start, window)[:, 0]
                return decode_attention(q, keys, values, visible[:, :width], shared)

            return attend_slots

        def attend(q, k, v):
            # The write stays outside the width branches, so the cache is updated in place.
            # Row b writes [K, H] at [b, i, :, slots[b]].
            k_new = k_all.at[rows, i, :, slots].set(k[:, 0].astype(k_all.dtype), mode="drop")
            v_new = v_all.at[rows, i, :, slots].set(v[:, 0].astype(v_all.dtype), mode="drop")
            attended = jax.lax.switch(width_index, [attend_within(w) for w in widths], q, k_new, v_new)
            return attended, (k_new, v_new)

        mlp = None if chunks == 1 else _chunked_mlp(config, params, i, lora, chunks)
        out, (k_all, v_all) = layer.apply({"params": x["params"]}, h, (offset + slots)[:, None], attend, lora=lora, mlp=mlp)
        if intervention is not None:
            out, carry = intervention.apply(i, h, out, jnp.ones((batch, 1), bool), carry)
        return (out, k_all, v_all, i + 1, carry), None

    # The chunked MLP slices its weights itself: the scan must not copy them whole.
    xs = {} if unstacked is not None else {
        "params": params["layers"] if chunks == 1 else {k: v for k, v in params["layers"].items() if k != "mlp"}}
    if adapters is not None:
        xs["lora"] = adapters.weights
    if prefix is not None:
        xs["prefix_k"], xs["prefix_v"] = jnp.moveaxis(prefix.k, 1, 0), jnp.moveaxis(prefix.v, 1, 0)
    h = embed(params, config, tokens[:, None])
    carry = None if intervention is None else intervention.init_carry(h)
    (h, k_all, v_all, _, _), _ = _over_layers(body, (h, cache.k, cache.v, jnp.int32(0), carry), xs, unstacked)
    features = final_norm(params, config, h[:, 0])
    logits = jnp.where((slots < capacity)[:, None], unembed(params, config, features), jnp.nan)
    if with_features:
        return logits, features.astype(at_least_float32(features.dtype)), KVCache(k_all, v_all, slots + 1)
    return logits, KVCache(k_all, v_all, slots + 1)


def _check_mlp_chunks(config: ModelConfig, params: Params, chunks: int | None) -> int:
    if chunks is None:
        return default_mlp_chunks(config.hidden_size, config.intermediate_size, _dtype(params))
    chunks = check_int("mlp_chunks", chunks, minimum=1)
    if config.intermediate_size % chunks:
        raise ArgumentError(
            f"mlp_chunks must be a positive divisor of intermediate_size ({config.intermediate_size}), got {chunks}"
        )
    return chunks


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """`decode_step` with the config and its options bound, for `LanguageModel.decode_fn`.
    Equal for equal fields, so models of one architecture share compiled programs. E.g.
    `lm.replace(decode_fn=DecodeStep(lm.config, mlp_chunks=1))` decodes every MLP whole.

    Attributes:
      config: the architecture.
      mlp_chunks: blocks of the intermediate features each MLP runs in (a divisor of
        `intermediate_size`); None: `default_mlp_chunks` (1 except on CPU).
      attend_over_capacity: attend over every cache slot; None: `attention_widths`' rule.
    """

    config: ModelConfig
    mlp_chunks: int | None = None
    attend_over_capacity: bool | None = None

    def __call__(self, params: Params, *args, **kwargs):
        return decode_step(params, self.config, *args, mlp_chunks=self.mlp_chunks,
                           attend_over_capacity=self.attend_over_capacity, **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerFunctions:
    """The decoder's per-layer functions with the config bound, for `LanguageModel`
    (`lm.embed`, `lm.apply_layer`, `lm.final_logits`, `lm.num_layers`, `lm.hidden_size`).
    Equal for equal configs, so models of one architecture share compiled programs."""

    config: ModelConfig

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed(self, params: Params, tokens: Array) -> Array:
        return embed(params, self.config, tokens)

    def apply_layer(self, params: Params, adapters, i: Array, h: Array, positions: Array) -> Array:
        return apply_layer(params, self.config, i, h, positions, adapters)

    def apply_layer_at_last(self, params: Params, adapters, i: Array, context: Array, last: Array, positions: Array) -> Array:
        return apply_layer_at_last(params, self.config, i, context, last, positions, adapters)

    def final_logits(self, params: Params, h: Array) -> Array:
        return final_logits(params, self.config, h)

    def check_adapters(self, adapters) -> None:
        check_adapters(adapters, self.config)
