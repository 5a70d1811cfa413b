"""Row operations: gathers equal `jnp.take` and run in place; `Shared` parts (the prompt
cache every row continues) are never gathered, selected or copied per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample.rows import Shared, gather_rows, map_rows, select_rows

VOCAB, EOS = 6, 5


def _logits_fn(tokens):
    table = jax.random.normal(jax.random.key(7), (VOCAB, 11, VOCAB)) * 2.0
    return table[tokens, jnp.cumsum(tokens) % 11]


# (8, 2, 4, 41, 32): 41 slots in slices of 3 and a last slice of 2.
@pytest.mark.parametrize("shape", [(8, 3), (8, 4, 2, 32, 64), (8, 2, 4, 41, 32), (8, 3, 5, 7)])
def test_gather_equals_take_with_repeated_and_dropped_rows(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    indices = jnp.asarray([3, 3, 0, 7, 7, 7, 1, 2])
    tree = {"rows": x, "prompt": Shared(jnp.arange(5.0))}
    out = jax.jit(gather_rows)(tree, indices)
    np.testing.assert_array_equal(out["rows"], jnp.take(x, indices, axis=0))
    np.testing.assert_array_equal(out["prompt"].value, jnp.arange(5.0))
    fewer = gather_rows(tree, indices[:3])  # other row counts: a plain gather
    np.testing.assert_array_equal(fewer["rows"], x[np.asarray(indices[:3])])


@pytest.mark.parametrize("slots", [512, 513])  # 513: 15 slices of 33 slots and one of 18
def test_large_gather_runs_in_place(slots):
    """The compiled gather of a donated 32 MiB cache needs one slice (about 1/16: ⌈S/16⌉ of
    its S slots) of scratch, twice (the slice and its gathered rows), not a second cache."""
    cache = jax.ShapeDtypeStruct((64, 4, 2, slots, 64), jnp.float32)
    indices = jax.ShapeDtypeStruct((64,), jnp.int32)
    compiled = jax.jit(gather_rows, donate_argnums=0).lower(cache, indices).compile()
    stats = compiled.memory_analysis()
    size = 64 * 4 * 2 * slots * 64 * 4
    assert stats.alias_size_in_bytes == size
    slice_bytes = size * -(-slots // 16) / slots
    assert stats.temp_size_in_bytes <= 2 * slice_bytes + 2**16, stats.temp_size_in_bytes
    plain = jax.jit(lambda x, i: jnp.take(x, i, axis=0), donate_argnums=0).lower(cache, indices).compile()
    assert plain.memory_analysis().temp_size_in_bytes + plain.memory_analysis().output_size_in_bytes >= size


def test_select_and_map_keep_shared_parts():
    new = {"x": jnp.ones((3, 2)), "p": Shared(jnp.zeros(4))}
    old = {"x": jnp.zeros((3, 2)), "p": Shared(jnp.ones(4))}
    picked = select_rows(jnp.asarray([True, False, True]), new, old)
    np.testing.assert_array_equal(picked["x"][:, 0], [1, 0, 1])
    np.testing.assert_array_equal(picked["p"].value, jnp.zeros(4))
    doubled = map_rows(lambda x: 2 * x, new)
    np.testing.assert_array_equal(doubled["p"].value, jnp.zeros(4))


@pytest.mark.parametrize("prompt_length", [1, 4])
def test_rows_share_one_prompt_cache_and_match_the_full_forward(prompt_length):
    """Rows of a `[T]` prompt hold one prompt copy and only their own generated slots; the
    log p they record equals the full forward's (toy model: its cache is a token buffer)."""
    lm = js.LanguageModel.from_logits_fn(_logits_fn, VOCAB, EOS, max_length=16)
    prompt = jnp.asarray([1, 2, 3, 4][:prompt_length])
    state = js.init_decode(lm, prompt, 5, 6)
    assert state.prompt_cache.value.tokens.shape == (1, prompt_length)
    assert state.cache.tokens.shape == (5, 7)  # the prompt's last token + 6 generated
    state, _ = js.extend(jax.random.key(0), lm, state, 6, js.Proposal(1.0).validated())
    state = js.take_rows(state, jnp.asarray([4, 4, 1, 0, 2]))
    for row in range(5):
        n = int(state.length[row])
        sequence = jnp.concatenate([prompt, state.tokens[row, :n]])
        log_p = jax.nn.log_softmax(_logits_fn(sequence), axis=-1)
        expected = log_p[jnp.arange(prompt_length - 1, prompt_length - 1 + n), state.tokens[row, :n]]
        np.testing.assert_allclose(state.log_p[row, :n], expected, atol=1e-5)
    cuts = np.minimum([0, 1, 2, 0, 3], state.length)
    rewound = js.rewind(lm, state, jnp.asarray(cuts))
    for row, kept in enumerate(cuts):
        sequence = jnp.concatenate([prompt, state.tokens[row, :kept]])
        np.testing.assert_allclose(rewound.next_logits[row], _logits_fn(sequence)[-1], atol=1e-5)
