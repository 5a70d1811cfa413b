"""`ModelConfig`: the architecture of a Qwen2 or Llama decoder, parsed from Hugging Face JSON.

The JSON is read directly (not through `transformers.AutoConfig`) and accepts both the 4.x
spelling (`rope_theta` + `rope_scaling` with `type` or `rope_type`) and the 5.x spelling
(`rope_parameters`). Anything the port does not implement is rejected with a `ConfigError`
naming the key, never approximated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from jaxsample.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")

# transformers' class defaults for keys a config.json may omit.
_DEFAULT_MAX_POSITIONS = {"qwen2": 32768, "llama": 2048}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency remap (`rope_type: "llama3"`).

    Attributes:
      factor: f, the divisor applied to low frequencies.
      low_freq_factor: l; wavelengths above `original_max_position_embeddings / l` are divided by f.
      high_freq_factor: h; wavelengths below `original_max_position_embeddings / h` are kept.
      original_max_position_embeddings: O, the pre-training context length.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "rope scaling original_max_position_embeddings must be positive, got "
                f"{self.original_max_position_embeddings}"
            )


def check_stop_token_ids(ids: Sequence[int], vocab_size: int, source: str | None = None) -> None:
    """Raises `ConfigError` (prefixed with `source`) for a stop id outside [0, vocab_size)."""
    for t in ids:
        if not 0 <= t < vocab_size:
            where = f"{source}: " if source else ""
            raise ConfigError(
                f"{where}eos_token_id {t} is outside the vocabulary [0, {vocab_size}); "
                "js.load(..., eos_token_ids=[...]) replaces the checkpoint's stop tokens"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen2 / Llama decoder-only transformer (hashable: a jit static argument).

    Field names follow transformers'. Notation used in shapes elsewhere: V vocab_size,
    D hidden_size, F intermediate_size, L num_hidden_layers, N num_attention_heads,
    K num_key_value_heads (G = N / K query heads share a kv head), H head_dim.

    Attributes:
      model_type: "qwen2" or "llama".
      vocab_size: V, rows of the embedding and of the LM head.
      hidden_size: D, the residual-stream width.
      intermediate_size: F, the gated MLP's inner width.
      num_hidden_layers: L decoder layers.
      num_attention_heads: N query heads.
      num_key_value_heads: K key/value heads; N must be a multiple of K.
      head_dim: H, per-head width (even, for rotate-half RoPE); transformers' default D / N.
      max_position_embeddings: the longest sequence (prompt + generated tokens) the model
        accepts; it becomes `LanguageModel.max_length` and bounds the KV-cache capacity.
      rms_norm_eps: ε > 0 in every RMSNorm, x / sqrt(mean(x²) + ε).
      rope_theta: RoPE base θ > 0: inverse frequencies θ^(−2j/H), j < H/2.
      rope_scaling: `None` for plain RoPE, or the llama3 remap (`Llama3RopeScaling`).
      rope_freq_factors: `None`, or H/2 per-dimension divisors of the RoPE inverse
        frequencies (the `rope_freqs` tensor of Llama-3.x GGUF files: llama.cpp's form of
        the llama3 remap). Exclusive with `rope_scaling`.
      tie_word_embeddings: the LM head reuses the `[V, D]` embedding (no `lm_head` params).
      qkv_bias: q/k/v projections have biases (always for Qwen2; Llama `attention_bias`).
      o_bias: the output projection has a bias (Llama `attention_bias`; never for Qwen2).
      mlp_bias: gate/up/down projections have biases (Llama `mlp_bias`; never for Qwen2).
      eos_token_ids: stop tokens from config.json (may be empty; generation_config.json can add).
      bos_token_id: beginning-of-sequence id in [0, V), or `None`; kept for round trips,
        never used by the samplers (BOS, where a model wants one, comes from the tokenizer
        or the chat template).
      pad_token_id: pad id in [0, V), or `None`; the loaded `LanguageModel` falls back to
        the tokenizer's, then to the first stop token.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = _DEFAULT_RMS_NORM_EPS
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: Llama3RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_freq_factors is not None:
            factors = tuple(float(f) for f in self.rope_freq_factors)
            object.__setattr__(self, "rope_freq_factors", factors)
            if len(factors) != self.head_dim // 2 or not all(0 < f < math.inf for f in factors):
                raise ConfigError(
                    f"rope_freq_factors must hold head_dim / 2 = {self.head_dim // 2} finite "
                    f"positive numbers, got {len(factors)}: {factors[:8]}"
                )
            if self.rope_scaling is not None:
                raise ConfigError("rope_freq_factors and rope_scaling both remap RoPE; give one")
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ConfigError(
                "qwen2 always has q/k/v biases and no o_proj or MLP biases; got "
                f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, mlp_bias={self.mlp_bias}"
            )
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ConfigError(
                "llama's attention_bias covers q, k, v and o together; got "
                f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name, value, override in (
            ("bos_token_id", self.bos_token_id, "; js.load(..., bos_token_id=...) replaces it"),
            ("pad_token_id", self.pad_token_id, "; js.load(..., pad_token_id=...) replaces it"),
        ):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size}){override}")
        check_stop_token_ids(self.eos_token_ids, self.vocab_size)

    @property
    def num_queries_per_kv(self) -> int:
        """G = N / K, the query heads sharing one kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parses a transformers config.json dict (4.x or 5.x keys).

        Args:
          d: the decoded JSON object.
          source: file name used in error messages.

        Raises:
          ConfigError: naming `source` and the offending key.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        parser = _HFConfigParser(d, source)
        return parser.parse()

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers 5.x config.json dict that `from_hf_dict` and transformers both read back."""
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": (
                None
                if not self.eos_token_ids
                else self.eos_token_ids[0]
                if len(self.eos_token_ids) == 1
                else list(self.eos_token_ids)
            ),
        }
        if self.rope_freq_factors is not None:
            raise ConfigError(
                "per-dimension RoPE frequency factors (a GGUF rope_freqs tensor) have no "
                "config.json equivalent"
            )
        if self.rope_scaling is not None:
            d["rope_parameters"].update(
                rope_type="llama3", **dataclasses.asdict(self.rope_scaling)
            )
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        else:
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        return d


class _HFConfigParser:
    """Reads one config.json dict, naming `source` and the key in every error."""

    def __init__(self, d: Mapping[str, Any], source: str):
        self.d = d
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key!r} {message}")

    def _lookup(self, key, default, container, label):
        """`(value, label)`; value None means "use the default"; raises if there is none."""
        container = self.d if container is None else container
        label = key if label is None else label
        value = container.get(key)
        if value is None and default is None:
            raise self.error(label, "is missing")
        return value, label

    def integer(self, key: str, default: int | None = None, *, container=None, label=None) -> int:
        value, label = self._lookup(key, default, container, label)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(label, f"must be an integer, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, *, container=None, label=None) -> float:
        value, label = self._lookup(key, default, container, label)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(label, f"must be a finite number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.d.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.d.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise self.error(key, f"must be an integer or a list of integers, got {value!r}")
        return tuple(values)

    def optional_token_id(self, key: str) -> int | None:
        value = self.d.get(key)
        if isinstance(value, list):  # some checkpoints list a single id
            if len(value) != 1:
                raise self.error(key, f"must be a single token id, got {value!r}")
            value = value[0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        return value

    def rope(self, max_positions: int) -> tuple[float, Llama3RopeScaling | None]:
        """(theta, scaling) as transformers reads them: a non-empty `rope_scaling` first (4.x
        reads nothing else, 5.x prefers it to `rope_parameters`), else `rope_parameters`;
        theta from the chosen block, else the top-level `rope_theta`."""
        d = self.d
        if d.get("rope_scaling"):
            key, params = "rope_scaling", d["rope_scaling"]
        elif d.get("rope_parameters") is not None:
            key, params = "rope_parameters", d["rope_parameters"]
        else:
            key, params = "rope_scaling", {}
        if not isinstance(params, Mapping):
            raise self.error(key, f"must be an object, got {params!r}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise self.error(key, "holds per-layer-type RoPE parameters, which qwen2/llama never use")
        theta = self.number(
            "rope_theta",
            self.number("rope_theta", _DEFAULT_ROPE_THETA),
            container=params,
            label=f"{key}.rope_theta",
        )
        if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise self.error("partial_rotary_factor", "other than 1.0 is not supported")
        type_key = "rope_type" if "rope_type" in params else "type"
        rope_type = params.get(type_key, "default")
        if rope_type == "default":
            return theta, None
        if rope_type != "llama3":
            raise self.error(
                f"{key}.{type_key}",
                f"is {rope_type!r}; only 'default' and 'llama3' RoPE are supported",
            )
        scaling = Llama3RopeScaling(
            factor=self.number("factor", container=params, label=f"{key}.factor"),
            low_freq_factor=self.number(
                "low_freq_factor", container=params, label=f"{key}.low_freq_factor"
            ),
            high_freq_factor=self.number(
                "high_freq_factor", container=params, label=f"{key}.high_freq_factor"
            ),
            original_max_position_embeddings=self.original_context(params, key, max_positions),
        )
        return theta, scaling

    def original_context(self, params: Mapping[str, Any], key: str, max_positions: int) -> int:
        """The llama3 remap's pre-training context. transformers 5.x reads the top level
        first; 4.x reads only `rope_scaling`, so there the two must agree when both are given."""
        name = "original_max_position_embeddings"
        inner = None if params.get(name) is None else self.integer(name, container=params, label=f"{key}.{name}")
        top = None if self.d.get(name) is None else self.integer(name)
        if key == "rope_scaling" and inner is not None and top is not None and inner != top:
            raise self.error(
                name,
                f"is {top} at the top level but {inner} in {key}; transformers 4.x reads the "
                "second and 5.x the first, so make them equal",
            )
        return next((v for v in (top, inner) if v is not None), max_positions)

    def check_no_sliding_layer(self) -> None:
        """Qwen2 slides layers only with `use_sliding_window` and a `sliding_window`, and then
        only those from `max_window_layers` on (transformers' default 28), or those
        `layer_types` marks: a config where no layer slides is full attention."""
        d = self.d
        if not self.flag("use_sliding_window", False) or d.get("sliding_window", 4096) is None:
            return
        layers = self.integer("num_hidden_layers")
        if d.get("layer_types") is not None:
            sliding = [i for i, kind in enumerate(d["layer_types"]) if kind == "sliding_attention"]
            where = "layer_types"
        else:
            first = self.integer("max_window_layers", 28)
            sliding = list(range(first, layers))
            where = f"max_window_layers {first} < num_hidden_layers {layers}"
        if sliding:
            raise self.error(
                "use_sliding_window",
                f"is true and layers {sliding[0]}..{sliding[-1]} would slide ({where}); sliding-window "
                "attention is not supported")

    def parse(self) -> ModelConfig:
        d = self.d
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise self.error(
                "model_type", f"is {model_type!r}; supported model types: {SUPPORTED_MODEL_TYPES}"
            )
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):  # two names of x·σ(x)
            raise self.error("hidden_act", f"is {hidden_act!r}; only 'silu' (alias 'swish') is supported")
        if model_type == "qwen2":
            self.check_no_sliding_layer()
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = self.flag("attention_bias", False)
            mlp_bias = self.flag("mlp_bias", False)
        hidden = self.integer("hidden_size")
        heads = self.integer("num_attention_heads")
        if hidden % heads and d.get("head_dim") is None:
            raise self.error(
                "head_dim", f"is missing and hidden_size {hidden} is not a multiple of {heads} heads"
            )
        max_positions = self.integer("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
        theta, scaling = self.rope(max_positions)
        try:
            return ModelConfig(
                model_type=model_type,
                vocab_size=self.integer("vocab_size"),
                hidden_size=hidden,
                intermediate_size=self.integer("intermediate_size"),
                num_hidden_layers=self.integer("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=self.integer("num_key_value_heads", heads),
                head_dim=self.integer("head_dim", hidden // heads),
                max_position_embeddings=max_positions,
                rms_norm_eps=self.number("rms_norm_eps", _DEFAULT_RMS_NORM_EPS),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=self.flag("tie_word_embeddings", False),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=mlp_bias,
                eos_token_ids=self.token_ids("eos_token_id"),
                bos_token_id=self.optional_token_id("bos_token_id"),
                pad_token_id=self.optional_token_id("pad_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None
