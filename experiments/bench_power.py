"""End-to-end power-sampling MH: `js.power_sample` against the reference loop in PyTorch.

The reference (Karan & Du's `mcmc_power_samp`, re-implemented faithfully on transformers):
one chain at a time; for each block, extend the chain with one `generate` call at
temperature 1/α; then for each MH step draw a cut uniformly in the generated part, propose a
new suffix with one `generate` call from the prefix up to the cut, score log q (tempered
softmax of the scores) and α log p (untempered logits) of the suffix, and accept with
probability min(1, r). `js.power_sample` runs the same algorithm for all chains as one
jitted program. Same weights, prompt, α, block size, step count and chain count; stop
tokens suppressed in both so every proposal decodes up to the block cap. `--reference-chains`
times the reference on fewer chains than JAX runs (for a GPU session's time limit): the
reference runs its chains one after another, so its tokens/s does not depend on how many.

Tokens/s counts every token decoded: block extensions and all proposals, accepted or
rejected. The contenders are timed interleaved (`timing.interleaved_timings`). `js.load`
gives per-layer params; `--stacked` also times the stacked layout (`models.stack_layers`).
`--lockstep` also times the same chains moved in lockstep (`testing.lockstep_power_sample`:
`build_kernel` steps, each as long as the batch's longest proposal), the loop `power_sample`
ran before its chains moved on their own. `--prompts P` runs P problems with `--chains` chains
each as one batch (`power_sample` on a batch of prompts) and also times them one prompt after
another, the same chains (`batch_gain` is the ratio); the reference runs the first prompt's.

    python experiments/bench_power.py --chains 8 --block-size 16 --max-new-tokens 32 --mcmc-steps 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample import models, testing
from jaxsample.models.registry import resolve
from timing import add_timing_options, interleaved_timings, machine, report


def reference_power_mh(model, prompt_ids, alpha: float, block_size: int, max_new_tokens: int,
                       mcmc_steps: int, generator):
    """One chain of Karan & Du's block-wise power MH with `generate`; returns tokens decoded."""
    import torch

    def propose(prefix, length):
        out = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0 / alpha, max_new_tokens=length,
                             min_new_tokens=length, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        suffix = out.sequences[0, prefix.shape[1]:]
        logits = torch.stack(out.logits, dim=1)[0].float()  # [length, V], untempered
        log_p = torch.log_softmax(logits, -1).gather(1, suffix[:, None])[:, 0]
        log_q = torch.log_softmax(logits * alpha, -1).gather(1, suffix[:, None])[:, 0]
        return suffix, alpha * log_p, log_q

    context = prompt_ids.shape[1]
    empty = torch.zeros(0, device=prompt_ids.device)
    sequence, target, proposal = prompt_ids, empty, empty
    decoded = 0
    for _ in range(max_new_tokens // block_size):
        suffix, t, q = propose(sequence, block_size)
        sequence = torch.cat([sequence, suffix[None]], dim=1)
        target, proposal = torch.cat([target, t]), torch.cat([proposal, q])
        decoded += block_size
        for _ in range(mcmc_steps):
            generated = sequence.shape[1] - context
            cut = int(torch.randint(0, generated, (1,), generator=generator))
            new_suffix, new_t, new_q = propose(sequence[:, : context + cut], generated - cut)
            decoded += generated - cut
            log_r = new_t.sum() + proposal[cut:].sum() - target[cut:].sum() - new_q.sum()
            if torch.rand((), generator=generator).log().item() < log_r.item():
                sequence = torch.cat([sequence[:, : context + cut], new_suffix[None]], dim=1)
                target = torch.cat([target[:cut], new_t])
                proposal = torch.cat([proposal[:cut], new_q])
    return decoded


def random_checkpoint(shape: str, directory: Path) -> Path:
    """A transformers checkpoint of a `bench_decode` shape with random weights, in `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench_decode import SHAPES

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    values.pop("qkv_bias", None)
    config = AutoConfig.for_model(model_type, max_position_embeddings=4096, eos_token_id=0, **values)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered name, HF checkpoint directory, .gguf file, or random:SHAPE (random weights of a bench_decode shape, e.g. random:qwen2.5-0.5b, saved once and loaded by both); transformers loads the same weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations of both")
    parser.add_argument("--chains", type=int, default=8, help="MH chains (JAX: one batch; reference: one after another)")
    parser.add_argument("--reference-chains", type=int, help="chains the reference loop is timed on (default: --chains)")
    parser.add_argument("--stacked", action="store_true", help="also time js.power_sample on the model's layers stacked (models.stack_layers: one layer scan; a second copy of the layer weights)")
    parser.add_argument("--prompts", type=int, default=1, help="problems run as one batch of prompts x chains, also timed one prompt after another")
    parser.add_argument("--lockstep", action="store_true", help="also time the chains moved in lockstep (testing.lockstep_power_sample: the same chains, each MH step as long as the longest proposal)")
    parser.add_argument("--alpha", type=float, default=4.0, help="power α (proposal temperature 1/α)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation length (a multiple of the block size)")
    parser.add_argument("--mcmc-steps", type=int, default=2, help="MH steps per block")
    add_timing_options(parser, samples=3, min_sample_s=1.0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    reference_chains = args.chains if args.reference_chains is None else args.reference_chains
    if not 1 <= reference_chains <= args.chains:
        parser.error(f"--reference-chains must be between 1 and --chains ({args.chains}), got {reference_chains}")
    if args.prompts < 1 or (args.prompts > 1 and (args.lockstep or args.stacked)):
        parser.error(f"--prompts must be ≥ 1, and 1 with --lockstep or --stacked, got {args.prompts}")

    import torch
    from transformers import AutoModelForCausalLM

    if args.model.startswith("random:"):
        path = random_checkpoint(args.model.split(":", 1)[1], Path(tempfile.mkdtemp()))
    else:
        path = Path(args.model) if Path(args.model).exists() else resolve(args.model)
    lm = js.load(path, dtype=args.dtype)
    lm = lm.replace(eos_token_ids=(lm.vocab_size,))  # no token stops: fixed lengths
    factors = [(17, 23), (41, 7), (123, 45), (9, 99), (64, 3), (250, 12), (8, 8), (31, 1000)]
    if args.prompts > len(factors):
        parser.error(f"--prompts is at most {len(factors)}, got {args.prompts}")
    if lm.tokenizer is None:
        prompts = [(np.arange(1, 33) + p) % lm.vocab_size for p in range(args.prompts)]
    else:
        prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} * {b}? Think step by step."}])
                   for a, b in factors[: args.prompts]]
    prompts = [jnp.asarray(prompt, jnp.int32) for prompt in prompts]
    prompt = prompts[0]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    prompt_ids = torch.tensor(np.asarray(prompt), device=device)[None]
    generator = torch.Generator()
    decoded = {}

    settings = dict(alpha=args.alpha, num_chains=args.chains, block_size=args.block_size,
                    num_mcmc_steps=args.mcmc_steps, max_new_tokens=args.max_new_tokens)
    keys = jax.random.split(jax.random.key(0), args.prompts)

    def jax_runner(model, name, sampler=js.power_sample):
        def run():
            if args.prompts == 1:
                result = sampler(jax.random.key(0), model, prompt, **settings)
            else:
                result = sampler(keys, model, prompts, **settings)
            decoded[name] = result.tokens_decoded
            return result.tokens
        return run

    def run_per_prompt():
        results = [js.power_sample(key, lm, one, **settings) for key, one in zip(keys, prompts)]
        decoded["jax_per_prompt"] = [result.tokens_decoded for result in results]
        return [result.tokens for result in results]

    def run_torch():
        # Reseeded per call, so that every call makes the same cuts and decodes as many tokens.
        generator.manual_seed(0)
        torch.manual_seed(0)
        with torch.no_grad():
            decoded["transformers"] = sum(
                reference_power_mh(model, prompt_ids, args.alpha, args.block_size, args.max_new_tokens,
                                   args.mcmc_steps, generator)
                for _ in range(reference_chains))

    contenders = {"jax": jax_runner(lm, "jax"), "transformers": run_torch}
    if args.stacked:
        contenders["jax_stacked"] = jax_runner(lm.replace(params=models.stack_layers(lm.params)), "jax_stacked")
    if args.lockstep:
        contenders["jax_lockstep"] = jax_runner(lm, "jax_lockstep", testing.lockstep_power_sample)
    if args.prompts > 1:
        contenders["jax_per_prompt"] = run_per_prompt
    timings = interleaved_timings(contenders, args.samples, args.min_sample_s)
    jax_tokens = int(np.sum(np.asarray(decoded["jax"])))
    jax_rate = jax_tokens / timings["jax"]["median_s"]
    torch_rate = decoded["transformers"] / timings["transformers"]["median_s"]
    result = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "model": args.model, "dtype": args.dtype, "prompts": args.prompts, "chains": args.chains,
        "reference_chains": reference_chains,
        "alpha": args.alpha,
        "block_size": args.block_size, "max_new_tokens": args.max_new_tokens, "mcmc_steps": args.mcmc_steps,
        "jax_tokens_per_call": jax_tokens, "transformers_tokens_per_call": decoded["transformers"],
        "jax_tokens_per_s": jax_rate, "transformers_tokens_per_s": torch_rate,
        "speedup": jax_rate / torch_rate,
        "timings": timings,
    }
    if args.stacked:
        stacked_rate = int(np.sum(np.asarray(decoded["jax_stacked"]))) / timings["jax_stacked"]["median_s"]
        result.update(stacked_tokens_per_s=stacked_rate, stacked_speedup=stacked_rate / torch_rate)
    def same_chains_rate(name, what):
        """tokens/s of contender `name`, which must decode the very tokens power_sample did."""
        tokens = int(np.sum(np.asarray(decoded[name])))
        if tokens != jax_tokens:
            raise RuntimeError(f"{what} decoded {tokens} tokens and power_sample {jax_tokens}: they should run the same chains")
        return jax_tokens / timings[name]["median_s"]

    if args.lockstep:
        lockstep_rate = same_chains_rate("jax_lockstep", "the lockstep loop")
        result.update(lockstep_tokens_per_s=lockstep_rate, lockstep_speedup=lockstep_rate / torch_rate)
    if args.prompts > 1:
        per_prompt_rate = same_chains_rate("jax_per_prompt", "one prompt at a time")
        result.update(per_prompt_tokens_per_s=per_prompt_rate, batch_gain=jax_rate / per_prompt_rate)
    summary = (f"js.power_sample decodes {result['speedup']:.1f}x the tokens/s of the transformers reference loop "
               f"({jax_rate:.0f} vs {torch_rate:.0f} tokens/s; spreads {timings['jax']['spread']:.0%} / "
               f"{timings['transformers']['spread']:.0%}"
               + (f"; reference timed on {reference_chains} of the {args.chains} chains" if reference_chains < args.chains else "")
               + ")"
               + (f"; on stacked layers {result['stacked_speedup']:.1f}x ({result['stacked_tokens_per_s']:.0f} tokens/s, "
                  f"spread {timings['jax_stacked']['spread']:.0%})" if args.stacked else "")
               + (f"; chains in lockstep {result['lockstep_speedup']:.1f}x ({result['lockstep_tokens_per_s']:.0f} tokens/s, "
                  f"spread {timings['jax_lockstep']['spread']:.0%})" if args.lockstep else "")
               + (f"; {args.prompts} prompts x {args.chains} chains in one batch: {result['batch_gain']:.2f}x one prompt "
                  f"after another ({result['per_prompt_tokens_per_s']:.0f} tokens/s, spread "
                  f"{timings['jax_per_prompt']['spread']:.0%})" if args.prompts > 1 else ""))
    report(result, summary, args.json)


if __name__ == "__main__":
    main()
