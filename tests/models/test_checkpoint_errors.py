"""Strict checkpoint loading: every malformed input raises the right error, naming file and tensor."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxsample import models
from jaxsample.errors import ArgumentError, CheckpointError, ConfigError, ModelNotFoundError

CONFIG = models.ModelConfig(
    model_type="qwen2",
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=32,
    qkv_bias=True,
    eos_token_ids=(1,),
)
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # [K·H, D] = [8, 16]: a transpose changes its shape


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("valid")
    params = models.init_params(jax.random.key(0), CONFIG)
    models.save_pretrained(params, CONFIG, directory)
    return directory, params


@pytest.fixture
def copy(saved, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(saved[0], directory)
    return directory


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_valid_checkpoint_loads_exactly(saved):
    directory, params = saved
    lm = models.load(directory)
    assert lm.config == CONFIG
    assert isinstance(lm.params["layers"], tuple), "load gives per-layer params"
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), lm.params,
                                            models.unstack_layers(params))))


def test_missing_tensor(copy):
    _edit_tensors(copy, lambda t: t.pop(Q_PROJ))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.*missing tensors {Q_PROJ}"):
        models.load(copy)


def test_unexpected_tensor(copy):
    _edit_tensors(copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((24, 16), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        models.load(copy)


def test_shape_mismatch(copy):
    _edit_tensors(copy, lambda t: t.update({K_PROJ: np.ascontiguousarray(t[K_PROJ].T)}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{K_PROJ}' has shape \(16, 8\), expected \(8, 16\)"):
        models.load(copy)


def test_unsupported_dtype(copy):
    _edit_tensors(copy, lambda t: t.update({Q_PROJ: t[Q_PROJ].astype(np.int8)}))
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}' has unsupported dtype I8"):
        models.load(copy)


def test_truncated_safetensors(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        models.load(copy)


def test_missing_shard(copy):
    path = copy / "model.safetensors"
    tensors = load_file(path)
    path.unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, copy / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002.safetensors' does not exist"):
        models.load(copy)
    save_file({n: tensors[n] for n in names[5:]}, copy / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    sharded = models.load(copy)  # complete now
    np.testing.assert_array_equal(sharded.params["norm"]["scale"], tensors["model.norm.weight"])


def test_malformed_config_json(copy):
    (copy / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ConfigError, match=r"config.json: malformed JSON"):
        models.load(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json"):
        models.load(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="mistral"), r"config.json: 'model_type' is 'mistral'"),
        (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0),
         r"config.json: 'rope_parameters.rope_type' is 'yarn'"),
        (lambda c: c.update(use_sliding_window=True, sliding_window=8,
                            layer_types=["sliding_attention"] * c["num_hidden_layers"]),
         r"config.json: 'use_sliding_window' is true and layers 0\.\."),
        (lambda c: c.pop("hidden_size"), r"config.json: 'hidden_size' is missing"),
        (lambda c: c.update(num_key_value_heads=3), r"config.json: .*multiple of num_key_value_heads"),
        (lambda c: c.update(vocab_size="40"), r"config.json: 'vocab_size' must be an integer"),
    ],
    ids=["model_type", "rope_type", "sliding_window", "missing_key", "heads", "type"],
)
def test_bad_config(copy, edit, message):
    _edit_config(copy, edit)
    with pytest.raises(ConfigError, match=message):
        models.load(copy)


def test_no_stop_token_anywhere_names_the_overrides(copy):
    _edit_config(copy, lambda c: c.update(eos_token_id=None))
    (copy / "generation_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no eos_token_id.*eos_token_ids=\[\.\.\.\].*pad_token_id="):
        models.load(copy)
    lm = models.load(copy, eos_token_ids=np.int64(2))
    assert lm.eos_token_ids == (2,) and lm.pad_token_id == 2
    lm = models.load(copy, eos_token_ids=[3, 2], pad_token_id=0)
    assert lm.eos_token_ids == (3, 2) and lm.pad_token_id == 0
    with pytest.raises(ArgumentError, match=r"eos_token_ids must be an integer in \[0, 39\], got 40"):
        models.load(copy, eos_token_ids=[40])
    with pytest.raises(ArgumentError, match=r"pad_token_id must be an integer in \[0, 39\], got -1"):
        models.load(copy, eos_token_ids=[2], pad_token_id=-1)


def test_stale_index_beside_model_safetensors_is_ignored_as_transformers_does(copy):
    # a sharded save followed by a single-file save leaves the old index behind
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {Q_PROJ: "gone.safetensors"}}))
    with pytest.warns(UserWarning, match="both model.safetensors and model.safetensors.index.json"):
        lm = models.load(copy)
    assert lm.config == CONFIG


def test_tied_checkpoint_lm_head_must_equal_the_embedding(copy):
    _edit_config(copy, lambda c: c.update(tie_word_embeddings=True))  # the stored head is untied
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' differs from 'model.embed_tokens.weight'.*tie_word_embeddings"):
        models.load(copy)
    _edit_tensors(copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert models.load(copy).config.tie_word_embeddings  # older tied checkpoints store the same matrix twice


@pytest.mark.parametrize("key, value, override", [
    ("pad_token_id", -1, {"pad_token_id": 0}),
    ("eos_token_id", [1, 128009], {"eos_token_ids": [1]}),
    ("bos_token_id", 128000, {"bos_token_id": 1}),
])
def test_overrides_rescue_out_of_vocabulary_ids_in_config_json(copy, key, value, override):
    _edit_config(copy, lambda c: c.update({key: value}))
    with pytest.raises(ConfigError, match=r"outside the vocabulary \[0, 40\); js.load\(\.\.\., (pad|eos|bos)_token_ids?="):
        models.load(copy)
    lm = models.load(copy, **override)
    expected = {"pad_token_id": lm.pad_token_id == 0, "eos_token_id": lm.eos_token_ids == (1,), "bos_token_id": lm.config.bos_token_id == 1}
    assert expected[key]


def test_generation_config_stop_ids_are_checked_against_the_vocabulary(copy):
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 500]}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id 500 is outside the vocabulary"):
        models.load(copy)
    assert models.load(copy, eos_token_ids=[1]).eos_token_ids == (1,)


@pytest.mark.parametrize("value, expected", [(jnp.int32(3), (3,)), (np.array(3), (3,)), (np.array([3, 1]), (3, 1)), ((2,), (2,))])
def test_stop_token_override_accepts_integer_scalars_and_sequences(saved, value, expected):
    assert models.load(saved[0], eos_token_ids=value).eos_token_ids == expected


@pytest.mark.parametrize("value", [True, 3.0, [], [1.0], "3", np.zeros((1, 1), np.int32)])
def test_stop_token_override_refuses_what_is_not_token_ids(saved, value):
    with pytest.raises(ArgumentError, match=r"eos_token_ids must be a token id or a non-empty sequence of token ids"):
        models.load(saved[0], eos_token_ids=value)


def test_overrides_replace_the_checkpoint_stop_tokens(copy):
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert models.load(copy, eos_token_ids=[4]).eos_token_ids == (4,)


def test_generation_config_adds_stop_tokens(copy):
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert models.load(copy).eos_token_ids == (1, 7)


def test_dtype_cast_and_bad_dtype(saved):
    directory, _ = saved
    assert models.load(directory, dtype=jnp.bfloat16).params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    with pytest.raises(ArgumentError, match=r"dtype must be one of 'float32', 'float16', 'bfloat16', got .*int32"):
        models.load(directory, dtype=jnp.int32)
    with pytest.raises(ArgumentError, match=r"dtype must be one of .*, got 'float7'"):
        models.load(directory, dtype="float7")


@pytest.mark.parametrize("path", ["", b"", None])
def test_empty_path_is_refused_not_the_current_directory(path):
    with pytest.raises(ArgumentError, match=r"path_or_name must be a checkpoint directory"):
        models.load(path)


def test_non_finite_weights_name_the_tensor(copy):
    def poison(tensors):
        tensors[Q_PROJ] = tensors[Q_PROJ].copy()
        tensors[Q_PROJ][3, 5] = np.nan

    _edit_tensors(copy, poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{Q_PROJ}' holds 1 non-finite value\(s\).*check_finite=False"):
        models.load(copy)
    assert np.isnan(models.load(copy, check_finite=False).params["layers"][1]["self_attn"]["q_proj"]["kernel"]).any()


def test_weights_that_overflow_the_requested_dtype_are_refused(copy):
    _edit_tensors(copy, lambda t: t.update({K_PROJ: np.full_like(t[K_PROJ], 1e6)}))
    models.load(copy)  # finite in float32
    with pytest.raises(CheckpointError, match=rf"'{K_PROJ}' holds 128 non-finite .*after the cast to float16"):
        models.load(copy, dtype="float16")


@pytest.fixture(scope="module")
def toy_tokenizer():
    return models.load("toy-decisions").tokenizer


def test_tokenizer_smaller_than_the_vocabulary_loads(copy, toy_tokenizer):
    toy_tokenizer.save(copy)
    lm = models.load(copy)
    assert len(lm.tokenizer) == 13 < lm.vocab_size == 40


def test_tokenizer_larger_than_the_vocabulary_is_refused(copy, toy_tokenizer):
    toy_tokenizer.save(copy)
    _edit_config(copy, lambda c: c.update(vocab_size=12))
    with pytest.raises(CheckpointError, match=r"tokenizer has 13 tokens but the model's vocab_size is 12"):
        models.load(copy)


def test_tokenizer_config_without_tokenizer_json_is_refused(copy, toy_tokenizer):
    toy_tokenizer.save(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json is present but tokenizer.json is missing"):
        models.load(copy)
    (copy / "tokenizer_config.json").unlink()
    assert models.load(copy).tokenizer is None


def test_import_and_safetensors_loading_work_without_the_gguf_package(saved, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    script = f"""
import sys

class NoGGUF:
    def find_spec(self, name, path=None, target=None):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf' (blocked by the test)")

sys.meta_path.insert(0, NoGGUF())
import jaxsample
from jaxsample.errors import CheckpointError
assert "gguf" not in sys.modules
assert jaxsample.load({str(saved[0])!r}).vocab_size == 40
try:
    jaxsample.load({str(fake)!r})
except CheckpointError as e:
    assert "needs the gguf package" in str(e), e
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2], env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_unknown_path_or_name():
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model'.*registered models: .*smollm2-135m-instruct"):
        models.load("no-such-model")


def test_corrupt_tokenizer_json(copy):
    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint: cannot load the tokenizer"):
        models.load(copy)
