"""`load`: a checkpoint directory, GGUF file or registered name → `LanguageModel`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxsample.errors import CheckpointError, ConfigError
from jaxsample.lm import LanguageModel
from jaxsample.models import gguf_file
from jaxsample.models.checkpoint import assemble_params, read_json, safetensors_entries
from jaxsample.models.config import ModelConfig
from jaxsample.models.decoder import LayerFunctions, decode_step, forward, init_cache, prefill
from jaxsample.models.registry import resolve
from jaxsample.models.tokenizer import TOKENIZER_FILES, Tokenizer


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
      params: the params pytree (`init_params` layout).
      tokenizer: optional `Tokenizer`.
      name: a name for logs.
      extra_eos_token_ids: stop tokens beyond the config's (e.g. generation_config.json's).

    Raises:
      ConfigError: no stop token is known.
    """
    eos = tuple(dict.fromkeys(config.eos_token_ids + tuple(int(t) for t in extra_eos_token_ids)))
    if not eos:
        raise ConfigError(
            f"model {name!r}: no eos_token_id in its config or generation config; a stop token is required"
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
        decode_fn=_WithConfig(decode_step, config),
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


def _load_directory(directory: Path, dtype) -> tuple[ModelConfig, Any, Tokenizer | None, tuple[int, ...]]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    config = ModelConfig.from_hf_dict(read_json(config_path), source=str(config_path))
    extra_eos: tuple[int, ...] = ()
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        generation = read_json(generation_path)
        if not isinstance(generation, dict):
            raise ConfigError(f"{generation_path}: expected a JSON object")
        extra_eos = _token_ids(generation.get("eos_token_id"), generation_path, "eos_token_id")
    entries, source = safetensors_entries(directory)
    params = assemble_params(config, entries, dtype, source)
    tokenizer = None
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = Tokenizer.from_directory(directory)
    return config, params, tokenizer, extra_eos


def _load_gguf(path: Path, dtype) -> tuple[ModelConfig, Any, Tokenizer | None, tuple[int, ...]]:
    reader = gguf_file.open_reader(path)
    config, extra_eos = gguf_file.gguf_config(reader)
    params = assemble_params(config, gguf_file.gguf_entries(reader, config), dtype, str(path))
    tokenizer = Tokenizer.from_gguf(path) if "tokenizer.ggml.tokens" in reader.fields else None
    return config, params, tokenizer, extra_eos


def load(path_or_name: str | os.PathLike, dtype=None) -> LanguageModel:
    """Loads a Qwen2 / Llama checkpoint as a `LanguageModel`.

    Args:
      path_or_name: a Hugging Face directory (config.json, optional generation_config.json,
        model.safetensors or a sharded index, tokenizer files), a `.gguf` file, or a
        registered name (`jaxsample.models.registered_models()`).
      dtype: parameter/activation dtype; `None` keeps the checkpoint's (float32 for GGUF,
        which is dequantized).

    Raises:
      ModelNotFoundError: neither an existing path nor a registered name, or a registered
        model whose files are absent (the message says how to install them).
      ConfigError, CheckpointError: a malformed or unsupported checkpoint, naming the file
        and key or tensor.
    """
    path = Path(path_or_name)
    name = path.name
    if not path.exists():
        name = str(path_or_name)
        path = resolve(name)
    if path.is_dir():
        config, params, tokenizer, extra_eos = _load_directory(path, dtype)
    elif path.suffix == ".gguf":
        config, params, tokenizer, extra_eos = _load_gguf(path, dtype)
    else:
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    return make_language_model(config, params, tokenizer, name=name, extra_eos_token_ids=extra_eos)
