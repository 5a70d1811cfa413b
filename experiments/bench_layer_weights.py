"""Does the compiler copy each layer's weights out of the stacked layer parameters?

The Flax ports keep every layer's weights stacked (`[L, ...]` leaves) and run the layers as
one `lax.scan`, which slices layer l's matrices at every step. XLA:CPU materialises those
slices (a dynamic-slice copy per layer and decode step, then the matmul reads the copy), so
a memory-bound decode step moves the layer weights three times instead of once. This times a
stack of L gated MLP blocks (`tanh(h + (silu(h Wg) * (h Wu)) Wd)`, the bulk of a decoder layer's
weights) applied to B rows, interleaved:

- `stacked`: the weights as `[L, D, F]` arrays, layer l sliced inside a layer loop (the ports'
  layout);
- `separate`: L separate arrays per matrix, the layers unrolled (no slicing);
- `unrolled`: the stacked layout with the layers unrolled, layer l's matrices static slices
  of the stack (what `lax.scan(..., unroll=True)` over the layers compiles to);
- `blocks`: the stacked layout read as the decoder's decode step reads it
  (`jaxsample.models.decoder.default_mlp_chunks`, or `--blocks`): layer l's MLP in column
  blocks of the intermediate features, each block's slices taken from the stack in turn, so
  a copied slice is still in cache when its matmul reads it.

All compute the same function (their largest output difference from `separate` is
reported) and read the same bytes; equal times mean the slice is read in place. Rerun with
`XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true` on a GPU to see whether GEMMs reading
the slice in place close the gap there (on an H200 with jax 0.11.2 it did not).

    python experiments/bench_layer_weights.py --layers 30 --hidden 576 --intermediate 1536 --batches 1,8
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxsample.models.decoder import default_mlp_chunks
from timing import add_timing_options, interleaved_timings, machine, report


def mlp(h, gate, up, down):
    # tanh keeps the activations finite through many layers and steps.
    return jnp.tanh(h + (jax.nn.silu(h @ gate) * (h @ up)) @ down)


def mlp_in_blocks(h, gate, up, down, layer, blocks: int):
    """`mlp(h, gate[layer], up[layer], down[layer])` summed over column blocks of F."""
    hidden, intermediate = gate.shape[1:]
    width = intermediate // blocks

    def add_block(c, total):
        g = jax.lax.dynamic_slice(gate, (layer, 0, c * width), (1, hidden, width))[0]
        u = jax.lax.dynamic_slice(up, (layer, 0, c * width), (1, hidden, width))[0]
        d = jax.lax.dynamic_slice(down, (layer, c * width, 0), (1, width, hidden))[0]
        return total + (jax.nn.silu(h @ g) * (h @ u)) @ d

    return jnp.tanh(h + jax.lax.fori_loop(0, blocks, add_block, jnp.zeros_like(h)))


def contenders(layers: int, hidden: int, intermediate: int, batch: int, steps: int, dtype, blocks: int):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = ((layers, hidden, intermediate), (layers, hidden, intermediate), (layers, intermediate, hidden))
    stacked = [(0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype) for k, s in zip(keys, shapes)]
    separate = [[m[i].copy() for m in stacked] for i in range(layers)]
    h = jnp.ones((batch, hidden), dtype)

    # `steps` decode-like steps per call, each through every layer, so a call lasts long enough.
    @jax.jit
    def run_stacked(h, gate, up, down):
        layer_loop = lambda h: jax.lax.fori_loop(0, layers, lambda i, h: mlp(h, gate[i], up[i], down[i]), h)  # noqa: E731
        return jax.lax.fori_loop(0, steps, lambda _, h: layer_loop(h), h)

    @jax.jit
    def run_separate(h, separate):
        def one_step(_, h):
            for gate, up, down in separate:
                h = mlp(h, gate, up, down)
            return h

        return jax.lax.fori_loop(0, steps, one_step, h)

    @jax.jit
    def run_unrolled(h, gate, up, down):
        def one_step(_, h):
            for i in range(layers):
                h = mlp(h, gate[i], up[i], down[i])
            return h

        return jax.lax.fori_loop(0, steps, one_step, h)

    @jax.jit
    def run_blocks(h, gate, up, down):
        layer_loop = lambda h: jax.lax.fori_loop(0, layers, lambda i, h: mlp_in_blocks(h, gate, up, down, i, blocks), h)  # noqa: E731
        return jax.lax.fori_loop(0, steps, lambda _, h: layer_loop(h), h)

    return {"stacked": lambda: run_stacked(h, *stacked), "separate": lambda: run_separate(h, separate),
            "unrolled": lambda: run_unrolled(h, *stacked), "blocks": lambda: run_blocks(h, *stacked)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="L, MLP blocks (SmolLM2-135M: 30; Qwen2.5-7B: 28)")
    parser.add_argument("--hidden", type=int, default=576, help="D (SmolLM2-135M: 576; Qwen2.5-7B: 3584)")
    parser.add_argument("--intermediate", type=int, default=1536, help="F (SmolLM2-135M: 1536; Qwen2.5-7B: 18944)")
    parser.add_argument("--batches", default="1,8", help="comma-separated row counts B")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    parser.add_argument("--steps", type=int, default=16, help="passes through all layers per timed call")
    parser.add_argument("--blocks", type=int,
                        help="column blocks of F for `blocks` (default: the decoder's choice on this backend)")
    add_timing_options(parser, samples=5, min_sample_s=1.0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    blocks = default_mlp_chunks(args.hidden, args.intermediate, dtype) if args.blocks is None else args.blocks
    if blocks < 1 or args.intermediate % blocks:
        parser.error(f"--blocks must be a positive divisor of --intermediate ({args.intermediate}), got {blocks}")
    weight_bytes = 3 * args.layers * args.hidden * args.intermediate * dtype.itemsize
    rows, lines = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = contenders(args.layers, args.hidden, args.intermediate, batch, args.steps, dtype, blocks)
        reference = runs["separate"]().astype(jnp.float32)
        difference = max(float(jnp.max(jnp.abs(runs[name]().astype(jnp.float32) - reference)))
                         for name in ("stacked", "unrolled", "blocks"))
        timings = interleaved_timings(runs, args.samples, args.min_sample_s)
        ms = {name: 1e3 * t["median_s"] / args.steps for name, t in timings.items()}
        rows.append({"batch": batch, "ms_per_pass": ms, "gb_per_s": {k: weight_bytes / v / 1e6 for k, v in ms.items()},
                     "stacked_over_separate": ms["stacked"] / ms["separate"],
                     "unrolled_over_separate": ms["unrolled"] / ms["separate"],
                     "stacked_over_blocks": ms["stacked"] / ms["blocks"],
                     "max_abs_difference": difference, "timings": timings})
        lines.append(f"B={batch}: stacked {ms['stacked']:.2f} ms, separate {ms['separate']:.2f} ms, unrolled "
                     f"{ms['unrolled']:.2f} ms, {blocks} blocks {ms['blocks']:.2f} ms per pass over "
                     f"{weight_bytes / 1e6:.0f} MB of weights: stacked/separate {rows[-1]['stacked_over_separate']:.2f}x, "
                     f"unrolled/separate {rows[-1]['unrolled_over_separate']:.2f}x, "
                     f"stacked/blocks {rows[-1]['stacked_over_blocks']:.2f}x")
    result = {**machine(), "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "blocks": blocks,
              "dtype": args.dtype, "steps": args.steps, "weight_bytes": weight_bytes, "rows": rows}
    report(result, "\n".join(lines), args.json)


if __name__ == "__main__":
    main()
