"""Cost of SMC decoding per decoded token, relative to plain batched sampling of as many sequences.

Both decode N sequences of exactly `--new-tokens` tokens (stop tokens suppressed) from the
same model in one jitted loop. SMC is Power-SMC (α = 4, τ = 1/α) with blocks of
`--block-size` tokens, once resampling only when ESS < N/2 and once at every block (the
worst case: a gather of every particle's KV cache per block). The three are timed
interleaved (`timing.interleaved_timings`: warm-up excluded, median over `--samples` samples
of at least `--min-sample-s` seconds each, with the spread).

`--prompts P` also times P problems' SMC runs (ESS < N/2) as one batch (`smc_decode` on a
batch of prompts) against the same runs one prompt after another, and fails unless both
give the same tokens.

    python experiments/bench_smc.py --model smollm2-135m-instruct --particles 8 --new-tokens 32
    python experiments/bench_smc.py --model smollm2-135m-instruct --particles 8 --prompts 4
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxsample as js
from jaxsample import tasks
from jaxsample.models.registry import resolve
from timing import add_timing_options, interleaved_timings, machine, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-decisions", help="registered name, checkpoint directory or .gguf file")
    parser.add_argument("--particles", type=int, default=16, help="SMC particles = sequences sampled by the baseline")
    parser.add_argument("--new-tokens", type=int, default=40, help="tokens decoded per sequence")
    parser.add_argument("--block-size", type=int, default=10, help="SMC tokens between reweightings")
    parser.add_argument("--prompts", type=int, default=1, help="also time this many problems' runs as one batch against one after another")
    add_timing_options(parser, samples=5, min_sample_s=2.0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    if args.prompts < 1:
        parser.error(f"--prompts must be ≥ 1, got {args.prompts}")

    lm = js.load(args.model)
    lm = lm.replace(eos_token_ids=(lm.vocab_size,))  # an id no token matches: fixed lengths
    if args.model == "toy-decisions":
        task = tasks.read_task_config(resolve(args.model))
        prompts = [tasks.sample_problem(p, task, task.max_decisions).prompt for p in range(args.prompts)]
    else:
        topics = ["a story", "a poem about the sea", "a joke", "a recipe for soup", "a riddle", "a fable", "a haiku", "a letter"]
        prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me {topics[p % len(topics)]}."}])
                   for p in range(args.prompts)]
    prompts = [jnp.asarray(prompt, jnp.int32) for prompt in prompts]
    prompt = prompts[0]
    keys = jax.random.split(jax.random.key(0), args.prompts)

    def plain():
        return js.generate(jax.random.key(0), lm, prompt, args.new_tokens, temperature=0.25,
                           num_samples=args.particles).tokens

    settings = dict(num_particles=args.particles, max_new_tokens=args.new_tokens, alpha=4.0, block_size=args.block_size)

    def smc(threshold):
        return lambda: js.smc_decode(jax.random.key(0), lm, prompt, ess_threshold=threshold, **settings).tokens

    def smc_batch():
        return [run.tokens for run in js.smc_decode(keys, lm, prompts, **settings)]

    def smc_per_prompt():
        return [js.smc_decode(key, lm, one, **settings).tokens for key, one in zip(keys, prompts)]

    tokens = args.particles * args.new_tokens
    contenders = {"plain": plain, "smc_ess_half": smc(0.5), "smc_always": smc(1.0)}
    if args.prompts > 1:
        if not all(jnp.array_equal(a, b) for a, b in zip(smc_batch(), smc_per_prompt())):
            raise SystemExit("the batch of prompts and the prompts one by one sampled different tokens")
        contenders.update(smc_batch=smc_batch, smc_per_prompt=smc_per_prompt)
    timings = interleaved_timings(contenders, args.samples, args.min_sample_s)
    plain_s, adaptive_s, always_s = (timings[k]["median_s"] for k in ("plain", "smc_ess_half", "smc_always"))
    result = {
        **machine(),
        "model": args.model,
        "particles": args.particles,
        "new_tokens": args.new_tokens,
        "block_size": args.block_size,
        "plain_tokens_per_s": tokens / plain_s,
        "smc_ess_half_tokens_per_s": tokens / adaptive_s,
        "smc_always_resample_tokens_per_s": tokens / always_s,
        "cost_ratio_ess_half": adaptive_s / plain_s,
        "cost_ratio_always_resample": always_s / plain_s,
        "prompts": args.prompts,
        "timings": timings,
    }
    summary = (f"SMC costs {result['cost_ratio_ess_half']:.2f}x plain sampling per token "
               f"({result['cost_ratio_always_resample']:.2f}x resampling at every block; spreads "
               + " / ".join(f"{t['spread']:.0%}" for t in timings.values()) + ")")
    if args.prompts > 1:
        batch_s, per_prompt_s = timings["smc_batch"]["median_s"], timings["smc_per_prompt"]["median_s"]
        result.update(batch_tokens_per_s=args.prompts * tokens / batch_s,
                      per_prompt_tokens_per_s=args.prompts * tokens / per_prompt_s,
                      batch_gain=per_prompt_s / batch_s)
        summary += (f"; {args.prompts} prompts x {args.particles} particles in one batch: {result['batch_gain']:.2f}x "
                    f"one prompt after another ({result['batch_tokens_per_s']:.0f} vs "
                    f"{result['per_prompt_tokens_per_s']:.0f} tokens/s)")
    report(result, summary, args.json)


if __name__ == "__main__":
    main()
