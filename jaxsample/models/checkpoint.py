"""Hugging Face tensor layout ↔ decoder params, and safetensors checkpoints.

`assemble_params` is shared by every source (safetensors directories, GGUF files): it takes
tensors under their Hugging Face names and layout (`[out, in]` projections), checks the set
of names, every shape and every dtype against `jax.eval_shape(init_params)`, and builds the
per-layer params pytree. Any mismatch is a `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxsample.errors import ArgumentError, CheckpointError, ConfigError
from jaxsample.models.config import ModelConfig
from jaxsample.models.decoder import init_params
from jaxsample.models.layout import unstacked_layers

# safetensors dtype names the port reads; anything else (ints, float8, ...) is an error.
SUPPORTED_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16)}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A checkpoint tensor under its Hugging Face name, read lazily.

    Attributes:
      name: Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
      shape: shape in Hugging Face layout.
      dtype: safetensors dtype name (`F32`, `BF16`, ...).
      file: the file holding it (for error messages).
      read: returns the array (Hugging Face layout).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    read: Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Slot:
    path: tuple[str, ...]  # params path
    layer: int | None  # the layer it belongs to
    transpose: bool  # HF [out, in] ↔ JAX [in, out]
    hf_shape: tuple[int, ...]


def hf_layout(config: ModelConfig) -> dict[str, _Slot]:
    """Maps every Hugging Face tensor name of `config`'s model to its place in the params
    (the path of its stacked leaf and its layer)."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    layout: dict[str, _Slot] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        path = tuple(k.key for k in key_path)
        transpose = path[-1] == "kernel"
        suffix = "bias" if path[-1] == "bias" else "weight"
        module = ".".join(path[:-1])
        prefix = "" if path[0] == "lm_head" else "model."
        if path[0] == "layers":
            shape = tuple(leaf.shape[1:])
            hf_shape = shape[::-1] if transpose else shape
            for i in range(config.num_hidden_layers):
                name = f"model.layers.{i}.{'.'.join(path[1:-1])}.{suffix}"
                layout[name] = _Slot(path, i, transpose, hf_shape)
        else:
            shape = tuple(leaf.shape)
            layout[f"{prefix}{module}.{suffix}"] = _Slot(path, None, transpose, shape[::-1] if transpose else shape)
    return layout


_TIED_HEAD = "lm_head.weight"


def _ignored(name: str, config: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES):
        return True
    # Older tied checkpoints still carry lm_head.weight; it is checked against the embedding.
    return config.tie_word_embeddings and name == _TIED_HEAD


def _check_tied_head(entries: dict[str, TensorEntry], embedding: np.ndarray) -> None:
    """A tied checkpoint's stored lm_head must be its embedding: transformers unties a
    differing one and uses it, so dropping it would silently change the model."""
    head = entries.get(_TIED_HEAD)
    if head is None:
        return
    if tuple(head.shape) != embedding.shape or not np.array_equal(_read(head), embedding):
        raise CheckpointError(
            f"{head.file}: config.json ties the word embeddings, but the checkpoint's {_TIED_HEAD!r} "
            "differs from 'model.embed_tokens.weight' (transformers would not tie them and would use "
            "lm_head); set \"tie_word_embeddings\": false in config.json to load it as an untied head"
        )


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_dtype(dtype: Any) -> np.dtype | None:
    """`None` or the parameter dtype as a numpy dtype; raises unless float32/float16/bfloat16."""
    if dtype is None:
        return None
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in SUPPORTED_DTYPES.values():
        raise ArgumentError(f"dtype must be one of 'float32', 'float16', 'bfloat16', got {dtype!r}")
    return resolved


def _check_finite(array: np.ndarray, name: str, file: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CheckpointError(
            f"{file}: tensor {name!r} holds {int(bad.sum())} non-finite value(s) (NaN or inf; "
            f"first {array[first]} at index {first}) after the cast to {array.dtype}; the "
            "checkpoint is corrupt (load(..., check_finite=False) skips this check)"
        )


def assemble_params(
    config: ModelConfig,
    entries: Iterable[TensorEntry],
    dtype: Any = None,
    source: str = "",
    check_finite: bool = True,
) -> dict:
    """Builds the params pytree, per-layer layout (`jaxsample.models.layout`), from Hugging
    Face-named tensors, strictly.

    Args:
      config: the model's configuration.
      entries: every tensor the checkpoint holds.
      dtype: target dtype; `None` keeps the checkpoint's (that of the token embedding).
      source: checkpoint path, named in errors about missing tensors.
      check_finite: refuse a tensor holding NaN or inf after the cast to `dtype`.

    Raises:
      ArgumentError: `dtype` is not float32, float16 or bfloat16.
      CheckpointError: a missing, unexpected, mis-shaped, unsupported-dtype or (with
        `check_finite`) non-finite tensor.
    """
    dtype = check_dtype(dtype)
    layout = hf_layout(config)
    by_name: dict[str, TensorEntry] = {}
    ignored: dict[str, TensorEntry] = {}
    for entry in entries:
        if _ignored(entry.name, config):
            ignored[entry.name] = entry
            continue
        if entry.name not in layout:
            raise CheckpointError(
                f"{entry.file}: unexpected tensor {entry.name!r} (shape {entry.shape}) for a "
                f"{config.model_type} model with {config.num_hidden_layers} layers"
            )
        by_name[entry.name] = entry
    missing = set(layout) - set(by_name)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_listing(missing)}")
    for name, slot in layout.items():
        entry = by_name[name]
        if tuple(entry.shape) != slot.hf_shape:
            raise CheckpointError(
                f"{entry.file}: tensor {name!r} has shape {tuple(entry.shape)}, expected "
                f"{slot.hf_shape} from the config"
            )
        if entry.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"{entry.file}: tensor {name!r} has unsupported dtype {entry.dtype}; supported: "
                f"{sorted(SUPPORTED_DTYPES)}"
            )
    embed_name = "model.embed_tokens.weight"
    target = dtype if dtype is not None else SUPPORTED_DTYPES[by_name[embed_name].dtype]

    params: dict = {"layers": tuple({} for _ in range(config.num_hidden_layers))}
    for name, slot in layout.items():
        entry = by_name[name]
        array = _read(entry)
        if slot.transpose:
            array = array.T
        with np.errstate(over="ignore"):  # overflow in the cast is reported by check_finite
            array = np.ascontiguousarray(array, dtype=target)
        if check_finite:
            _check_finite(array, name, entry.file)
        if name == embed_name:
            _check_tied_head(ignored, array)
        path = _params_path(slot, per_layer=True)
        node = params
        for key in path[:-1]:
            node = node[key] if isinstance(key, int) else node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array)
    return params


def _params_path(slot: _Slot, per_layer: bool) -> tuple:
    """Where `slot`'s tensor lives in the params: `("layers", l, ...)` for per-layer params,
    `("layers", ...)` (index `slot.layer` of the leaf) for stacked ones."""
    if slot.layer is None or not per_layer:
        return slot.path
    return (slot.path[0], slot.layer) + slot.path[1:]


def _read(entry: TensorEntry) -> np.ndarray:
    try:
        array = entry.read()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{entry.file}: cannot read tensor {entry.name!r}: {e}") from e
    if tuple(array.shape) != tuple(entry.shape):
        raise CheckpointError(
            f"{entry.file}: tensor {entry.name!r} read with shape {array.shape}, header says {entry.shape}"
        )
    return array


def read_json(path: Path) -> Any:
    """Parses a JSON file; malformed JSON is a `ConfigError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e


def _safetensors_entries(path: Path) -> list[TensorEntry]:
    try:
        with safe_open(path, framework="np") as f:
            headers = [(name, f.get_slice(name)) for name in f.keys()]
            headers = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in headers]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e

    def reader(name: str) -> Callable[[], np.ndarray]:
        def read():
            with safe_open(path, framework="np") as f:
                return f.get_tensor(name)

        return read

    return [TensorEntry(name, shape, dtype, str(path), reader(name)) for name, shape, dtype in headers]


def safetensors_entries(directory: Path) -> tuple[list[TensorEntry], str]:
    """Every tensor of a Hugging Face directory (single file or sharded), and its source name.

    A folder holding both `model.safetensors` and an index (a re-save with the other
    sharding leaves the old files behind) is read as transformers reads it: the single file,
    with a warning naming the index it ignores.
    """
    index_path = directory / "model.safetensors.index.json"
    single_path = directory / "model.safetensors"
    if single_path.exists():
        if index_path.exists():
            warnings.warn(
                f"{directory} holds both model.safetensors and {index_path.name}; reading "
                "model.safetensors as transformers does (remove the stale one to silence this)",
                stacklevel=2,
            )
        return _safetensors_entries(single_path), str(single_path)
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
        entries: list[TensorEntry] = []
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index_path}: shard {shard!r} does not exist in {directory}")
            shard_entries = _safetensors_entries(shard_path)
            held = {e.name for e in shard_entries}
            listed = {name for name, s in weight_map.items() if s == shard}
            if listed - held:
                raise CheckpointError(
                    f"{shard_path}: tensors listed in {index_path.name} are absent: {_listing(listed - held)}"
                )
            entries.extend(shard_entries)
        return entries, str(index_path)
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def to_hf_tensors(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """The params (either layer layout) as Hugging Face-named numpy arrays (`[out, in]`
    projections)."""
    per_layer = unstacked_layers(config, params) is not None
    tensors = {}
    for name, slot in hf_layout(config).items():
        leaf = params
        for key in _params_path(slot, per_layer):
            leaf = leaf[key]
        array = np.asarray(leaf if slot.layer is None or per_layer else leaf[slot.layer])
        tensors[name] = np.ascontiguousarray(array.T if slot.transpose else array)
    return tensors


def save_pretrained(params: dict, config: ModelConfig, directory: str | os.PathLike, tokenizer=None) -> None:
    """Writes config.json, generation_config.json and model.safetensors (+ tokenizer files).

    The directory loads with `jaxsample.models.load` and with transformers'
    `AutoModelForCausalLM.from_pretrained`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(params, config)
    dtype = tensors["model.embed_tokens.weight"].dtype
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = {np.dtype(jnp.bfloat16): "bfloat16"}.get(dtype, str(dtype))
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    generation_config = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(directory / "generation_config.json", "w", encoding="utf-8") as f:
        json.dump(generation_config, f, indent=2)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
