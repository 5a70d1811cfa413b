"""GRPO / CoDistill trainers on tiny Flax decoders: gradients, resume, LoRA, co-training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.models import lora
from jaxsample.tasks import sorting
from jaxsample.training import (
    CoDistillConfig,
    CoDistillState,
    GRPOConfig,
    Rollout,
    codistill_step_fn,
    fit,
    grpo_step_fn,
    grpo_update,
    init,
    pad_prompts,
    policy_loss,
    rollout,
    sample_and_grade,
    score_rollout,
)
from jaxsample.training.rewards import grade_groups
from tests.training.tiny import tiny_model

GROUPS, GROUP_SIZE, NEW_TOKENS = 2, 4, 6
# Shared by the tests so that the jitted update compiles once.
OPTIMIZER = optax.adam(1e-2)
CONFIG = GRPOConfig(group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, num_epochs=2, beta=0.05, kl_kind="k3_ratio_loss")


def prompt_fn(t):
    problems = sorting.sample_sorting(t, GROUPS, length=(3, 5))
    return [p.prompt for p in problems], problems


def low_digit_reward(problems, tokens, lengths):
    """A dense reward (fraction of generated digits below 5), so every group has variance."""
    return grade_groups(lambda p, c: np.mean(c < 5), problems, tokens, lengths)


def test_whole_loss_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64(True):
        lm = tiny_model(dtype=jnp.float64)
        rows = GROUPS * GROUP_SIZE
        prompts, prompt_lengths = pad_prompts(lm, prompt_fn(0)[0] * GROUP_SIZE, NEW_TOKENS)
        lengths = jax.random.randint(jax.random.key(1), (rows,), 1, NEW_TOKENS + 1)
        tokens = jax.random.randint(jax.random.key(5), (rows, NEW_TOKENS), 0, 10)
        mask = (jnp.arange(NEW_TOKENS)[None] < lengths[:, None]).astype(jnp.float64)
        batch = Rollout(prompts, prompt_lengths, tokens, lengths, jnp.zeros(tokens.shape), mask)
        batch = batch._replace(logp_old=score_rollout(lm, batch))
        advantages = jax.random.normal(jax.random.key(2), (GROUPS * GROUP_SIZE,), jnp.float64)
        moved = jax.tree.map(lambda p, n: p + 0.05 * n, lm.params, _normal_like(lm.params, 3))

        def loss(params):
            logp = score_rollout(lm.replace(params=params), batch)
            return policy_loss(logp, batch.logp_old, batch.logp_old + 0.1, advantages, batch.mask, beta=0.3, kl_kind="k3_ratio_loss", eps_high=10.0, eps_low=0.9)[0]

        direction = _normal_like(lm.params, 4)
        gradient = jax.jit(jax.grad(loss))(moved)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(gradient), jax.tree.leaves(direction)))
        h = 1e-5
        shifted = jax.jit(lambda s: loss(jax.tree.map(lambda p, d: p + s * d, moved, direction)))
        numeric = (shifted(h) - shifted(-h)) / (2 * h)
        # Central differences: truncation O(h²) ~ 1e-10, float64 rounding ~ 1e-16 / h ~ 1e-11.
        assert gradient["embed_tokens"]["embedding"].dtype == jnp.float64 and abs(float(analytic)) > 1e-2
        np.testing.assert_allclose(float(numeric), float(analytic), rtol=1e-7)


def _normal_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _grpo_run(tmp_path, name, stops, config, lm, optimizer):
    step = grpo_step_fn(lm, config, optimizer, prompt_fn, low_digit_reward)
    state = None
    for num_steps in stops:  # each call starts from a fresh state and resumes from the checkpoint
        state = fit(step, init(lm, optimizer), jax.random.key(7), num_steps, checkpoint_dir=tmp_path / name, save_every=2, progress=False, metrics_path=tmp_path / f"{name}.jsonl")
    return state


def test_resume_is_bit_identical_and_metrics_are_logged(tmp_path):
    lm = tiny_model()
    straight = _grpo_run(tmp_path, "straight", [4], CONFIG, lm, OPTIMIZER)
    resumed = _grpo_run(tmp_path, "resumed", [2, 4], CONFIG, lm, OPTIMIZER)
    assert int(straight.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight.trainable), jax.tree.leaves(lm.params)))
    lines = (tmp_path / "resumed.jsonl").read_text().splitlines()
    assert len(lines) == 4
    import json

    record = json.loads(lines[-1])
    for field in ("reward", "accuracy", "kl", "clip_fraction", "zero_variance_fraction", "tokens_generated", "seconds_update"):
        assert field in record
    assert 0 < record["tokens_generated"] <= GROUPS * GROUP_SIZE * NEW_TOKENS


def test_lora_training_moves_only_the_adapters():
    lm = tiny_model()
    adapters = lora.init_lora(jax.random.key(5), lm.config, rank=2, alpha=4.0)
    prompts, lengths = pad_prompts(lm, prompt_fn(0)[0], NEW_TOKENS)
    batch = rollout(jax.random.key(0), lm, prompts, lengths, GROUP_SIZE, NEW_TOKENS)  # B = 0: the base model
    rewards = low_digit_reward(prompt_fn(0)[1], np.asarray(batch.tokens), np.asarray(batch.lengths))
    config = CONFIG.replace(lora=True)
    state, info = grpo_update(lm, init(lm, OPTIMIZER, adapters, lora=True), config, batch, rewards, OPTIMIZER)
    assert np.isfinite(float(info.loss)) and float(info.grad_norm) > 0
    assert float(jnp.abs(state.trainable.weights["q_proj"]["lora_B"]).max()) > 0
    moved = lm.with_adapters(state.trainable).logits(batch.prompts[:1])
    assert float(jnp.abs(moved - lm.logits(batch.prompts[:1])).max()) > 0


def test_rollout_mask_covers_the_completion_and_its_stop_token():
    # The loss sees exactly the generated tokens, the stop token included (or the policy never
    # learns when to stop, and a one-token completion drops out of the loss). Same shapes as
    # the test above, so the rollout is compiled once.
    lm = tiny_model()
    prompts, lengths = pad_prompts(lm, prompt_fn(0)[0], NEW_TOKENS)
    batch = rollout(jax.random.key(0), lm, prompts, lengths, GROUP_SIZE, NEW_TOKENS)
    tokens, lengths, mask = (np.asarray(x) for x in (batch.tokens, batch.lengths, batch.mask))
    np.testing.assert_array_equal(mask, np.arange(NEW_TOKENS)[None] < lengths[:, None])
    finished = lengths < NEW_TOKENS
    assert finished.any(), "no row stopped early, so the stop token's slot was not checked"
    np.testing.assert_array_equal(tokens[finished, lengths[finished] - 1], sorting.EOS)


@pytest.mark.parametrize("lengths, message", [
    ([0, 2], r"prompt_lengths holds 0 at index \(0,\), outside the prompt width \[1, 4\)"),  # decoded from position −1
    ([2, 4], r"prompt_lengths holds 4 at index \(1,\), outside the prompt width \[1, 4\)"),
    (np.array([1.5, 2.0]), "prompt_lengths must hold integers, got dtype float64"),
    ([2], r"prompts must have shape \[B, T\] and prompt_lengths \[B\], got \(2, 3\) and \(1,\)"),
])
def test_rollout_refuses_prompt_lengths_outside_the_prompts(lengths, message):
    prompts = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ArgumentError, match=message):
        rollout(jax.random.key(0), tiny_model(), prompts, lengths, GROUP_SIZE, NEW_TOKENS)


def test_codistill_state_documents_its_attributes():
    # It had only the generated "CoDistillState(small, large)".
    assert "Attributes:" in CoDistillState.__doc__
    assert "small: `TrainState`" in CoDistillState.__doc__ and "large: `TrainState`" in CoDistillState.__doc__


def test_codistill_with_identical_models_and_no_kd_reproduces_grpo():
    lm = tiny_model()
    key = jax.random.key(3)
    grpo_state, _ = grpo_step_fn(lm, CONFIG, OPTIMIZER, prompt_fn, low_digit_reward)(key, init(lm, OPTIMIZER), 0)
    step = codistill_step_fn(lm, lm, CoDistillConfig(grpo=CONFIG, lam=0.0, cap=2.0), OPTIMIZER, OPTIMIZER, prompt_fn, low_digit_reward)
    state, metrics = step(key, CoDistillState(init(lm, OPTIMIZER), init(lm, OPTIMIZER)), 0)
    assert metrics["tokens_generated_large"] == 0 and metrics["tokens_generated_small"] > 0
    # Scoring reproduces the sampled log p up to float32 rounding, so every weight is 1.
    np.testing.assert_allclose([metrics["iw_ess_fraction"], metrics["iw_mean_weight"]], 1.0, rtol=1e-5)
    assert metrics["iw_capped_fraction"] == 0.0
    for role in (state.small, state.large):
        for a, b in zip(jax.tree.leaves(role.trainable), jax.tree.leaves(grpo_state.trainable)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards_are_rejected_before_the_jitted_update(bad):
    def reward_fn(problems, tokens, lengths):  # e.g. a log-likelihood grader failing on one sample
        rewards = np.zeros((GROUPS, GROUP_SIZE), np.float32)
        rewards[1, 2] = bad
        return rewards

    prompts, problems = prompt_fn(0)
    with pytest.raises(ArgumentError, match=rf"rewards\[problem, sample\].*got {bad!r} \(element \(1, 2\)\)"):
        sample_and_grade(jax.random.key(0), tiny_model(), CONFIG, prompts, problems, reward_fn)
