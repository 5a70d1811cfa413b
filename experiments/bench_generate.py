"""Tokens per second of `js.generate` against transformers' `generate`, same weights, one run.

Both sample at temperature 1 with no truncation from the same weights (SmolLM2-135M-Instruct
GGUF, dequantized to float32), the same chat prompt, batch and length; EOS is suppressed in
both so every row decodes exactly `--new-tokens` tokens. All contenders are timed
interleaved (`timing.interleaved_timings`: warm-up excluded, median over `--samples`
samples of at least `--min-sample-s` seconds each, with the spread).

`js.load` gives per-layer params (the layers unrolled in the program); `--stacked` adds a row
for `js.generate` on them stacked (`models.stack_layers`: one layer scan), with its speedup
over transformers and its time over plain `js.generate`'s. `--features` adds a row for `js.generate(record_features=True)`, `--intervention` one for
generation under an empty intervention (a zero vector added after every block) and `--alqr`
one under an A-LQR rank-one feedback controller at every block, each timed
against plain `js.generate` in the same run, the contenders interleaved round by round;
the ratios (median time / plain median time) are the cost of the model-internals hooks.

    python experiments/bench_generate.py --batch 8 --new-tokens 64
    python experiments/bench_generate.py --model toy-decisions --features --intervention --alqr --no-transformers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsample as js
from jaxsample import models, steering
from jaxsample.errors import ArgumentError
from jaxsample.models.registry import resolve
from timing import add_timing_options, interleaved_timings, machine, report


def random_controller(lm) -> steering.Controller:
    """A rank-one A-LQR controller with random unit directions and small gains."""
    keys = jax.random.split(jax.random.key(0), 2)
    shape = (lm.num_layers, lm.hidden_size)
    v = jax.random.normal(keys[0], shape)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return steering.Controller(d=1e-3 * jax.random.normal(keys[1], shape), v=v, beta=jnp.zeros(shape[:1]))


def add_vector(layer, h, vectors):
    """Adds the layer's vector (`vectors [L, D]`) to the residual stream."""
    return h + vectors[layer].astype(h.dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered name, HF checkpoint directory or .gguf file (transformers loads the same weights)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    add_timing_options(parser, samples=5, min_sample_s=2.0)
    parser.add_argument("--stacked", action="store_true", help="also time js.generate on the layers stacked (models.stack_layers; a second copy of the layer weights)")
    parser.add_argument("--features", action="store_true", help="also time generation that records features, against plain generation")
    parser.add_argument("--intervention", action="store_true", help="also time generation under an empty (zero) intervention after every block, against plain generation")
    parser.add_argument("--alqr", action="store_true", help="also time generation under an A-LQR rank-one feedback controller at every block (random directions: the cost does not depend on them), against plain generation")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time in wall seconds, or in CPU seconds of this process (steadier on a shared machine; not comparable with the transformers row, whose threads differ)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison (e.g. for the hook rows alone)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    lm = js.load(args.model)
    # EOS suppressed: an "eos" id outside the vocabulary never matches a sampled token.
    lm_no_stop = lm.replace(eos_token_ids=(lm.vocab_size,))
    try:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story about a dragon."}])
    except ArgumentError:  # e.g. the embedded toy model: decode speed does not depend on the ids
        prompt = np.random.default_rng(0).integers(0, lm.vocab_size, 16)
    prompt = jnp.asarray(prompt, jnp.int32)

    def generator(model, record_features=False):
        def run():
            out = js.generate(
                jax.random.key(0), model, prompt, args.new_tokens, num_samples=args.batch,
                record_features=record_features,
            )
            return out.tokens
        return run

    contenders = {"plain": generator(lm_no_stop)}
    if args.stacked:
        contenders["stacked"] = generator(lm_no_stop.replace(params=models.stack_layers(lm.params)))
    if args.features:
        contenders["features"] = generator(lm_no_stop, record_features=True)
    if args.intervention:
        empty = js.Intervention(
            add_vector, jnp.zeros((lm.num_layers, lm.hidden_size), lm.params["norm"]["scale"].dtype),
            tuple(range(lm.num_layers)),
        )
        contenders["intervention"] = generator(lm_no_stop.with_intervention(empty))
    if args.alqr:
        contenders["alqr"] = generator(lm_no_stop.with_intervention(steering.alqr_intervention(random_controller(lm))))
    if not args.no_transformers:
        contenders["transformers"] = torch_generator(args, lm, prompt)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    timings = interleaved_timings(contenders, args.samples, args.min_sample_s, clock)
    tokens = args.batch * args.new_tokens
    plain = timings["plain"]["median_s"]
    result = {
        **machine(),
        "model": args.model,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(prompt.shape[0]),
        "clock": args.clock,
        "jax_tokens_per_s": tokens / plain,
        "timings": timings,
    }
    summaries = []
    if "transformers" in timings:
        result.update(transformers_tokens_per_s=tokens / timings["transformers"]["median_s"],
                      speedup=timings["transformers"]["median_s"] / plain)
        summaries.append(f"js.generate is {result['speedup']:.2f}x transformers' generate "
                         f"({result['jax_tokens_per_s']:.0f} vs {result['transformers_tokens_per_s']:.0f} tokens/s; "
                         f"spreads {timings['plain']['spread']:.0%} / {timings['transformers']['spread']:.0%})")
    if "stacked" in timings and "transformers" in timings:
        result["stacked_speedup"] = timings["transformers"]["median_s"] / timings["stacked"]["median_s"]
        summaries.append(f"on stacked layers: {result['stacked_speedup']:.2f}x transformers' generate "
                         f"({tokens / timings['stacked']['median_s']:.0f} tokens/s; spread {timings['stacked']['spread']:.0%})")
    for name in ("stacked", "features", "intervention", "alqr"):
        if name in timings:
            row = timings[name]
            result[f"{name}_ratio_to_plain"] = row["median_s"] / plain
            # On a shared machine the minimum is the least disturbed sample.
            result[f"{name}_min_ratio_to_plain"] = row["min_s"] / timings["plain"]["min_s"]
            summaries.append(f"{name}: {row['median_s'] / plain:.3f}x plain by medians ({row['median_s'] * 1e3:.1f} ms vs "
                             f"{plain * 1e3:.1f} ms; spread {row['spread']:.0%}), "
                             f"{result[f'{name}_min_ratio_to_plain']:.3f}x by minima")
    report(result, "\n".join(summaries), args.json)


def torch_generator(args, lm, prompt):
    """transformers' `generate` on the same weights, prompt, batch and length."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(args.model) if Path(args.model).exists() else resolve(args.model)
    if path.is_dir():
        torch_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        torch_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    torch_model.eval()
    input_ids = torch.tensor(np.asarray(prompt))[None].repeat(args.batch, 1)

    def run():
        with torch.no_grad():
            torch_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, pad_token_id=lm.pad_token_id,
            )

    return run


if __name__ == "__main__":
    main()
