"""Tokens per second of `js.generate` against transformers' `generate`, same weights, one run.

Both sample at temperature 1 with no truncation from the same weights (SmolLM2-135M-Instruct
GGUF, dequantized to float32), the same chat prompt, batch and length; EOS is suppressed in
both so every row decodes exactly `--new-tokens` tokens. The two are timed interleaved
(`timing.interleaved_timings`: warm-up excluded, median over `--samples` samples of at least
`--min-sample-s` seconds each, with the spread).

    python experiments/bench_generate.py --batch 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample.models.registry import resolve
from timing import interleaved_timings, machine, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered name, HF checkpoint directory or .gguf file (transformers loads the same weights)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    parser.add_argument("--samples", type=int, default=5, help="timed samples per contender (interleaved); the median is reported")
    parser.add_argument("--min-sample-s", type=float, default=2.0, help="minimum seconds per sample (calls are repeated to fill it)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    lm = js.load(args.model)
    # EOS suppressed: an "eos" id outside the vocabulary never matches a sampled token.
    lm_no_stop = lm.replace(eos_token_ids=(lm.vocab_size,))
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story about a dragon."}])
    prompt = jnp.asarray(prompt, jnp.int32)

    def run_jax():
        out = js.generate(jax.random.key(0), lm_no_stop, prompt, args.new_tokens, num_samples=args.batch)
        out.tokens.block_until_ready()

    path = Path(args.model) if Path(args.model).exists() else resolve(args.model)
    if path.is_dir():
        torch_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        torch_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    torch_model.eval()
    input_ids = torch.tensor(np.asarray(prompt))[None].repeat(args.batch, 1)

    def run_torch():
        with torch.no_grad():
            torch_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, pad_token_id=lm.pad_token_id,
            )

    tokens = args.batch * args.new_tokens
    timings = interleaved_timings({"jax": run_jax, "transformers": run_torch}, args.samples, args.min_sample_s)
    jax_seconds, torch_seconds = timings["jax"]["median_s"], timings["transformers"]["median_s"]
    result = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(prompt.shape[0]),
        "jax_tokens_per_s": tokens / jax_seconds,
        "transformers_tokens_per_s": tokens / torch_seconds,
        "speedup": torch_seconds / jax_seconds,
        "timings": timings,
    }
    summary = (f"js.generate is {result['speedup']:.2f}x transformers' generate "
               f"({result['jax_tokens_per_s']:.0f} vs {result['transformers_tokens_per_s']:.0f} tokens/s; "
               f"spreads {timings['jax']['spread']:.0%} / {timings['transformers']['spread']:.0%})")
    report(result, summary, args.json)


if __name__ == "__main__":
    main()
