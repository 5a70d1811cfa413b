"""Prefill + cached decoding reproduce the full forward; per-layer functions; recompiles."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models, parallel
from jaxsample.errors import ArgumentError
from jaxsample.models import lora

# Same f32 math on both paths, only the attention width differs (T vs S slots, masked with
# exact zeros), so differences are summation-order rounding: observed ≤ 1e-6.
ATOL = 1e-5

CONFIG = models.ModelConfig(
    model_type="llama",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
    rope_theta=50.0,
    rope_scaling=models.Llama3RopeScaling(8.0, 1.0, 4.0, 16),
    qkv_bias=True,
    o_bias=True,
    eos_token_ids=(0,),
)


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_params(config, seed):
    """`init_params` layout with every leaf redrawn at O(1) scale (as in
    `testing.rerandomize_torch_model`); one normal draw for all leaves, since each draw is a
    separate (slow) XLA compile."""
    leaves, treedef = jax.tree.flatten_with_path(models.init_params(jax.random.key(seed), config))
    noise = jax.random.normal(jax.random.key(seed + 1), (sum(leaf.size for _, leaf in leaves),))
    redrawn, offset = [], 0
    for path, leaf in leaves:
        z = noise[offset : offset + leaf.size].reshape(leaf.shape)
        offset += leaf.size
        kind = path[-1].key
        if kind == "scale":
            redrawn.append(1.0 + 0.3 * z)
        elif kind == "bias":
            redrawn.append(0.3 * z)
        elif kind == "embedding":
            redrawn.append(z)
        else:
            redrawn.append(z / np.sqrt(leaf.shape[-2]))
    return jax.tree.unflatten(treedef, redrawn)


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, 0)


@pytest.fixture(scope="module")
def lm(params):
    return models.make_language_model(CONFIG, params, name="tiny")


def _forward(params, sequence):
    return np.asarray(models.forward(params, CONFIG, jnp.asarray(sequence)[None]))[0]


def test_prefill_and_decode_match_forward_for_ragged_batch(params, lm):
    rng = np.random.default_rng(0)
    lengths = [5, 9, 2]
    steps = 8
    # Equal-length sequences (one compile of the per-sequence forward); prompts cut at n.
    sequences = [rng.integers(0, CONFIG.vocab_size, size=max(lengths) + steps) for _ in lengths]
    prompts = np.zeros((3, max(lengths)), np.int32)  # right-padded with 0
    for row, n in enumerate(lengths):
        prompts[row, :n] = sequences[row][:n]

    logits, cache = lm.prefill(jnp.asarray(prompts), jnp.asarray(lengths), lm.init_cache(3, 24))
    references = [_forward(params, s) for s in sequences]
    deltas = [np.abs(logits[row] - references[row][n - 1]).max() for row, n in enumerate(lengths)]
    for step in range(steps):
        tokens = jnp.asarray([s[n + step] for s, n in zip(sequences, lengths)])
        logits, cache = lm.decode(tokens, cache)
        deltas += [np.abs(logits[row] - references[row][n + step]).max() for row, n in enumerate(lengths)]
    np.testing.assert_array_equal(cache.length, np.asarray(lengths) + steps)
    print(f"\nprefill/decode vs forward: max|Δlogit| = {max(deltas):.2e}")
    assert max(deltas) <= ATOL


def test_rewound_rows_continue_from_their_new_length(params, lm):
    rng = np.random.default_rng(1)
    sequence = rng.integers(0, CONFIG.vocab_size, size=12)
    logits, cache = lm.prefill(jnp.asarray(np.stack([sequence[:8]] * 2)), jnp.asarray([8, 8]), lm.init_cache(2, 16))
    for token in sequence[8:11]:
        logits, cache = lm.decode(jnp.asarray([token, token]), cache)
    # Row 0 keeps going; row 1 is cut back to 3 tokens (inside its prompt) and diverges.
    cache = cache._replace(length=jnp.asarray([11, 3], jnp.int32))
    new_tokens = rng.integers(0, CONFIG.vocab_size, size=4)
    row1 = np.concatenate([sequence[:3], new_tokens])
    for step, token in enumerate(new_tokens):
        logits, cache = lm.decode(jnp.asarray([sequence[11] if step == 0 else token, token]), cache)
        np.testing.assert_allclose(logits[1], _forward(params, row1)[3 + step], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        logits[0], _forward(params, np.concatenate([sequence, new_tokens[1:]]))[-1], atol=ATOL, rtol=0
    )


def _decode_on_prefix(params, lm, prefix, row_prompts, continuations, capacity):
    """Feeds `continuations[:, step]` to fresh rows on `prefix`, step by step; returns the
    max |Δlogit| against the forward of each row's `row_prompts[row]` + continuation so far,
    per row and step, and the cache."""
    cache, deltas = lm.init_cache(len(row_prompts), capacity), []
    for step in range(continuations.shape[1]):
        logits, cache = lm.decode(jnp.asarray(continuations[:, step]), cache, prefix=prefix)
        for row, prompt in enumerate(row_prompts):
            reference = _forward(params, np.concatenate([prompt, continuations[row, : step + 1]]))[-1]
            deltas.append(np.abs(logits[row] - reference).max())
    return deltas, cache


def test_rows_decoding_on_a_shared_prefix_match_forward(params, lm):
    """Rows continue one prefilled prefix (no copy of it per row), rewind and diverge."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, CONFIG.vocab_size, size=9)
    _, prefix = lm.prefill(jnp.asarray(prompt)[None], jnp.asarray([9]), lm.init_cache(1, 12))
    prefix = prefix._replace(length=jnp.asarray([6], jnp.int32))  # rows continue prompt[:6]
    continuations = rng.integers(0, CONFIG.vocab_size, size=(3, 7))
    deltas, cache = _decode_on_prefix(params, lm, prefix, [prompt[:6]] * 3, continuations, 8)
    cache = cache._replace(length=jnp.asarray([7, 2, 0], jnp.int32))
    fed = rng.integers(0, CONFIG.vocab_size, size=3)
    logits, _ = lm.decode(jnp.asarray(fed), cache, prefix=prefix)
    for row, kept in enumerate([7, 2, 0]):
        reference = _forward(params, np.concatenate([prompt[:6], continuations[row, :kept], fed[row : row + 1]]))
        deltas.append(np.abs(logits[row] - reference[-1]).max())
    print(f"\nshared-prefix decode vs forward: max|Δlogit| = {max(deltas):.2e}")
    assert max(deltas) <= ATOL
    with pytest.raises(ArgumentError, match="must divide the 3 decoded rows"):
        lm.decode(jnp.asarray(fed), cache, prefix=lm.init_cache(2, 12))


def test_groups_of_rows_decoding_on_their_own_prefixes_match_forward(params, lm):
    """Two prompts of different lengths in one two-row prefix: rows 0-1 continue the first,
    rows 2-3 the second, each at its own positions."""
    rng = np.random.default_rng(4)
    prompts = rng.integers(0, CONFIG.vocab_size, size=(2, 9))
    kept = np.asarray([6, 9])
    _, prefix = lm.prefill(jnp.asarray(prompts), jnp.asarray(kept), lm.init_cache(2, 9))
    continuations = rng.integers(0, CONFIG.vocab_size, size=(4, 5))
    row_prompts = [prompts[row // 2, : kept[row // 2]] for row in range(4)]
    deltas, _ = _decode_on_prefix(params, lm, prefix, row_prompts, continuations, 5)
    print(f"\ngrouped-prefix decode vs forward: max|Δlogit| = {max(deltas):.2e}")
    assert max(deltas) <= ATOL


def test_decode_step_updates_a_donated_cache_in_place(lm):
    """No copy of the cache per step: the compiled step aliases the donated cache, and its
    scratch stays under one layer's K and V (the slice the attention reads; 2/L of the cache)
    plus activations — far below a second cache."""
    cache = jax.eval_shape(lambda: lm.init_cache(32, 48))
    prefix = jax.eval_shape(lambda: lm.init_cache(1, 16))
    tokens = jax.ShapeDtypeStruct((32,), jnp.int32)
    step = jax.jit(lambda lm, t, c, p: lm.decode(t, c, prefix=p)[1], donate_argnums=2)
    stats = step.lower(lm, tokens, cache, prefix).compile().memory_analysis()
    cache_bytes = 2 * cache.k.size * cache.k.dtype.itemsize
    assert stats.alias_size_in_bytes >= cache_bytes
    assert stats.temp_size_in_bytes <= cache_bytes * (2 / CONFIG.num_hidden_layers + 0.25), stats.temp_size_in_bytes


@pytest.mark.parametrize("lengths", [(3, 40), (3, 100), (150, 7)])
def test_decode_attending_over_the_filled_width_or_the_capacity_matches_forward(params, lengths):
    """A 200-slot cache attends over 64, 128 or 200 slots, whichever holds every row, or
    over all 200."""
    config = dataclasses.replace(CONFIG, max_position_embeddings=256)
    assert models.decoder.filled_widths(200) == (200, 128, 64)
    rng = np.random.default_rng(4)
    sequences = rng.integers(0, CONFIG.vocab_size, size=(2, max(lengths) + 1))
    fed = jnp.asarray([sequences[row, n] for row, n in enumerate(lengths)])
    for over_capacity in (False, True):
        lm = models.make_language_model(config, params)
        lm = lm.replace(decode_fn=models.DecodeStep(config, attend_over_capacity=over_capacity))
        _, cache = lm.prefill(jnp.asarray(sequences[:, :-1]), jnp.asarray(lengths), lm.init_cache(2, 200))
        logits, _ = lm.decode(fed, cache)
        for row, n in enumerate(lengths):
            reference = models.forward(params, config, jnp.asarray(sequences[row, : n + 1])[None])[0, -1]
            np.testing.assert_allclose(logits[row], reference, atol=ATOL, rtol=0, err_msg=f"{over_capacity} {row}")


def test_a_cache_cheap_to_read_beside_the_weights_is_read_whole_without_a_conditional_per_layer(monkeypatch):
    """XLA:GPU syncs the host with the device at every `conditional`; the width switch is one
    per layer, so on a GPU it is left out when reading the whole cache costs at most 1/8
    of the weights' read. Elsewhere (no sync) the switch stays."""
    config = dataclasses.replace(CONFIG, vocab_size=2048, max_position_embeddings=256)
    params = jax.eval_shape(lambda: models.unstack_layers(models.init_params(jax.random.key(0), config)))
    weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    slot_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    cheap = int(models.decoder.CAPACITY_READ_FRACTION * weight_bytes // slot_bytes)  # row-slots at the bound
    assert 64 < cheap < 256, cheap
    tokens = jax.ShapeDtypeStruct((1,), jnp.int32)
    cache = jax.eval_shape(lambda: models.init_cache(config, 1, cheap))
    if jax.default_backend() != "gpu":
        assert models.decoder.attention_widths(params, cache, None) == models.decoder.filled_widths(cheap)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capacity, expected in ((cheap, (cheap,)), (cheap + 1, models.decoder.filled_widths(cheap + 1))):
        cache = jax.eval_shape(lambda capacity=capacity: models.init_cache(config, 1, capacity))
        assert models.decoder.attention_widths(params, cache, None) == expected
        step = jax.jit(functools.partial(models.decode_step, config=config))
        text = step.lower(params, tokens=tokens, cache=cache).compile().as_text()
        conditionals = len(re.findall(r" conditional\(", text))
        assert conditionals == (0 if len(expected) == 1 else config.num_hidden_layers), (capacity, conditionals)


@pytest.mark.parametrize("chunks", [4, 40])
def test_decoding_the_mlp_in_blocks_matches_decoding_it_whole(chunks):
    """Blocks of the intermediate features (`decode_step(mlp_chunks=)`, the CPU default for
    large MLPs) sum to the whole MLP: with MLP biases (the down bias added once) and LoRA on
    gate, up and down (its B, resp. A, cut into the same blocks)."""
    config = dataclasses.replace(CONFIG, mlp_bias=True)
    params = random_params(config, 7)
    adapters = lora.init_lora(jax.random.key(8), config, 3, 6.0, ("gate_proj", "up_proj", "down_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: 0.3 * jnp.cos(jnp.arange(x.size) + 1.0).reshape(x.shape),
                                                     adapters.weights))
    lm = models.make_language_model(config, params).with_adapters(adapters)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, config.vocab_size, size=(2, 6)))
    _, cache = lm.prefill(tokens[:, :-1], jnp.asarray([5, 2]), lm.init_cache(2, 8))
    decode = functools.partial(models.decode_step, params, config, tokens[:, -1], cache, adapters)
    whole, blocks = decode(mlp_chunks=1), decode(mlp_chunks=chunks)
    np.testing.assert_allclose(blocks[0], whole[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(blocks[1].k, whole[1].k, atol=ATOL, rtol=0)
    reference = lm.logits(jnp.concatenate([tokens[1:, :2], tokens[1:, -1:]], axis=1))[0, -1]
    np.testing.assert_allclose(blocks[0][1], reference, atol=ATOL, rtol=0)


def _add_layer_vector(layer, h, vectors):
    return h + vectors[layer]


@pytest.mark.parametrize("chunks", [1, 4])
def test_per_layer_params_decode_as_the_layer_scan(chunks):
    """Per-layer params (the layers unrolled, each weight a whole array) give the stacked
    scan's logits, features and cache, with LoRA, an intervention on two of the three blocks,
    a shared prefix, and the stacked MLP whole or in blocks."""
    config = dataclasses.replace(CONFIG, mlp_bias=True)
    params = random_params(config, 11)
    adapters = lora.init_lora(jax.random.key(12), config, 3, 6.0, ("q_proj", "gate_proj", "down_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: 0.3 * jnp.sin(jnp.arange(x.size) + 1.0).reshape(x.shape),
                                                     adapters.weights))
    vectors = 0.5 * jnp.cos(jnp.arange(3 * config.hidden_size, dtype=jnp.float32)).reshape(3, -1)
    intervention = models.Intervention(fn=_add_layer_vector, params=vectors, layers=(0, 2))
    lm = models.make_language_model(config, params).with_adapters(adapters)
    rng = np.random.default_rng(13)
    _, prefix = lm.prefill(jnp.asarray(rng.integers(0, config.vocab_size, size=(1, 5))), jnp.asarray([5]), lm.init_cache(1, 8))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 4)))
    _, cache = lm.prefill(tokens[:, :-1], jnp.asarray([3, 1]), lm.init_cache(2, 8))
    decode = functools.partial(models.decode_step, config=config, tokens=tokens[:, -1], cache=cache, adapters=adapters,
                               with_features=True, prefix=prefix)
    scanned = decode(params, intervention=intervention, mlp_chunks=chunks)
    per_layer = decode(models.unstack_layers(params), intervention=intervention)
    for name, a, b in zip(("logits", "features"), per_layer[:2], scanned[:2]):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)
    chex.assert_trees_all_close(per_layer[2], scanned[2], atol=ATOL, rtol=0)
    assert np.abs(np.asarray(scanned[0]) - np.asarray(decode(params, intervention=None)[0])).max() > 0.1


def test_a_model_with_per_layer_params_runs_forward_prefill_and_generate_as_the_stacked_one():
    """Per-layer params: the layers unrolled in forward, prefill and the decode loop; the same
    hidden states, logits, cache and generations as the stacked layer scan."""
    params = random_params(CONFIG, 5)
    adapters = lora.init_lora(jax.random.key(6), CONFIG, 2, 4.0, ("v_proj", "up_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: 0.3 * jnp.sin(jnp.arange(x.size) + 2.0).reshape(x.shape),
                                                     adapters.weights))
    vectors = 0.5 * jnp.cos(jnp.arange(3 * CONFIG.hidden_size, dtype=jnp.float32)).reshape(3, -1)
    stacked = models.make_language_model(CONFIG, params).with_adapters(adapters).with_intervention(
        models.Intervention(fn=_add_layer_vector, params=vectors, layers=(1,), positions="all"))
    per_layer = stacked.replace(params=models.unstack_layers(params))
    tokens = jnp.asarray(np.random.default_rng(7).integers(1, CONFIG.vocab_size, size=(2, 6)))
    for output in ("logits", "hidden_states"):
        np.testing.assert_allclose(per_layer.forward(tokens, output=output), stacked.forward(tokens, output=output),
                                   atol=ATOL, rtol=0, err_msg=output)
    lengths = jnp.asarray([6, 3])
    ours, theirs = (lm.prefill(tokens, lengths, lm.init_cache(2, 10)) for lm in (per_layer, stacked))
    chex.assert_trees_all_close(ours, theirs, atol=ATOL, rtol=0)
    ours, theirs = (js.generate(jax.random.key(8), lm, tokens[0], 8, num_samples=4) for lm in (per_layer, stacked))
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    np.testing.assert_allclose(ours.log_p, theirs.log_p, atol=ATOL, rtol=0)


def test_the_layer_wise_functions_lora_merge_export_and_sharding_read_per_layer_params_as_stacked_ones():
    params = random_params(CONFIG, 3)
    per_layer = models.unstack_layers(params)
    assert len(per_layer["layers"]) == CONFIG.num_hidden_layers
    chex.assert_trees_all_equal(per_layer["layers"][1], jax.tree.map(lambda leaf: leaf[1], params["layers"]))
    chex.assert_trees_all_equal(models.stack_layers(per_layer), params)
    assert models.unstack_layers(per_layer) is per_layer and models.stack_layers(params) is params
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(1, 3, CONFIG.hidden_size)), jnp.float32)
    layer_wise = {
        "apply_layer": lambda p, i: models.apply_layer(p, CONFIG, i, h, jnp.arange(3)),
        "apply_layer_at_last": lambda p, i: models.decoder.apply_layer_at_last(p, CONFIG, i, h[:, :2], h[:, 2], jnp.arange(3)),
    }
    for name, fn in layer_wise.items():
        outputs = [fn(per_layer, i) for i in range(CONFIG.num_hidden_layers)]  # Python ints
        traced = jax.jit(fn)  # the index traced: lax.switch over per-layer params
        for i, output in enumerate(outputs):
            np.testing.assert_allclose(output, fn(params, i), atol=ATOL, rtol=0, err_msg=f"{name} layer {i}")
            np.testing.assert_allclose(traced(per_layer, i), output, atol=ATOL, rtol=0, err_msg=f"{name} traced {i}")
        assert np.abs(np.asarray(outputs[0]) - np.asarray(outputs[1])).max() > 0.1, name
        for layout in (per_layer, params):
            with pytest.raises(ArgumentError, match=r"layer must be an integer in \[0, 2\], got 3"):
                fn(layout, 3)
    adapters = lora.init_lora(jax.random.key(0), CONFIG, 2, 4.0, ("q_proj", "down_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size) + 3.0).reshape(x.shape),
                                                     adapters.weights))
    chex.assert_trees_all_close(models.stack_layers(lora.merge(per_layer, adapters)), lora.merge(params, adapters),
                                atol=1e-6, rtol=0)
    exported, expected = (models.checkpoint.to_hf_tensors(p, CONFIG) for p in (per_layer, params))
    chex.assert_trees_all_equal(exported, expected)
    mesh = parallel.make_mesh(data=1)
    shardings = parallel.param_shardings(mesh, per_layer, CONFIG)
    stacked_spec = parallel.param_shardings(mesh, params, CONFIG)["layers"]["mlp"]["down_proj"]["kernel"].spec
    assert tuple(shardings["layers"][1]["mlp"]["down_proj"]["kernel"].spec) == tuple(stacked_spec)[1:] == ("model", None)


def test_per_layer_params_of_the_wrong_depth_or_with_mlp_blocks_are_refused():
    per_layer = models.unstack_layers(random_params(CONFIG, 3))
    cache = models.init_cache(CONFIG, 2, 8)
    decode = functools.partial(models.decode_step, config=CONFIG, tokens=jnp.ones((2,), jnp.int32), cache=cache)
    with pytest.raises(ArgumentError, match=r"per-layer params run each MLP whole .* got mlp_chunks=4"):
        decode(per_layer, mlp_chunks=4)
    with pytest.raises(ArgumentError, match=r"per-layer params hold 2 layers, the config 3"):
        decode({**per_layer, "layers": per_layer["layers"][:2]})


def test_mlp_blocks_hold_one_block_of_weights_at_a_time():
    """The layer scan no longer copies a layer's whole gate, up and down matrices (XLA:CPU
    copies a dynamic slice before the matmul reads it): the compiled step's scratch shrinks by
    more than two matrices when the MLP runs in 8 blocks."""
    config = dataclasses.replace(CONFIG, hidden_size=64, intermediate_size=4096, num_hidden_layers=2)
    params = jax.eval_shape(lambda: models.init_params(jax.random.key(0), config))
    cache = jax.eval_shape(lambda: models.init_cache(config, 4, 16))
    tokens = jax.ShapeDtypeStruct((4,), jnp.int32)

    def scratch(chunks):
        step = jax.jit(functools.partial(models.decode_step, config=config, mlp_chunks=chunks))
        return step.lower(params, tokens=tokens, cache=cache).compile().memory_analysis().temp_size_in_bytes

    matrix_bytes = config.hidden_size * config.intermediate_size * 4
    assert scratch(8) < scratch(1) - 2 * matrix_bytes, (scratch(8), scratch(1), matrix_bytes)


def test_the_default_device_decides_the_platform_the_step_is_traced_for(monkeypatch):
    """`jax.default_device` (a compile-only GPU of `jax.experimental.topologies` in
    `bench_memory --gpu-target`) wins over JAX's default backend."""
    chunks = models.decoder.default_mlp_chunks
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert models.decoder.target_platform() == "gpu" and chunks(896, 4864, jnp.float32) == 1
    with jax.default_device(jax.devices("cpu")[0]):
        assert models.decoder.target_platform() == "cpu" and chunks(896, 4864, jnp.float32) == 16
    with jax.default_device("cpu"):
        assert models.decoder.target_platform() == "cpu"


def test_the_default_mlp_blocks_divide_the_intermediate_size_within_the_slice_budget():
    chunks = models.decoder.default_mlp_chunks
    if jax.default_backend() != "cpu":
        assert chunks(576, 1536, jnp.float32) == 1
        return
    assert chunks(576, 1536, jnp.float32) == 2  # SmolLM2: 768 of 576 floats, 1.7 MiB; 1536: 3.4 MiB
    assert chunks(576, 1536, jnp.bfloat16) == 1
    assert chunks(896, 4864, jnp.float32) == 16  # Qwen2.5-0.5B: 304 columns, 1.04 MiB; 608: 2.08 MiB
    assert chunks(3584, 18944, jnp.float32) == 148  # Qwen2.5-7B: 128 columns, 1.75 MiB
    assert chunks(CONFIG.hidden_size, CONFIG.intermediate_size, jnp.float32) == 1


def test_out_of_range_lengths_give_nan_logits_not_clamped_values(lm):
    tokens = jnp.ones((2, 4), jnp.int32)
    logits, features, _ = lm.prefill(tokens, jnp.asarray([0, 4]), lm.init_cache(2, 4), with_features=True)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()
    assert np.isnan(features[0]).all() and np.isfinite(features[1]).all()
    _, cache = lm.prefill(tokens, jnp.asarray([4, 3]), lm.init_cache(2, 4))
    logits, cache = lm.decode(jnp.asarray([1, 1]), cache)  # row 0 is at capacity
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


@pytest.mark.parametrize("capacity", [1, 2, 63])
def test_decode_into_a_cache_narrower_than_64_slots_matches_forward(params, lm, capacity):
    """Every slot of a small cache, the first one included, decodes as the full forward."""
    rng = np.random.default_rng(5)
    sequences = rng.integers(0, CONFIG.vocab_size, size=(2, capacity))
    cache = lm.init_cache(2, capacity)
    for step in range(capacity):
        logits, cache = lm.decode(jnp.asarray(sequences[:, step]), cache)
    for row in range(2):
        np.testing.assert_allclose(logits[row], _forward(params, sequences[row])[-1], atol=ATOL, rtol=0)


def test_filled_widths_are_the_capacity_then_powers_of_two_down_to_64():
    widths = models.decoder.filled_widths
    assert [widths(c) for c in (1, 2, 64, 65, 128, 129)] == [(1,), (2,), (64,), (65, 64), (128, 64), (129, 128, 64)]


def test_prefill_lengths_must_hold_one_entry_per_row(lm):
    tokens = jnp.ones((2, 4), jnp.int32)
    for lengths in (jnp.asarray([3]), jnp.int32(3), jnp.asarray([3, 4, 2]), jnp.asarray([[3, 4]])):
        expected = rf"lengths must have shape \[B\] = \(2,\) .* got {re.escape(str(lengths.shape))}"
        with pytest.raises(ArgumentError, match=expected):
            lm.prefill(tokens, lengths, lm.init_cache(2, 8))


@pytest.mark.parametrize(
    "bad, message",
    [
        (-1, r"holds -1 at index \((0, )?1,?\), outside the vocabulary \[0, 61\)"),
        (61, r"holds 61 at index \((0, )?1,?\), outside the vocabulary \[0, 61\)"),
        (2**32 + 1, r"holds 4294967297 .* outside the vocabulary"),  # would wrap to 1 in int32
        (1.5, "must hold integers, got dtype float"),
    ],
)
def test_token_ids_outside_the_vocabulary_or_not_integers_are_rejected(lm, bad, message):
    tokens = np.asarray([3, bad])  # int64 / float64 as given, before any cast
    with pytest.raises(ArgumentError, match=message):
        lm.logits(tokens)
    with pytest.raises(ArgumentError, match=message):
        lm.logits(tokens[None])
    with pytest.raises(ArgumentError, match=message):
        lm.prefill(tokens[None], jnp.asarray([1]), lm.init_cache(1, 4))
    with pytest.raises(ArgumentError, match=message):
        lm.decode(tokens, lm.init_cache(2, 4))


def test_traced_token_ids_have_their_dtype_checked_and_their_values_unchecked(lm):
    """Values are unknown under jit (the decode loops), so no check of them runs there."""
    with pytest.raises(ArgumentError, match="must hold integers, got dtype float32"):
        jax.jit(lambda t: lm.decode(t, lm.init_cache(2, 4)))(jnp.asarray([1.0, 2.0]))
    logits, _ = jax.jit(lambda t: lm.decode(t, lm.init_cache(2, 4)))(jnp.asarray([1, CONFIG.vocab_size]))
    assert np.isfinite(logits[0]).all()


def test_per_layer_functions_compose_to_forward(params):
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=(2, 10)))
    positions = jnp.arange(10)
    h = models.embed(params, CONFIG, tokens)
    for i in range(CONFIG.num_hidden_layers):
        h = models.apply_layer(params, CONFIG, i, h, positions)
    np.testing.assert_allclose(
        models.final_logits(params, CONFIG, h), models.forward(params, CONFIG, tokens), atol=ATOL, rtol=0
    )

    @jax.jit
    def traced_layer_loop(params, h):  # the layer index may be traced (steering sweeps)
        body = lambda i, h: models.apply_layer(params, CONFIG, i, h, positions)
        return jax.lax.fori_loop(0, CONFIG.num_hidden_layers, body, h)

    np.testing.assert_allclose(
        traced_layer_loop(params, models.embed(params, CONFIG, tokens)), h, atol=ATOL, rtol=0
    )


def test_decode_step_does_not_retrace_when_values_change(params):
    """Lengths, cache content, params and even a second model object of the same config must
    reuse one compiled decode step (the bound functions compare equal by config)."""
    decode = jax.jit(chex.assert_max_traces(lambda lm, tokens, cache: lm.decode(tokens, cache), n=1))
    lm_a = models.make_language_model(CONFIG, params)
    lm_b = models.make_language_model(CONFIG, random_params(CONFIG, 5))
    _, cache = lm_a.prefill(jnp.ones((2, 3), jnp.int32), jnp.asarray([3, 1]), lm_a.init_cache(2, 16))
    for step in range(4):
        logits, cache = decode(lm_a if step % 2 else lm_b, jnp.asarray([step, step + 1]), cache)
    cache = cache._replace(length=jnp.asarray([2, 9], jnp.int32))
    logits, cache = decode(lm_a, jnp.asarray([3, 4]), cache)
    assert logits.shape == (2, CONFIG.vocab_size)


def test_bfloat16_params_run_with_float32_logits(params):
    lm16 = models.make_language_model(CONFIG, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab_size, size=(2, 16)))
    logits16 = lm16.logits(tokens)
    assert logits16.dtype == jnp.float32
    cache = lm16.init_cache(2, 20)
    assert cache.k.dtype == jnp.bfloat16
    log_p32 = jax.nn.log_softmax(models.forward(params, CONFIG, tokens))
    log_p16 = jax.nn.log_softmax(logits16)
    kl = jnp.sum(jnp.exp(log_p32) * (log_p32 - log_p16), axis=-1).mean()
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding); through 3 layers the
    # logit error is a few 1e-2, i.e. KL ~ 1e-3. A dtype bug (e.g. bf16 angles) is ≫ 1e-2.
    assert kl < 1e-2, kl


def test_bad_shapes_raise_argument_errors(params, lm):
    with pytest.raises(ArgumentError, match="capacity"):
        lm.prefill(jnp.ones((1, 9), jnp.int32), jnp.asarray([9]), lm.init_cache(1, 8))
    with pytest.raises(ArgumentError, match="max_position_embeddings"):
        models.forward(params, CONFIG, jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ArgumentError, match=r"capacity must be an integer in \[1, 64\], got 65"):
        models.init_cache(CONFIG, 1, 65)
    with pytest.raises(ArgumentError, match=r"batch_size must be an integer in \[1, inf\], got 0"):
        models.init_cache(CONFIG, 0, 8)
    with pytest.raises(ArgumentError, match="rows"):
        lm.decode(jnp.ones((3,), jnp.int32), lm.init_cache(2, 8))
    with pytest.raises(ArgumentError, match="dimensions"):
        lm.decode(jnp.ones((2, 1), jnp.int32), lm.init_cache(2, 8))
    with pytest.raises(ArgumentError, match=r"mlp_chunks must be a positive divisor of intermediate_size \(40\), got 3"):
        models.decode_step(params, CONFIG, jnp.ones((2,), jnp.int32), lm.init_cache(2, 8), mlp_chunks=3)
    with pytest.raises(ArgumentError, match=r"mlp_chunks must be an integer in \[1, inf\], got 0"):
        models.decode_step(params, CONFIG, jnp.ones((2,), jnp.int32), lm.init_cache(2, 8), mlp_chunks=0)
