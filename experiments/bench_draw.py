"""The cost of drawing each row's next token, against Gumbel-max over the whole vocabulary.

Every decode step of every sampler draws one token per row from the proposal's log q
(`jaxsample.sampling.draw_tokens`). Timed interleaved, per (vocabulary, rows), `--steps`
draws per call on random logits:

- `categorical`: the library's two-stage draw (`jaxsample.sampling.categorical`: a block of
  ≈ √V ids, then an id in it, each by Gumbel-max; O(√V) random numbers per row);
- `gumbel_whole_vocabulary`: `jax.random.categorical`, Gumbel-max over all V ids (V random
  numbers and 2V logarithms per row), what the draw used before;
- `draw_tokens`: the whole draw of a decode step (log p, entropy, log q, the token and its
  numbers), for scale against a decode step (`bench_decode.py`).

    python experiments/bench_draw.py --vocab 49152,151936 --batches 1,8,64
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxsample import Proposal
from jaxsample.sampling import categorical, draw_tokens
from timing import add_timing_options, interleaved_timings, machine, positive_int, positive_ints, report


def contenders(vocab: int, batch: int, steps: int):
    logits = 3.0 * jax.random.normal(jax.random.key(0), (batch, vocab))
    keys = jax.random.split(jax.random.key(1), batch)
    proposal = Proposal(temperature=1.0).validated()

    def repeated(draw):
        # `steps` draws per call, each with fresh keys. The logits move with the previous
        # draws, so that the compiler cannot hoist their reductions out of the loop.
        @jax.jit
        def run(keys, logits):
            def body(step, total):
                step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
                return total + draw(step_keys, logits + 1e-6 * total[:, None])

            return jax.lax.fori_loop(0, steps, body, jnp.zeros((batch,), jnp.int32))

        return lambda: run(keys, logits)

    return {
        "categorical": repeated(jax.vmap(categorical)),
        "gumbel_whole_vocabulary": repeated(lambda k, l: jax.vmap(jax.random.categorical)(k, l).astype(jnp.int32)),
        "draw_tokens": repeated(lambda k, l: draw_tokens(k, l, proposal).token),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=positive_ints, default="49152,151936", help="comma-separated vocabulary sizes V (SmolLM2: 49152; Qwen2.5: 151936)")
    parser.add_argument("--batches", type=positive_ints, default="1,8,64", help="comma-separated row counts B")
    parser.add_argument("--steps", type=positive_int, default=16, help="draws per timed call")
    add_timing_options(parser, samples=5, min_sample_s=0.5)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    rows, lines = [], []
    for vocab in args.vocab:
        for batch in args.batches:
            timings = interleaved_timings(contenders(vocab, batch, args.steps), args.samples, args.min_sample_s)
            ms = {name: 1e3 * t["median_s"] / args.steps for name, t in timings.items()}
            speedup = ms["gumbel_whole_vocabulary"] / ms["categorical"]
            rows.append({"vocab": vocab, "batch": batch, "ms_per_draw": ms,
                         "whole_vocabulary_over_categorical": speedup, "timings": timings})
            lines.append(f"V={vocab} B={batch}: categorical {ms['categorical']:.3f} ms, Gumbel-max over the whole "
                         f"vocabulary {ms['gumbel_whole_vocabulary']:.3f} ms ({speedup:.1f}x); "
                         f"draw_tokens {ms['draw_tokens']:.3f} ms per step")
    report({**machine(), "steps": args.steps, "rows": rows}, "\n".join(lines), args.json)


if __name__ == "__main__":
    main()
