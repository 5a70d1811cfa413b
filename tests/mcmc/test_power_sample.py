"""The jitted sampler against exact laws on tabular toys (`jaxsample.testing`);
determinism, recompilation, errors."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import testing
from jaxsample.errors import ArgumentError, VerificationError
from jaxsample.mcmc import (EntropyJump, PowerMHInfo, PowerMHState, build_kernel, entropy_jump, init,
                            power_sample, temperature_sample, uniform)
from jaxsample.mcmc.blocks import _power_sample

# 3 tokens + stop, up to 4 tokens: 121 completions.
LM = testing.random_tabular_lm(vocab_size=4, max_new_tokens=4, seed=2, temperature=1 / 1.5)
SPACE = testing.enumerate_completions(LM, [0], 4)
PROMPT = jnp.array([0], jnp.int32)
CUT_LAWS = {"uniform": uniform, "entropy": entropy_jump(4.0)}


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_long_chains_reach_power_target(cut):
    # One block = plain MH on π. The exact law after S steps (start from q, P^S) is within
    # `mixing` of π; the histogram must stay within the Monte Carlo bound plus that bias.
    alpha, num_chains, num_steps = 2.0, 16384, 60
    cut_law = CUT_LAWS[cut]
    kernel = testing.mh_transition_matrix(SPACE, cut_law, js.Proposal(1.0 / alpha),
                                          testing.power_log_ratio(alpha, cut_law))
    pi = testing.power_target(SPACE, alpha)
    mixing = testing.total_variation(kernel.law_after(num_steps), pi)
    assert mixing < 1e-3
    result = power_sample(jax.random.key(0), LM, PROMPT, alpha, cut=cut, num_chains=num_chains,
                          block_size=4, num_mcmc_steps=num_steps, max_new_tokens=4)
    testing.assert_tv_below(result, pi, bias=mixing)


def test_low_temperature_samples_fail_the_same_bound():
    alpha, num_chains = 2.0, 16384
    result = temperature_sample(jax.random.key(0), LM, PROMPT, alpha, num_chains=num_chains, max_new_tokens=4)
    # Exact TV(q-law, π) = 0.30.
    with pytest.raises(VerificationError, match="too far from the target"):
        testing.assert_tv_below(result, testing.power_target(SPACE, alpha))


# Block-wise sampling: 2 tokens + stop, up to 4 tokens (31 completions),
# 2 blocks of 2 tokens, 25 steps each, α = 2; one compiled program serves every test below.
BLOCK_LM = testing.random_tabular_lm(vocab_size=3, max_new_tokens=4, seed=1, temperature=0.5)
BLOCK_SPACE = testing.enumerate_completions(BLOCK_LM, [0], 4)
BLOCK_ALPHA = 2.0
BLOCKS = dict(num_chains=4096, block_size=2, num_mcmc_steps=25, max_new_tokens=4)


@pytest.fixture(scope="module")
def block_results():
    key = jax.random.key(1)
    return {"default": power_sample(key, BLOCK_LM, PROMPT, BLOCK_ALPHA, **BLOCKS),
            "early_stop": power_sample(key, BLOCK_LM, PROMPT, BLOCK_ALPHA, freeze_finished=True,
                                       **BLOCKS)}


def _block_law(freeze_finished):
    return testing.sampler_law(BLOCK_SPACE, uniform, js.Proposal(1.0 / BLOCK_ALPHA),
                               testing.power_log_ratio(BLOCK_ALPHA, uniform), BLOCKS["block_size"],
                               BLOCKS["num_mcmc_steps"], freeze_finished=freeze_finished)


def test_default_block_sampler_reaches_power_target_and_early_stop_does_not(block_results):
    pi = testing.power_target(BLOCK_SPACE, BLOCK_ALPHA)
    assert len(pi.states) == 31
    default_law, early_stop_law = _block_law(False), _block_law(True)
    # Exact laws: the default is 2e-4 from π after 25 steps; Karan & Du's early stop leaves
    # finished chains at block 0's target, 0.22 from π.
    mixing = testing.total_variation(default_law, pi)
    assert mixing < 1e-3 and testing.total_variation(early_stop_law, pi) > 0.2
    testing.assert_tv_below(block_results["default"], pi, bias=mixing)
    with pytest.raises(VerificationError, match="too far from the target"):
        testing.assert_tv_below(block_results["early_stop"], pi, bias=mixing)
    # Both runs follow their own exact law.
    testing.assert_tv_below(block_results["default"], default_law)
    testing.assert_tv_below(block_results["early_stop"], early_stop_law)


def test_karan_du_example_is_power_not_low_temperature():
    # Spec §1, α = 2: P(x_0 = a) is 0.16/0.285 = 0.5614 under p^α, 0.16/0.41 = 0.3902 at
    # τ = 1/2. Two blocks of one token, 40 steps each: the exact sampler law is 0.56140.
    lm, alpha, num_chains = testing.karan_du_example(), 2.0, 8192
    space = testing.enumerate_completions(lm, [0], 2)
    law = testing.sampler_law(space, uniform, js.Proposal(1.0 / alpha),
                              testing.power_log_ratio(alpha, uniform), block_size=1,
                              num_mcmc_steps=40)
    p_a = sum(mass for state, mass in zip(law.states, law.probs) if state[0] == 0)
    assert abs(p_a - 0.16 / 0.285) < 1e-4
    mh = power_sample(jax.random.key(2), lm, PROMPT, alpha, cut="uniform", num_chains=num_chains,
                      block_size=1, num_mcmc_steps=40, max_new_tokens=2)
    low = temperature_sample(jax.random.key(2), lm, PROMPT, alpha, num_chains=num_chains, max_new_tokens=2)
    for result, expected in [(mh, p_a), (low, 0.16 / 0.41)]:
        first_is_a = (np.asarray(result.tokens[:, 0]) == 0).astype(float)[:, None]
        testing.assert_unbiased(first_is_a, expected, failure_prob=1e-6)


def _tiny_transformer():
    from jaxsample import models
    from tests.models.test_kv_cache import CONFIG, random_params
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


@pytest.mark.parametrize("model, cut, freeze_finished, num_mcmc_steps", [
    ("tabular", "uniform", False, 3),
    ("tabular", "entropy", True, 3),
    ("tabular", "uniform", True, 0),
    ("transformer", "uniform", False, 2),
])
def test_chains_equal_the_lockstep_kernel_loop(model, cut, freeze_finished, num_mcmc_steps):
    # power_sample starts each chain's next move as soon as its proposal ends; every move's
    # keys are those of the lockstep loop of build_kernel steps, so the chains are the same.
    # Its floats come from another compiled program, whose fusions may round differently
    # (observed: 2 float32 ulps of a log-prob with XLA's elemental fusion emitters).
    if model == "tabular":
        lm, prompt, settings = BLOCK_LM, PROMPT, dict(num_chains=256, block_size=2, max_new_tokens=4)
    else:
        lm, prompt, settings = _tiny_transformer(), jnp.array([3, 1, 4, 1, 5], jnp.int32), dict(
            num_chains=16, block_size=4, max_new_tokens=8)
    settings.update(cut=cut, freeze_finished=freeze_finished, num_mcmc_steps=num_mcmc_steps)
    result = power_sample(jax.random.key(5), lm, prompt, 2.0, **settings)
    expected = testing.lockstep_power_sample(jax.random.key(5), lm, prompt, 2.0, **settings)
    for name in ("tokens", "lengths", "done", "active", "tokens_decoded"):
        np.testing.assert_array_equal(getattr(result, name), getattr(expected, name), err_msg=name)
    np.testing.assert_allclose(result.log_p, expected.log_p, rtol=1e-6, atol=1e-6)
    moved = np.broadcast_to(np.asarray(result.active)[:, None], result.info.accepted.shape)
    for name, value, reference in zip(PowerMHInfo._fields, result.info, expected.info):
        value, reference = np.asarray(value)[moved], np.asarray(reference)[moved]
        if value.dtype.kind == "f":
            np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(value, reference, err_msg=name)
    assert not np.any(np.asarray(result.info.accepted)[~moved])
    assert not np.any(np.asarray(result.info.tokens_decoded)[~moved])
    # The draws differ between chains: the equality is not that of a constant.
    assert len({tuple(row) for row in np.asarray(result.tokens)}) > 3
    if num_mcmc_steps:
        assert 0 < np.mean(np.asarray(result.info.accepted)[moved]) < 1


@pytest.mark.parametrize("model", ["tabular", "transformer"])
def test_a_batch_of_prompts_gives_each_prompt_the_chains_of_its_own_run(model):
    # One batch of P·C rows, each prompt prefilled once; prompt p's rows draw with key p and
    # its own α (prompt 0 twice: an α sweep), and on the transformer its own top-p.
    if model == "tabular":
        lm, prompts, settings = BLOCK_LM, [[0], [1], [0]], dict(num_chains=64, block_size=2, max_new_tokens=4)
        per_prompt = dict(alpha=[2.0, 2.0, 4.0])
    else:
        lm, prompts, settings = _tiny_transformer(), [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]], dict(
            num_chains=4, block_size=4, max_new_tokens=8)
        per_prompt = dict(alpha=[2.0, 1.0, 4.0], top_p=[1.0, 0.9, 1.0])
    settings.update(num_mcmc_steps=2)
    keys = jax.random.split(jax.random.key(11), len(prompts))
    batch = power_sample(keys, lm, prompts, **{name: jnp.asarray(v) for name, v in per_prompt.items()}, **settings)
    chains = settings["num_chains"]
    assert batch.tokens.shape == (len(prompts) * chains, settings["max_new_tokens"])
    assert batch.info.accepted.shape[-1] == len(prompts) * chains
    for p, prompt in enumerate(prompts):
        own = {name: values[p] for name, values in per_prompt.items()}
        alone = power_sample(keys[p], lm, jnp.asarray(prompt, jnp.int32), **own, **settings)
        rows = slice(p * chains, (p + 1) * chains)
        for name in ("tokens", "lengths", "done", "tokens_decoded"):
            np.testing.assert_array_equal(getattr(batch, name)[rows], getattr(alone, name), err_msg=f"{name} of prompt {p}")
        np.testing.assert_allclose(batch.log_p[rows], alone.log_p, atol=1e-5, err_msg=f"log_p of prompt {p}")
        np.testing.assert_array_equal(batch.info.accepted[..., rows], alone.info.accepted, err_msg=f"accepted of {p}")
    if model == "transformer":  # the prompts' chains differ: rows did not all read one prompt
        assert len({tuple(row) for row in np.asarray(batch.tokens)}) > chains


def test_kernel_steps_on_a_batch_of_prompts_are_each_prompts_own_steps():
    # Each prompt with its own α and proposal τ.
    lm, prompts, alphas, temperatures = _tiny_transformer(), [[3, 1, 4, 1, 5], [2, 7]], [2.0, 1.0], [0.5, 1.0]
    tokens, lengths = js.decoding.pad_prompts(lm, prompts, 6)
    proposal = js.Proposal(temperature=jnp.asarray(temperatures)).validated()
    init_keys, step_keys = jax.random.split(jax.random.key(2), (2, len(prompts)))
    step = jax.jit(build_kernel(lm, uniform, proposal))
    state = init(init_keys, lm, tokens, 3, 6, proposal, prompt_length=lengths)
    batch, infos = state, []
    for index in range(2):
        batch, info = step(jax.vmap(jax.random.fold_in, (0, None))(step_keys, index), batch, jnp.asarray(alphas), 6)
        infos.append(info)
    for p, prompt in enumerate(prompts):
        padded, length = js.decoding.pad_prompt(lm, jnp.asarray(prompt, jnp.int32), 6)
        own_proposal = js.Proposal(temperature=temperatures[p]).validated()
        own_step = jax.jit(build_kernel(lm, uniform, own_proposal))
        alone = init(init_keys[p], lm, padded, 3, 6, own_proposal, prompt_length=length)
        rows = slice(3 * p, 3 * p + 3)
        np.testing.assert_array_equal(state.decode.tokens[rows], alone.decode.tokens, err_msg=f"init of prompt {p}")
        for index in range(2):
            alone, info = own_step(jax.random.fold_in(step_keys[p], index), alone, alphas[p], 6)
            for name in ("cut", "accepted", "tokens_decoded"):
                np.testing.assert_array_equal(getattr(infos[index], name)[rows], getattr(info, name), err_msg=name)
        np.testing.assert_array_equal(batch.decode.tokens[rows], alone.decode.tokens, err_msg=f"prompt {p}")
    assert np.asarray(jnp.stack([i.accepted for i in infos])).any()


def test_the_decode_loop_carries_the_prompt_cache_once(monkeypatch):
    # The chains' and the proposals' states share the prompt cache. Carried in both, XLA:CPU
    # held each copy in a buffer of its own: on SmolLM2's shape with 8 prompts of 1,024
    # tokens and 64 chains, a peak of 4,239 MB against 3,861 MB carried once.
    from jaxsample.mcmc import blocks

    calls = []
    monkeypatch.setattr(blocks, "_power_sample", lambda *args: calls.append(args) or _power_sample(*args))
    lm, prompts = _tiny_transformer(), [[3, 1, 4, 1, 5], [2, 7]]
    power_sample(jax.random.split(jax.random.key(0), 2), lm, prompts, 2.0, num_chains=3, block_size=4,
                 num_mcmc_steps=1, max_new_tokens=8)
    c = lm.config
    cache = re.compile(rf"tensor<(\d+)x{c.num_hidden_layers}x{c.num_key_value_heads}x\d+x{c.head_dim}xf32>")
    carried = [[int(rows) for rows in cache.findall(line)] for line in _power_sample.lower(*calls[0]).as_text().splitlines()
               if "stablehlo.while" in line]
    loop = max(carried, key=len)  # the decode loop (the layer loop carries one row cache)
    # k and v of 2 prompts once, and of 2 x 3 rows for the chains and for the proposals.
    assert sorted(loop) == [2, 2, 6, 6, 6, 6]


def _case_result_types(operation) -> list[list[str]]:
    """The result types of every `stablehlo.case` (a `lax.cond` / `lax.switch`) nested in
    `operation`."""
    found = []
    for region in operation.regions:
        for block in region.blocks:
            for inner in block.operations:
                if inner.operation.name == "stablehlo.case":
                    found.append([str(result.type) for result in inner.results])
                found += _case_result_types(inner.operation)
    return found


def test_the_caches_stay_out_of_the_conditional_that_judges_moves(monkeypatch):
    # XLA:GPU gives each array that passes through a conditional a second buffer and copies
    # it in: with the caches inside, every decode step in which no move ended copied the
    # chains' and the proposals' caches whole (compiled for an H200: 2.30x the goal base).
    from jaxsample.mcmc import blocks

    calls = []
    monkeypatch.setattr(blocks, "_power_sample", lambda *args: calls.append(args) or _power_sample(*args))
    lm = _tiny_transformer()
    power_sample(jax.random.key(0), lm, [3, 1, 4], 2.0, num_chains=3, block_size=4, num_mcmc_steps=1,
                 max_new_tokens=8)
    c = lm.config
    row_cache = re.compile(rf"tensor<3x{c.num_hidden_layers}x{c.num_key_value_heads}x\d+x{c.head_dim}xf32>")
    conditionals = _case_result_types(_power_sample.lower(*calls[0]).compiler_ir("stablehlo").operation)
    assert any("tensor<3xi1>" in types for types in conditionals)  # the judging conditional is there
    assert not [t for types in conditionals for t in types if row_cache.fullmatch(t)]


def test_a_batch_of_prompts_needs_a_key_per_prompt_and_prompts():
    settings = dict(num_chains=2, block_size=2, max_new_tokens=4)
    with pytest.raises(ArgumentError, match=r"key must be 2 PRNG keys, e.g. jax.random.split\(key, 2\)"):
        power_sample(jax.random.key(0), BLOCK_LM, [[0], [1]], **settings)
    with pytest.raises(ArgumentError, match="batch of prompts is empty"):
        power_sample(jax.random.key(0), BLOCK_LM, np.zeros((0, 3), np.int32), **settings)
    with pytest.raises(ArgumentError, match=r"prompt_tokens\[1\] holds 7"):
        power_sample(jax.random.split(jax.random.key(0), 2), BLOCK_LM, [[0], [7]], **settings)


def test_decoder_values_are_the_exact_model_values():
    proposal = js.Proposal(temperature=0.5, top_k=3).validated()
    state = init(jax.random.key(3), LM, PROMPT, CHAINS, 4, proposal).decode
    states = [tuple(np.asarray(state.tokens[row, : state.length[row]]).tolist())
              for row in range(CHAINS)]
    exact = SPACE.traces(states, proposal)
    for name in ("tokens", "length", "log_p", "log_q", "entropy"):
        np.testing.assert_allclose(getattr(state, name), getattr(exact, name), atol=2e-5)


@partial(jax.jit, static_argnames="cut_law")
def _step(key, state, alpha, cap, active, proposal, cut_law=entropy_jump()):
    return build_kernel(LM, cut_law, proposal)(key, state, alpha, cap, active)


PROPOSAL = js.Proposal(temperature=0.7).validated()
CHAINS = 64
ALL = jnp.ones((CHAINS,), bool)


@pytest.fixture(scope="module")
def chains():
    return init(jax.random.key(4), LM, PROMPT, CHAINS, 4, PROPOSAL)


def test_step_bookkeeping(chains):
    active = jnp.arange(CHAINS) % 4 != 0
    new, info = _step(jax.random.key(5), chains, 3.0, 4, active, PROPOSAL)
    old, new = chains.decode, new.decode
    np.testing.assert_allclose(info.log_ratio, info.log_power + info.log_proposal + info.log_cut,
                               rtol=1e-5, atol=1e-5)
    moved = np.asarray(info.accepted)
    assert 0 < moved.sum() < active.sum()
    assert not np.any(moved & ~np.asarray(active))
    assert np.all(np.asarray(info.tokens_decoded)[~np.asarray(active)] == 0)
    # An accepted chain holds the proposal: prefix up to the cut, then the decoded tokens.
    np.testing.assert_array_equal(np.asarray(new.length - info.cut)[moved],
                                  np.asarray(info.tokens_decoded)[moved])
    for row in np.nonzero(moved)[0]:
        cut = int(info.cut[row])
        np.testing.assert_array_equal(new.tokens[row, :cut], old.tokens[row, :cut])
    for field in ("tokens", "log_p", "log_q", "entropy", "length", "done"):
        np.testing.assert_array_equal(np.asarray(getattr(new, field))[~moved],
                                      np.asarray(getattr(old, field))[~moved])


def test_step_is_the_same_with_and_without_jit(chains):
    # Unjitted, the kernel runs op by op (its decode loops are still XLA while-loops).
    jitted = _step(jax.random.key(6), chains, 2.5, 4, ALL, PROPOSAL)
    eager = build_kernel(LM, entropy_jump(), PROPOSAL)(jax.random.key(6), chains, 2.5, 4, ALL)
    assert np.any(np.asarray(jitted[1].accepted))
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_entropy_jump_beta_does_not_recompile():
    # β is a pytree leaf like α (a traced β: tests/mcmc/test_acceptance.py).
    small = dict(num_chains=2, block_size=2, num_mcmc_steps=1, max_new_tokens=4)
    power_sample(jax.random.key(0), BLOCK_LM, PROMPT, cut=entropy_jump(2.0), **small)
    compiled = _power_sample._cache_size()
    for cut in (entropy_jump(3.0), EntropyJump(4.5), "entropy"):
        power_sample(jax.random.key(0), BLOCK_LM, PROMPT, cut=cut, **small)
    assert _power_sample._cache_size() == compiled


def test_default_proposal_temperature_is_one_over_alpha():
    # MH is exact for any proposal, so no law test sees τ; same key, α = 4: the default equals
    # an explicit τ = 1/4 = 0.25 (exact in float32) and differs from τ = 1. α and τ are traced:
    # the three calls share the compilation of the test above.
    small = dict(num_chains=2, block_size=2, num_mcmc_steps=1, max_new_tokens=4)
    default, explicit, flat = (power_sample(jax.random.key(3), BLOCK_LM, PROMPT, 4.0, cut=entropy_jump(2.0),
                                            temperature=tau, **small) for tau in (None, 0.25, 1.0))
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(default.info.log_proposal), np.asarray(flat.info.log_proposal))


def test_a_chain_does_not_depend_on_the_other_chains(chains):
    # Same key; chains 1.. replaced by the chains of another run (other lengths, other
    # padding): chain 0's move, its diagnostics and its new state are unchanged.
    other = init(jax.random.key(7), LM, PROMPT, CHAINS, 4, PROPOSAL)
    mixed = PowerMHState(jax.tree.map(lambda a, b: b.at[0].set(a[0]), chains.decode, other.decode))
    assert np.any(np.asarray(mixed.decode.length != chains.decode.length))
    outputs = [_step(jax.random.key(8), s, 2.0, 4, ALL, PROPOSAL) for s in (chains, mixed)]
    for a, b in zip(*[jax.tree.leaves(out) for out in outputs]):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])


def test_same_key_same_result_and_alpha_tau_do_not_recompile(block_results):
    first = block_results["default"]
    compiled = _power_sample._cache_size()
    again = power_sample(jax.random.key(1), BLOCK_LM, PROMPT, BLOCK_ALPHA, cut="uniform", **BLOCKS)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = power_sample(jax.random.key(10), BLOCK_LM, PROMPT, 3.0, cut="uniform", temperature=0.9,
                         top_p=0.8, **BLOCKS)
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))
    assert _power_sample._cache_size() == compiled


def test_result_token_accounting_and_frozen_chains(block_results):
    result = block_results["early_stop"]
    extension = result.tokens_decoded - result.accepted_tokens - result.rejected_tokens
    assert np.all(np.asarray(extension) >= 1) and np.all(np.asarray(extension) <= 4)
    # A chain that held a stop token after block 0 is frozen in block 1.
    frozen = ~np.asarray(result.active[1])
    assert 0 < frozen.sum() < BLOCKS["num_chains"]
    assert not np.any(np.asarray(result.info.accepted[1])[:, frozen])
    assert not np.any(np.asarray(result.info.tokens_decoded[1])[:, frozen])
    assert np.all(np.asarray(result.lengths)[frozen] <= 2)
    assert np.all(np.asarray(block_results["default"].active))
    after = np.arange(4)[None, :] >= np.asarray(result.lengths)[:, None]
    assert np.all(np.asarray(result.tokens)[after] == BLOCK_LM.pad_token_id)
    assert np.all(np.asarray(result.log_p)[after] == 0)
    rate = np.asarray(result.acceptance_rate)
    assert rate.shape == (2,) and np.all((rate > 0) & (rate < 1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(alpha=0.0), r"alpha must be a number in \(0, inf\), got 0.0"),
        (dict(alpha=-2.0), r"alpha must be a number in \(0, inf\)"),
        (dict(alpha=float("inf")), r"alpha must be a number in \(0, inf\), got inf"),
        (dict(max_new_tokens=np.int64(4), block_size=np.int64(3)), "must divide max_new_tokens=4"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=3), "must divide max_new_tokens"),
        (dict(num_mcmc_steps=-1), "num_mcmc_steps"),
        (dict(num_chains=0), "num_chains"),
        (dict(max_new_tokens=8, block_size=4), "exceeds"),
        (dict(cut="surprisal"), "cut must be"),
        (dict(cut=EntropyJump(-1.0)), r"beta must be a number in \(0, inf\), got -1.0"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_arguments_raise(overrides, message):
    kwargs = dict(alpha=2.0, **BLOCKS) | overrides
    with pytest.raises(ArgumentError, match=message):
        power_sample(jax.random.key(0), BLOCK_LM, PROMPT, **kwargs)
