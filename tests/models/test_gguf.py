"""GGUF loading on tiny files written with `gguf.GGUFWriter`, against transformers' GGUF loader."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import LlamaConfig, Qwen2Config

from jaxsample import models
from jaxsample.errors import CheckpointError, ConfigError
from jaxsample.models.gguf_file import unpermute_rows
from jaxsample.testing import rerandomize_torch_model


VOCAB = 96
# Both loaders dequantize the same bytes and run f32: agreement like the safetensors fixtures.
ATOL = 1e-4

_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights, num_heads):
    """llama.cpp's convert_hf_to_gguf permutation (rotate-half rows → interleaved pairs)."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def write_gguf(path, arch, hf_config, seed, quantized, extra_tensors=(), configure=None):
    """A GGUF file holding a random transformers model, laid out as llama.cpp writes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    rerandomize_torch_model(model, seed)
    c = hf_config
    writer = GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_eos_token_id(3)
    if configure is not None:
        configure(writer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, c.num_key_value_heads)
        qtype = quantized.get(name.rsplit(".", 2)[-2]) if array.ndim == 2 else None
        if qtype is None:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
        else:
            writer.add_tensor(gguf_name(name), quantize(array, qtype), raw_dtype=qtype)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA = LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)
QWEN2 = Qwen2Config(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Quantization like SmolLM2's file (Q8_0 embedding, Q4_1 matrices) for llama; plain f32 for qwen2.
CASES = {
    "llama": (LLAMA, {"embed_tokens": GGMLQuantizationType.Q8_0, **{
        m: GGMLQuantizationType.Q4_1 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}}),
    "qwen2": (QWEN2, {}),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_tiny_gguf_matches_transformers(arch, tmp_path, reference_logits):
    hf_config, quantized = CASES[arch]
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, hf_config, seed=3, quantized=quantized)
    lm = models.load(path)
    assert lm.config.model_type == arch and lm.eos_token_ids == (3,)
    assert lm.config.tie_word_embeddings == hf_config.tie_word_embeddings
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
    expected = reference_logits(tmp_path, tokens, gguf_file=path.name)
    delta = np.abs(np.asarray(lm.logits(jnp.asarray(tokens))) - expected).max()
    print(f"\ntiny {arch} GGUF: max|Δlogit| = {delta:.2e} (logit std {expected.std():.2f})")
    assert expected.std() > 1.0
    assert delta <= ATOL


def test_unpermute_inverts_llama_cpp_permutation():
    rows = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(2 * 3 * 8, 5)  # 6 heads of H = 8
    permuted = llama_cpp_permute(rows, 6)
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(unpermute_rows(permuted, 6), rows)
    # Row 2i of a head holds HF row i, row 2i+1 holds HF row i + H/2.
    np.testing.assert_array_equal(permuted[:8:2], rows[:4])
    np.testing.assert_array_equal(permuted[1:8:2], rows[4:8])


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", QWEN2, seed=0, quantized={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tiny.gguf: not a readable GGUF file"):
        models.load(path)


def test_unknown_tensor_in_gguf(tmp_path):
    path = write_gguf(
        tmp_path / "tiny.gguf", "llama", LLAMA, seed=0, quantized={},
        extra_tensors=[("cls.weight", np.ones(8, np.float32))],
    )
    with pytest.raises(CheckpointError, match=r"tiny.gguf: unexpected tensor 'cls.weight'"):
        models.load(path)


@pytest.mark.parametrize("name, override", [("bos", "bos_token_id"), ("pad", "pad_token_id")])
def test_gguf_special_id_outside_the_vocabulary_is_refused_and_the_override_replaces_it(tmp_path, name, override):
    add = {"bos": GGUFWriter.add_bos_token_id, "pad": GGUFWriter.add_pad_token_id}[name]
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", QWEN2, seed=0, quantized={},
                      configure=lambda writer: add(writer, VOCAB + 4))
    with pytest.raises(ConfigError, match=rf"{override} {VOCAB + 4} is outside the vocabulary.*js.load\(\.\.\., {override}="):
        models.load(path)
    assert getattr(models.load(path, **{override: 5}).config, override) == 5


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 100}
# head_dim 8, θ = 10⁴: wavelengths 6.3, 63, 628, 6283 against the thresholds 100/4 and 100/1
# put one frequency in each llama3 regime (kept, smoothed, divided by the factor).
LLAMA3 = LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA3_SCALING},
)


def llama_cpp_rope_freqs(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """`rope_freqs` as llama.cpp's convert_hf_to_gguf.py computes it for llama3 rope scaling."""
    import math

    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


ROPE_FREQS = llama_cpp_rope_freqs(8, 10000.0, **LLAMA3_SCALING)


def test_llama3_rope_freqs_match_transformers_rope_scaling(tmp_path, hf_checkpoint, reference_logits):
    assert 1.0 < ROPE_FREQS[1] < 8.0 and ROPE_FREQS[0] == 1.0 and ROPE_FREQS[3] == 8.0
    hf_dir = hf_checkpoint("llama3-rope", LLAMA3, seed=5)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 48))
    expected = reference_logits(hf_dir, tokens)
    with_freqs = write_gguf(tmp_path / "llama3.gguf", "llama", LLAMA3, seed=5, quantized={},
                            extra_tensors=[("rope_freqs.weight", ROPE_FREQS)])
    lm = models.load(with_freqs)
    np.testing.assert_allclose(lm.config.rope_freq_factors, ROPE_FREQS)
    delta = np.abs(np.asarray(lm.logits(jnp.asarray(tokens))) - expected).max()
    assert expected.std() > 1.0 and delta <= ATOL, delta
    # Control: the same weights without rope_freqs are plain RoPE, visibly different.
    plain = models.load(write_gguf(tmp_path / "plain.gguf", "llama", LLAMA3, seed=5, quantized={}))
    assert np.abs(np.asarray(plain.logits(jnp.asarray(tokens))) - expected).max() > 1e-2


@pytest.mark.parametrize("factor, agrees", [(8.0, True), (4.0, False)])
def test_rope_freqs_are_checked_against_the_metadata_remap(tmp_path, factor, agrees):
    def scaling_metadata(writer):
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(100)

    path = write_gguf(tmp_path / "llama3.gguf", "llama", LLAMA3, seed=5, quantized={},
                      extra_tensors=[("rope_freqs.weight", ROPE_FREQS)], configure=scaling_metadata)
    if agrees:
        assert models.load(path).config.rope_freq_factors is not None
    else:
        with pytest.raises(ConfigError, match=r"rope_freqs.weight .* disagrees with the llama3 remap .*factor=4.0"):
            models.load(path)


def test_rope_freqs_of_the_wrong_size_are_refused(tmp_path):
    path = write_gguf(tmp_path / "bad.gguf", "llama", LLAMA3, seed=5, quantized={},
                      extra_tensors=[("rope_freqs.weight", np.ones(3, np.float32))])
    with pytest.raises(ConfigError, match=r"rope_freqs.weight must hold head_dim / 2 = 4 finite positive factors"):
        models.load(path)


def test_unsupported_architecture(tmp_path):
    writer = GGUFWriter(tmp_path / "other.gguf", "gemma")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"other.gguf: general.architecture is 'gemma'"):
        models.load(tmp_path / "other.gguf")
