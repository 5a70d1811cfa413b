"""LoRA adapters for the Qwen2 / Llama decoder, kept apart from the base params.

An adapter adds a low-rank update to chosen projections: `W x + (α/r) · B(A x)`, A `[in, r]`,
B `[r, out]` (JAX `[in, out]` orientation), per layer, stacked on a leading layer axis (the
layer scan of stacked params reads them alongside; per-layer params take static slices). They run unmerged in the
forward, prefill and decode steps (`lm.with_adapters(adapters)`); `merge` folds them into
the params. `save_adapters` / `load_adapters` use peft's layout: `adapter_model.safetensors`
with keys `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
(A `[r, in]`, B `[out, r]`, torch orientation) and `adapter_config.json`.

    adapters = init_lora(jax.random.key(0), lm.config, rank=8, alpha=16)
    lm = lm.with_adapters(adapters)          # unchanged outputs until B is trained
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxsample.errors import ArgumentError, CheckpointError, ConfigError
from jaxsample.models.config import ModelConfig
from jaxsample.models.layout import is_per_layer

Array = jax.Array

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@struct.dataclass
class LoraAdapters:
    """LoRA weights for every layer of one decoder architecture.

    Attributes:
      weights: `{target: {"lora_A": [L, in, r], "lora_B": [L, r, out]}}` (traced leaves).
      rank: r.
      alpha: α; the update is scaled by α / r.
      config: the `ModelConfig` the adapters were built for.
    """

    weights: dict
    rank: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)
    config: ModelConfig = struct.field(pytree_node=False)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if t in self.weights)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def layer(self, i) -> dict:
        """Layer `i`'s weights in the form `DecoderLayer(..., lora=)` takes."""
        return {"weights": jax.tree.map(lambda x: x[i], self.weights), "scaling": self.scaling}


def projection_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """`(in, out)` features of projection `target` in `config`'s decoder."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }[target]


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ArgumentError(f"LoRA targets must name at least one of {TARGETS}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ArgumentError(f"unknown LoRA target {unknown[0]!r}; allowed targets are {TARGETS}")
    return tuple(t for t in TARGETS if t in targets)


def _check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ArgumentError(f"LoRA rank must be a positive int, got {rank!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ArgumentError(f"LoRA alpha must be a positive finite number, got {alpha!r}")


def init_lora(
    key: Array,
    config: ModelConfig,
    rank: int,
    alpha: float,
    targets=("q_proj", "v_proj"),
    dtype=jnp.float32,
) -> LoraAdapters:
    """Fresh adapters, initialised as peft does: A ~ U(±1/sqrt(in)) (kaiming-uniform with
    a = sqrt(5)), B = 0, so the adapted model equals the base model until B moves.

    Args:
      key: PRNG key.
      config: the decoder's `ModelConfig`.
      rank: r ≥ 1.
      alpha: α > 0 (scaling α / r).
      targets: any of `TARGETS` (q/k/v/o_proj, gate/up/down_proj).
      dtype: the adapters' dtype.
    """
    targets = _check_targets(targets)
    _check_rank_alpha(rank, alpha)
    layers = config.num_hidden_layers
    weights = {}
    for target, target_key in zip(targets, jax.random.split(key, len(targets))):
        fan_in, fan_out = projection_shape(config, target)
        bound = 1.0 / np.sqrt(fan_in)
        weights[target] = {
            "lora_A": jax.random.uniform(target_key, (layers, fan_in, rank), dtype, -bound, bound),
            "lora_B": jnp.zeros((layers, rank, fan_out), dtype),
        }
    return LoraAdapters(weights=weights, rank=int(rank), alpha=float(alpha), config=config)


def check_adapters(adapters: LoraAdapters, config: ModelConfig) -> None:
    """Raises `ArgumentError` unless `adapters` fit `config`'s decoder (called whenever a
    model is given adapters, and by the decoder at trace time)."""
    if not isinstance(adapters, LoraAdapters):
        raise ArgumentError(f"adapters must be jaxsample.models.lora.LoraAdapters, got {type(adapters).__name__}")
    differing = _architecture_differences(adapters.config, config)
    if differing:
        raise ArgumentError(
            "LoRA adapters were built for another model config: "
            + ", ".join(f"{name} {theirs!r} (adapters) vs {ours!r} (model)" for name, theirs, ours in differing)
        )
    _check_targets(tuple(adapters.weights))
    _check_rank_alpha(adapters.rank, adapters.alpha)
    for target, pair in adapters.weights.items():
        fan_in, fan_out = projection_shape(config, target)
        expected = {
            "lora_A": (config.num_hidden_layers, fan_in, adapters.rank),
            "lora_B": (config.num_hidden_layers, adapters.rank, fan_out),
        }
        if set(pair) != set(expected):
            raise ArgumentError(f"LoRA target {target!r} must hold exactly lora_A and lora_B, got {sorted(pair)}")
        for name, shape in expected.items():
            if tuple(pair[name].shape) != shape:
                raise ArgumentError(
                    f"LoRA weight {target}.{name} has shape {tuple(pair[name].shape)}, expected {shape}"
                )


# Special-token ids: `load(..., pad_token_id=...)` or `eos_token_ids=...` change them, not
# the weights an adapter was trained against.
_TOKEN_ID_FIELDS = ("eos_token_ids", "bos_token_id", "pad_token_id")


def _architecture_differences(theirs: ModelConfig, ours: ModelConfig) -> list[tuple[str, Any, Any]]:
    """`(field, theirs, ours)` for every `ModelConfig` field but the token ids that differs."""
    return [
        (field.name, getattr(theirs, field.name), getattr(ours, field.name))
        for field in dataclasses.fields(ModelConfig)
        if field.name not in _TOKEN_ID_FIELDS and getattr(theirs, field.name) != getattr(ours, field.name)
    ]


def merge(params: Any, adapters: LoraAdapters) -> Any:
    """Params (either layer layout) with the adapters folded in: `W + (α/r) A B` for every
    target, every layer."""
    deltas = {target: jnp.einsum("lir,lro->lio", pair["lora_A"], pair["lora_B"]) * adapters.scaling
              for target, pair in adapters.weights.items()}
    if is_per_layer(params):
        layers = tuple(_merged(layer, {t: d[index] for t, d in deltas.items()})
                       for index, layer in enumerate(params["layers"]))
    else:
        layers = _merged(params["layers"], deltas)
    return {**params, "layers": layers}


def _merged(layers: dict, deltas: dict[str, Any]) -> dict:
    """`layers` (one layer's dict or the stacked one) with `deltas[target]` added to each
    target's kernel."""
    layers = dict(layers)
    for target, delta in deltas.items():
        group_name = "self_attn" if target in ATTENTION_TARGETS else "mlp"
        group = dict(layers[group_name])
        kernel = group[target]["kernel"]
        group[target] = {**group[target], "kernel": (kernel + delta).astype(kernel.dtype)}
        layers[group_name] = group
    return layers


def _peft_name(layer: int, target: str, matrix: str) -> str:
    group = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{target}.{matrix}.weight"


def save_adapters(directory: str | os.PathLike, adapters: LoraAdapters, base_model_name_or_path: str | None = None) -> None:
    """Writes `adapter_model.safetensors` + `adapter_config.json` in peft's layout, so
    `peft.PeftModel.from_pretrained(hf_model, directory)` loads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target, pair in adapters.weights.items():
        a, b = np.asarray(pair["lora_A"]), np.asarray(pair["lora_B"])
        for i in range(adapters.config.num_hidden_layers):
            tensors[_peft_name(i, target, "lora_A")] = np.ascontiguousarray(a[i].T)
            tensors[_peft_name(i, target, "lora_B")] = np.ascontiguousarray(b[i].T)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapters.rank,
        "lora_alpha": adapters.alpha,
        "target_modules": list(adapters.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _read_adapter_config(path: Path) -> tuple[int, float, tuple[str, ...]]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read adapter config ({e})") from e
    if d.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    for key, default in unsupported.items():
        if d.get(key) not in (default, None, {}, False):
            raise ConfigError(f"{path}: {key}={d[key]!r} is not supported (expected {default!r})")
    if d.get("bias", "none") != "none":
        raise ConfigError(f"{path}: bias={d['bias']!r} is not supported (expected 'none')")
    targets = d.get("target_modules")
    if not isinstance(targets, list):
        raise ConfigError(f"{path}: target_modules must be a list of projection names, got {targets!r}")
    try:
        targets = _check_targets(targets)
        rank, alpha = d.get("r"), d.get("lora_alpha")
        _check_rank_alpha(rank, alpha if isinstance(alpha, (int, float)) else float("nan"))
    except ArgumentError as e:
        raise ConfigError(f"{path}: {e}") from e
    return int(rank), float(alpha), targets


def load_adapters(directory: str | os.PathLike, config: ModelConfig, dtype=None) -> LoraAdapters:
    """Reads peft-layout adapters from `directory` for `config`'s decoder.

    Raises:
      ConfigError: a missing or unsupported adapter_config.json (DoRA, rsLoRA, patterns, ...).
      CheckpointError: missing, unexpected or mis-shaped tensors, naming them.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {path.name} (not a peft LoRA adapter directory)")
    rank, alpha, targets = _read_adapter_config(config_path)
    layers = config.num_hidden_layers
    expected = {
        _peft_name(i, t, m): (t, m, i) for t in targets for m in ("lora_A", "lora_B") for i in range(layers)
    }
    try:
        with safe_open(str(weights_path), framework="np") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{weights_path}: tensors do not match {CONFIG_FILE} for this model "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            stacks: dict[str, dict[str, list]] = {t: {"lora_A": [None] * layers, "lora_B": [None] * layers} for t in targets}
            for name, (target, matrix, i) in expected.items():
                tensor = f.get_tensor(name)
                fan_in, fan_out = projection_shape(config, target)
                shape = (rank, fan_in) if matrix == "lora_A" else (fan_out, rank)
                if tensor.shape != shape:
                    raise CheckpointError(f"{weights_path}: {name} has shape {tensor.shape}, expected {shape}")
                stacks[target][matrix][i] = tensor.T
    except SafetensorError as e:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({e})") from e
    weights = {
        t: {m: jnp.asarray(np.stack(v), dtype) for m, v in pair.items()} for t, pair in stacks.items()
    }
    return LoraAdapters(weights=weights, rank=rank, alpha=alpha, config=config)
