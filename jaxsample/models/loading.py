"""`load`: a checkpoint directory, GGUF file or registered name → `LanguageModel`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsample.errors import ArgumentError, CheckpointError, ConfigError
from jaxsample.lm import LanguageModel
from jaxsample.models.checkpoint import assemble_params, check_dtype, read_json, safetensors_entries
from jaxsample.models.config import ModelConfig, check_stop_token_ids
from jaxsample.models.decoder import DecodeStep, LayerFunctions, forward, init_cache, prefill
from jaxsample.models.registry import registered_models, resolve
from jaxsample.models.tokenizer import TOKENIZER_FILES, Tokenizer
from jaxsample.validation import check_int


@dataclasses.dataclass(frozen=True)
class _WithConfig:
    """`fn(params, config, *args)` with the config bound; equal for equal configs, so two
    models of the same architecture share compiled programs."""

    fn: Callable
    config: ModelConfig

    def __call__(self, params, *args, **kwargs):
        return self.fn(params, self.config, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _CacheFactory:
    config: ModelConfig
    dtype: np.dtype

    def __call__(self, batch_size: int, capacity: int):
        return init_cache(self.config, batch_size, capacity, self.dtype)


def make_language_model(
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer | None = None,
    name: str = "model",
    extra_eos_token_ids: tuple[int, ...] = (),
) -> LanguageModel:
    """Wraps decoder params as a `jaxsample.lm.LanguageModel`.

    Args:
      config: the architecture.
      params: the params pytree, per-layer or stacked (`jaxsample.models.layout`).
      tokenizer: optional `Tokenizer`.
      name: a name for logs.
      extra_eos_token_ids: stop tokens beyond the config's (e.g. generation_config.json's).

    Raises:
      ConfigError: no stop token is known.
    """
    eos = tuple(dict.fromkeys(config.eos_token_ids + tuple(int(t) for t in extra_eos_token_ids)))
    if not eos:
        raise ConfigError(
            f"model {name!r}: no eos_token_id in its config or generation config; a stop token is "
            "required: pass it as js.load(..., eos_token_ids=[...]) (and pad_token_id=... if the "
            "pad token should differ from the first stop token)"
        )
    pad = config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    dtype = np.dtype(params["embed_tokens"]["embedding"].dtype)
    return LanguageModel(
        params=params,
        forward_fn=_WithConfig(forward, config),
        init_cache_fn=_CacheFactory(config, dtype),
        prefill_fn=_WithConfig(prefill, config),
        decode_fn=DecodeStep(config),
        vocab_size=config.vocab_size,
        max_length=config.max_position_embeddings,
        eos_token_ids=eos,
        pad_token_id=eos[0] if pad is None else int(pad),
        feature_size=config.hidden_size,
        layer_fns=LayerFunctions(config),
        tokenizer=tokenizer,
        config=config,
        name=name,
    )


def _token_ids(value: Any, source: Path, key: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"{source}: {key!r} must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    """`eos_token_ids=` as a tuple: one id (a Python/numpy integer or a 0-d integer array)
    or a non-empty sequence of them."""
    array = None if isinstance(value, (str, bytes, bool, np.bool_)) else np.asarray(value)
    if array is None or array.ndim > 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ArgumentError(
            f"eos_token_ids must be a token id or a non-empty sequence of token ids, got {value!r}"
        )
    return tuple(int(t) for t in array.reshape(-1))


def _check_tokenizer_size(size: int, config: ModelConfig, source: str) -> None:
    """A tokenizer larger than the model's vocabulary belongs to another model; a smaller one
    is normal (vocabularies are padded to a multiple of 64 or 128)."""
    if size > config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {size} tokens but the model's vocab_size is "
            f"{config.vocab_size}: ids from {config.vocab_size} on have no embedding, so the "
            "tokenizer does not belong to this checkpoint"
        )


def _directory_tokenizer(directory: Path, config: ModelConfig) -> Tokenizer | None:
    present = [f for f in TOKENIZER_FILES if (directory / f).is_file()]
    if not present:
        return None
    if "tokenizer.json" not in present:
        # transformers would fall back to another tokenizer class with different ids.
        raise CheckpointError(
            f"{directory}: {', '.join(present)} is present but tokenizer.json is missing; the "
            "tokenizer is read only from tokenizer.json. Add the checkpoint's tokenizer.json, or "
            f"remove {', '.join(present)} to load the model without a tokenizer"
        )
    tokenizer = Tokenizer.from_directory(directory)
    _check_tokenizer_size(len(tokenizer), config, str(directory / "tokenizer.json"))
    return tokenizer


def _load_directory(directory: Path, dtype, check_finite: bool, overridden: frozenset[str]):
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    raw = read_json(config_path)
    if isinstance(raw, dict):  # ids the caller replaces are not the checkpoint's to vouch for
        raw = {k: v for k, v in raw.items() if k not in overridden}
    config = ModelConfig.from_hf_dict(raw, source=str(config_path))
    extra_eos: tuple[int, ...] = ()
    generation_path = directory / "generation_config.json"
    if generation_path.is_file() and "eos_token_id" not in overridden:
        generation = read_json(generation_path)
        if not isinstance(generation, dict):
            raise ConfigError(f"{generation_path}: expected a JSON object")
        extra_eos = _token_ids(generation.get("eos_token_id"), generation_path, "eos_token_id")
        check_stop_token_ids(extra_eos, config.vocab_size, str(generation_path))
    tokenizer = _directory_tokenizer(directory, config)
    entries, source = safetensors_entries(directory)
    params = assemble_params(config, entries, dtype, source, check_finite=check_finite)
    return config, params, tokenizer, extra_eos


def _load_gguf(path: Path, dtype, check_finite: bool, overridden: frozenset[str]):
    try:  # the `gguf` package is needed only here
        from jaxsample.models import gguf_file
    except ImportError as e:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package (pip install gguf): {e}") from e

    reader = gguf_file.open_reader(path)
    config, extra_eos = gguf_file.gguf_config(reader, overridden)
    check_stop_token_ids(extra_eos, config.vocab_size, f"{path} (end-of-turn metadata)")
    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        _check_tokenizer_size(len(reader.fields["tokenizer.ggml.tokens"].data), config, f"{path} (tokenizer.ggml.tokens)")
        tokenizer = Tokenizer.from_gguf(path)
    entries = gguf_file.gguf_entries(reader, config)
    params = assemble_params(config, entries, dtype, str(path), check_finite=check_finite)
    return config, params, tokenizer, extra_eos


def load(
    path_or_name: str | os.PathLike,
    dtype=None,
    *,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    check_finite: bool = True,
) -> LanguageModel:
    """Loads a Qwen2 / Llama checkpoint as a `LanguageModel` with per-layer params (one dict
    of whole arrays per layer, the layers unrolled in the program: `jaxsample.models.layout`;
    `lm.replace(params=stack_layers(lm.params))` gives one layer scan instead).

    Args:
      path_or_name: a Hugging Face directory (config.json, optional generation_config.json,
        model.safetensors or a sharded index, tokenizer.json), a `.gguf` file, or a
        registered name (`jaxsample.models.registered_models()`).
      dtype: "float32", "float16" or "bfloat16" (or the numpy/JAX dtype); `None` keeps the
        checkpoint's (float32 for GGUF, which is dequantized).
      eos_token_ids: the stop tokens, replacing those of the checkpoint (for checkpoints that
        declare none, or declare the wrong ones).
      pad_token_id: the pad token, replacing the checkpoint's.
      bos_token_id: the beginning-of-sequence id kept in the config, replacing the
        checkpoint's (the samplers never use it; this rescues a checkpoint whose id lies
        outside the vocabulary).
      check_finite: scan every weight for NaN / inf (after the dtype cast) and refuse the
        checkpoint naming the tensor; `False` skips the scan (faster on large models).

    Raises:
      ArgumentError: an empty path, an unknown dtype, an override outside the vocabulary.
      ModelNotFoundError: neither an existing path nor a registered name, or a registered
        model whose files are absent (the message says how to install them).
      ConfigError, CheckpointError: a malformed or unsupported checkpoint, naming the file
        and key or tensor; a tokenizer that does not fit the model; non-finite weights.
    """
    if not isinstance(path_or_name, (str, os.PathLike)) or not os.fspath(path_or_name):
        raise ArgumentError(
            "path_or_name must be a checkpoint directory, a .gguf file or a registered model name "
            f"({', '.join(registered_models())}), got {path_or_name!r}"
        )
    dtype = check_dtype(dtype)
    path = Path(path_or_name)
    name = path.name
    if not path.exists():
        name = str(path_or_name)
        path = resolve(name)
    stop_ids = None if eos_token_ids is None else _stop_token_ids(eos_token_ids)
    overridden = frozenset(
        key
        for key, value in (("eos_token_id", stop_ids), ("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id))
        if value is not None
    )
    if path.is_dir():
        config, params, tokenizer, extra_eos = _load_directory(path, dtype, check_finite, overridden)
    elif path.suffix == ".gguf":
        config, params, tokenizer, extra_eos = _load_gguf(path, dtype, check_finite, overridden)
    else:
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    if stop_ids is not None:
        ids = tuple(check_int("eos_token_ids", t, 0, config.vocab_size - 1) for t in stop_ids)
        config = dataclasses.replace(config, eos_token_ids=ids)
    for field, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id)):
        if value is not None:
            config = dataclasses.replace(config, **{field: check_int(field, value, 0, config.vocab_size - 1)})
    return make_language_model(config, params, tokenizer, name=name, extra_eos_token_ids=extra_eos)
