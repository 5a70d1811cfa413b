"""Reading llama.cpp GGUF files (`llama` and `qwen2` architectures) into Hugging Face layout.

Tensors are dequantized to float32 with the `gguf` package, reshaped to the reversed GGUF
dimensions (which is Hugging Face's `[out, in]`), renamed to Hugging Face names, and — for
the `llama` architecture only — have llama.cpp's q/k row permutation undone (q grouped by
N heads, k by K heads), so one rotate-half RoPE serves every source.

Llama-3.x files carry `rope_freqs.weight`, the llama3 RoPE remap as H/2 per-dimension
divisors of the inverse frequencies; it becomes `ModelConfig.rope_freq_factors`. GGUF
metadata holds no llama3 low/high frequency factors, so the remap cannot always be recomputed:
when `{arch}.rope.scaling.factor` and `.original_context_length` are present, the tensor is
checked against the remap they give with Llama 3.1's low_freq_factor 1 and high_freq_factor 4
(a reconstruction: llama.cpp's converter writes the tensor from those config.json values).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import gguf
import numpy as np

from jaxsample.errors import CheckpointError, ConfigError
from jaxsample.models.checkpoint import TensorEntry
from jaxsample.models.config import Llama3RopeScaling, ModelConfig
from jaxsample.models.modules import llama3_remap, rope_base_frequencies

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_PATTERN = re.compile(r"(\w+)\.(weight|bias)")
# Stop tokens beyond eos that chat GGUFs declare (end of turn / end of message).
_EXTRA_STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0


def open_reader(path: Path) -> gguf.GGUFReader:
    """`gguf.GGUFReader`, with a corrupt or truncated file reported as a `CheckpointError`."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the parser raises many types (ValueError, IndexError, struct errors)
        raise CheckpointError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default=None, *, required: bool = False):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ConfigError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _path(reader: gguf.GGUFReader) -> str:
    return str(reader.data.filename)


def hf_name(gguf_name: str) -> str:
    """Hugging Face name of a GGUF tensor; unknown names are returned unchanged."""
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{kind}"
    match = _GLOBAL_PATTERN.fullmatch(gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    return gguf_name


def unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleave of q/k (row 2i ← HF row i, 2i+1 ← i + H/2)."""
    half = weights.shape[0] // num_heads // 2
    rows = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return rows.swapaxes(1, 2).reshape(weights.shape)


def gguf_config(reader: gguf.GGUFReader, overridden: Collection[str] = ()) -> tuple[ModelConfig, tuple[int, ...]]:
    """(ModelConfig, extra stop token ids) from GGUF metadata; the token ids named in
    `overridden` ("eos_token_id", "pad_token_id", "bos_token_id") are left unset for the caller to replace
    (with "eos_token_id", the extra stop ids too)."""
    try:
        config = _config_from_metadata(reader, overridden)
    except ConfigError as e:
        raise ConfigError(f"{_path(reader)}: {e}") from None
    if "eos_token_id" in overridden:
        return config, ()
    extra_stops = tuple(int(v) for key in _EXTRA_STOP_KEYS if (v := _field(reader, key)) is not None)
    return config, extra_stops


def _config_from_metadata(reader: gguf.GGUFReader, overridden: Collection[str]) -> ModelConfig:
    arch = _field(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"general.architecture is {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ConfigError(f"{arch}.rope.scaling.type is {scaling_type!r}; not supported")
    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length", required=True))
    heads = int(_field(reader, f"{arch}.attention.head_count", required=True))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConfigError(
            f"{arch}.rope.dimension_count {rope_dim} differs from head_dim {head_dim}; "
            "partial RoPE is not supported"
        )
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None:
        raise ConfigError(f"neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    if arch == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = "blk.0.attn_q.bias" in tensor_names
    eos = None if "eos_token_id" in overridden else _field(reader, "tokenizer.ggml.eos_token_id")
    pad = None if "pad_token_id" in overridden else _field(reader, "tokenizer.ggml.padding_token_id")
    bos = None if "bos_token_id" in overridden else _field(reader, "tokenizer.ggml.bos_token_id")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope_freq_factors = _rope_freq_factors(reader, arch, head_dim, theta)
    return ModelConfig(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", required=True)),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", required=True)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_freq_factors=rope_freq_factors,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=arch == "llama" and "blk.0.ffn_gate.bias" in tensor_names,
        eos_token_ids=() if eos is None else (int(eos),),
        bos_token_id=_optional_int(bos),
        pad_token_id=_optional_int(pad),
    )


def _rope_freq_factors(reader: gguf.GGUFReader, arch: str, head_dim: int, theta: float) -> tuple[float, ...] | None:
    """The `rope_freqs` tensor as H/2 floats, checked against the metadata's llama3 remap."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return None
    factors = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(-1)
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
        raise ConfigError(
            f"{ROPE_FREQS} must hold head_dim / 2 = {head_dim // 2} finite positive factors, got "
            f"shape {factors.shape}: {factors[:8]}"
        )
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if factor is not None and original is not None:
        scaling = Llama3RopeScaling(float(factor), _LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR, int(original))
        inv_freq = rope_base_frequencies(head_dim, theta)
        expected = inv_freq / llama3_remap(inv_freq, scaling)
        if not np.allclose(factors, expected, rtol=1e-4):
            raise ConfigError(
                f"{ROPE_FREQS} {np.round(factors, 4).tolist()} disagrees with the llama3 remap of "
                f"{arch}.rope.scaling.factor={factor} and original_context_length={original} "
                f"(low/high frequency factors 1 and 4): {np.round(expected, 4).tolist()}"
            )
    return tuple(float(f) for f in factors)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def gguf_entries(reader: gguf.GGUFReader, config: ModelConfig) -> list[TensorEntry]:
    """Every tensor as a lazily dequantized float32 `TensorEntry` in Hugging Face layout."""
    path = _path(reader)
    permute = config.model_type == "llama"

    def reader_for(tensor, name: str, shape: tuple[int, ...]):
        def read() -> np.ndarray:
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise CheckpointError(
                    f"{path}: cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}"
                ) from e
            array = np.asarray(array, np.float32).reshape(shape)
            if permute and ".self_attn.q_proj." in name:
                array = unpermute_rows(array, config.num_attention_heads)
            elif permute and ".self_attn.k_proj." in name:
                array = unpermute_rows(array, config.num_key_value_heads)
            return array

        return read

    entries = []
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # read into the config by `gguf_config`
            continue
        name = hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        entries.append(TensorEntry(name, shape, "F32", path, reader_for(tensor, name, shape)))
    return entries
