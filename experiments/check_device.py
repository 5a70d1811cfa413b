"""The library's correctness checks on the accelerator JAX runs on, without pytest.

The test suite proves the ports and samplers on XLA:CPU; GPU and TPU compile the same
programs with other kernels (cuBLAS/cuDNN-style GEMMs, TF32 or bf16 passes, fused
reductions in another order). This script re-runs the checks that would catch a backend
difference, on `jax.devices()[0]`, and writes what it measured:

1. Port parity: random tiny Qwen2 (untied, GQA) and Llama-3 (rope scaling, head_dim ≠
   hidden / heads) checkpoints from transformers (`save_pretrained`, PyTorch f32 on the CPU
   as the reference) loaded by `jaxsample.models.load` onto the device. Checked: max |Δ log p|
   ≤ 1e-4 at `highest` matmul precision (the CPU suite's tolerance). Reported only: the
   error at the default precision (TF32 passes on recent NVIDIA GPUs) and in bfloat16.
2. Decode loop and KV cache: greedy `js.generate` (f32, highest precision) emits exactly
   transformers' greedy tokens, and the log p it recorded while sampling at temperature 1
   equals `js.score`'s teacher-forced log p of the same tokens within 1e-4.
3. Power MH: `js.power_sample` on a tabular toy (3 tokens + stop, 121 completions) against
   p^α by exact enumeration: TV(histogram, p^α) under `testing.assert_tv_below`'s bound for
   the number of chains plus the exact mixing bias.
4. Reward SMC: the public kernel, vmapped over independent runs, gives Ẑ / Z with mean 1
   (`testing.assert_unbiased`, a t-test at false-alarm probability 1e-4).

Exits 1 if any check fails. Without torch and transformers (a TPU VM, say) the checks
that need them are skipped and listed as skipped. `--chains` and `--runs` size the
statistical checks (their bounds follow the sample size).

    PYTHONPATH=. python experiments/check_device.py --json experiments/results/gpu/check_device.json
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample import models, testing
from jaxsample.errors import VerificationError
from jaxsample.mcmc import uniform
from jaxsample.smc import build_kernel, init, make_target, systematic
from timing import machine, report

PARITY_ATOL = 1e-4
SMC_FAILURE_PROB = 1e-4
VOCAB = 97
GREEDY_TOKENS = 24


def _checkpoints(directory: str) -> dict[str, str]:
    """Random tiny transformers checkpoints saved under `directory`, by name."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    # rope_theta / rope_scaling: the spelling both transformers 4.x and 5.x accept.
    configs = {
        "qwen2_untied_gqa": Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, eos_token_id=3, rope_theta=10000.0),
        "llama3_head_dim": LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=320,
            tie_word_embeddings=False, eos_token_id=3, rope_theta=100.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    }
    paths = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        testing.rerandomize_torch_model(model, seed)
        paths[name] = f"{directory}/{name}"
        model.save_pretrained(paths[name])
    return paths


def check_parity(path: str) -> dict:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 64))
    expected = jax.nn.log_softmax(testing.transformers_logits(testing.transformers_model(path), tokens))

    def error(lm, precision):
        with jax.default_matmul_precision(precision):
            log_p = jax.nn.log_softmax(lm.logits(jnp.asarray(tokens)).astype(jnp.float32))
        return float(np.abs(np.asarray(log_p) - expected).max())

    float32 = models.load(path)
    measured = {"log_p_std": float(expected.std()),
                "max_abs_log_p_error_highest": error(float32, "highest"),
                "max_abs_log_p_error_default": error(float32, "default"),
                "max_abs_log_p_error_bfloat16": error(models.load(path, dtype="bfloat16"), "default")}
    passed = measured["max_abs_log_p_error_highest"] <= PARITY_ATOL and measured["log_p_std"] > 1.0
    return {"passed": passed, "bound": PARITY_ATOL, **measured}


def check_decode(path: str) -> dict:
    lm, reference = models.load(path), testing.transformers_model(path)
    mismatches, score_error = [], 0.0
    with jax.default_matmul_precision("highest"):
        for seed in range(2):  # prompt lengths 7 and 12: two prompt buckets
            prompt = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=7 + 5 * seed))
            ours = js.generate(jax.random.key(seed), lm, prompt, GREEDY_TOKENS, top_k=1)
            theirs = testing.transformers_greedy(reference, prompt, GREEDY_TOKENS, lm.pad_token_id, lm.eos_token_ids)
            greedy = np.asarray(ours.tokens[0, :int(ours.lengths[0])])
            if not np.array_equal(greedy, theirs):
                mismatches.append({"seed": seed, "jaxsample": greedy.tolist(), "transformers": theirs.tolist()})
            sampled = js.generate(jax.random.key(seed), lm, prompt, GREEDY_TOKENS, num_samples=8)
            scored = js.score(lm, prompt, sampled.tokens, sampled.lengths)
            score_error = max(score_error, float(jnp.abs(scored - sampled.log_p).max()))
    return {"passed": not mismatches and score_error <= PARITY_ATOL, "bound": PARITY_ATOL,
            "greedy_mismatches": mismatches, "max_abs_generate_minus_score_log_p": score_error}


def check_power_mh(num_chains: int) -> dict:
    alpha, steps, new_tokens = 2.0, 100, 4
    lm = testing.random_tabular_lm(vocab_size=4, max_new_tokens=new_tokens, seed=2, temperature=1 / 1.5)
    space = testing.enumerate_completions(lm, [0], new_tokens)
    target = testing.power_target(space, alpha)
    kernel = testing.mh_transition_matrix(space, uniform, js.Proposal(1.0 / alpha),
                                          testing.power_log_ratio(alpha, uniform))
    mixing = testing.total_variation(kernel.law_after(steps), target)
    result = js.power_sample(jax.random.key(0), lm, jnp.array([0], jnp.int32), alpha, cut="uniform",
                             num_chains=num_chains, block_size=new_tokens, num_mcmc_steps=steps,
                             max_new_tokens=new_tokens)
    check = testing.chain_histogram_tv(result, target, bias=mixing)
    return {"passed": bool(check.tv <= check.bound), "tv": check.tv, "bound": check.bound,
            "mixing_bias": mixing, "num_chains": num_chains}


def check_smc(num_runs: int) -> dict:
    alpha, lam, new_tokens, particles = 2.0, 1.0, 4, 8
    lm = testing.random_tabular_lm(4, new_tokens, seed=0, temperature=1 / 1.5)
    prompt = jnp.array([0], jnp.int32)
    reward = testing.random_reward(4, new_tokens, seed=1)
    log_z = testing.tilted_target(testing.enumerate_completions(lm, prompt, new_tokens), reward,
                                  alpha, lam).log_z
    step = build_kernel(lm, js.Proposal(1.0 / alpha), make_target(alpha, lam, reward), block_size=1,
                        ess_threshold=0.5, resampler=systematic)

    @jax.jit
    def log_z_hat(key):
        state = init(lm, prompt, particles, new_tokens)
        _, info = jax.lax.scan(lambda s, k: step(k, s), state, jax.random.split(key, new_tokens))
        return info.log_z[-1]

    estimates = np.asarray(jax.vmap(log_z_hat)(jax.random.split(jax.random.key(0), num_runs)), np.float64)
    sizes = {"failure_prob": SMC_FAILURE_PROB, "num_runs": num_runs, "num_particles": particles}
    try:
        unbiased = testing.assert_unbiased(np.exp(estimates - log_z), 1.0, failure_prob=SMC_FAILURE_PROB)
    except VerificationError as error:
        return {"passed": False, "failure": str(error), **sizes}
    return {"passed": True, "mean_z_hat_over_z": float(unbiased.mean),
            "standard_error": float(unbiased.standard_error), "z": float(unbiased.z),
            "bound_abs_z": unbiased.threshold, **sizes}


# The checks against transformers: name -> (check, checkpoint of `_checkpoints`).
REFERENCE_CHECKS = {
    "parity_qwen2_untied_gqa": (check_parity, "qwen2_untied_gqa"),
    "parity_llama3_head_dim": (check_parity, "llama3_head_dim"),
    "decode_qwen2_untied_gqa": (check_decode, "qwen2_untied_gqa"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=16384, help="power-MH chains")
    parser.add_argument("--runs", type=int, default=2000, help="independent SMC runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    checks = {}

    def run(name, fn, *fn_args):
        began = time.perf_counter()
        try:
            checks[name] = fn(*fn_args)
        except Exception:  # a crash on this backend is a failed check, reported with the rest
            checks[name] = {"passed": False, "error": traceback.format_exc()}
        checks[name]["seconds"] = time.perf_counter() - began
        print(f"{name}: {'passed' if checks[name]['passed'] else 'FAILED'} "
              f"({checks[name]['seconds']:.1f} s)", flush=True)

    skipped = []
    if all(importlib.util.find_spec(package) for package in ("torch", "transformers")):
        with tempfile.TemporaryDirectory() as directory:
            paths = _checkpoints(directory)
            for name, (check, checkpoint) in REFERENCE_CHECKS.items():
                run(name, check, paths[checkpoint])
    else:
        skipped = list(REFERENCE_CHECKS)
        print(f"skipped (they need torch and transformers as the reference): {', '.join(skipped)}")
    run("power_mh_vs_enumeration", check_power_mh, args.chains)
    run("smc_log_z_unbiased", check_smc, args.runs)
    passed = all(c["passed"] for c in checks.values())
    summary = f"{sum(c['passed'] for c in checks.values())}/{len(checks)} checks passed"
    if skipped:
        summary += f", {len(skipped)} skipped (no torch and transformers)"
    report({"machine": machine(), "passed": passed, "checks": checks, "skipped": skipped}, summary, args.json)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
