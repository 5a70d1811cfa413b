"""Peak memory of SMC decoding and power sampling against the KV cache they must hold.

Compiles (without running) `smc_decode`'s and `power_sample`'s jitted programs for
`--particles` rows, a `--prompt-tokens` prompt and `--new-tokens` generated tokens on a small
random model, and reads the peak from XLA's memory analysis of the compiled program
(`jitted.lower(...).compile().memory_analysis()`: temporaries + outputs + non-parameter
arguments − aliased bytes; the weights are excluded). The goal of a shared prompt cache is a
peak of at most 1.2 x (the generated part of every row's cache + one prompt cache).
`--prompts P` also compiles `smc_decode` and `power_sample` on a batch of P prompts with
`--particles` / P particles or chains each, whose base is the generated part + P prompt caches
(each prompt held once).

    python experiments/bench_memory.py --particles 64 --prompt-tokens 1024 --new-tokens 512 \
        --shapes tiny,qwen2.5-0.5b

Only shapes are needed: the programs are lowered with abstract weights, so a 7B shape costs
no memory here. The model shapes are `bench_decode.SHAPES`.

`--gpu-target experiments/gpu_targets/h200.txtpb` compiles the same programs for a GPU on a
machine without one (XLA's deviceless compilation: the CUDA PJRT plugin builds a compile-only
device from the target description, and XLA:GPU's whole pipeline runs, buffer assignment
included). It needs the plugin of the installed jax's version, and `ptxas` on the PATH:

    pip install jax-cuda13-plugin==$JAX_VERSION jax-cuda13-pjrt==$JAX_VERSION
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python experiments/bench_memory.py --dtype bfloat16 \
        --gpu-target experiments/gpu_targets/h200.txtpb

(`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` where cuDNN and the other CUDA libraries are absent:
compiling does not call them.)

What fills the peak: each program's `--largest` biggest buffers other than parameters and
constants, read from XLA's buffer assignment of that compilation (`xla_dump_to`), with the
instructions and shapes of the values that share each (`largest_buffers`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsample import Proposal
from jaxsample.decoding import pad_prompt
from jaxsample.mcmc import uniform
from jaxsample.mcmc.cuts import as_jit_argument
from jaxsample.mcmc.blocks import _power_sample
from jaxsample.models import make_language_model
from jaxsample.smc.sampler import _run as _smc_run
from jaxsample.smc.target import make_target

from bench_decode import SHAPES, gpu_target_device, model_config, param_shapes, placed_on
from timing import existing_file, machine, report


def peak_bytes(compiled, params_bytes: int) -> dict:
    stats = compiled.memory_analysis()
    total = (stats.temp_size_in_bytes + stats.output_size_in_bytes + stats.argument_size_in_bytes
             - stats.alias_size_in_bytes)
    return {"temp": stats.temp_size_in_bytes, "output": stats.output_size_in_bytes,
            "arguments": stats.argument_size_in_bytes, "alias": stats.alias_size_in_bytes,
            "peak_without_weights": total - params_bytes}


def compile_with_report(lowered, largest: int):
    """`lowered.compile()` and the `largest` biggest buffers of its program that are neither
    parameters nor constants, from the buffer assignment XLA writes when the compilation
    dumps (`xla_dump_to`). Values that share one slice of an allocation (XLA reuses memory
    once a value is dead) count once: a list of `{"bytes", "allocation", "values",
    "instructions", "shapes"}` with up to 4 of the slice's instructions (`copy.12`,
    `dynamic-update-slice_fusion`, ...) and the distinct shapes it holds."""
    with tempfile.TemporaryDirectory() as directory:
        compiled = lowered.compile({"xla_dump_to": directory})
        dumps = sorted(Path(directory).glob("*after_optimizations-buffer-assignment.txt"))
        if len(dumps) != 1:
            raise RuntimeError(f"expected one XLA buffer assignment in the dump, found {len(dumps)}")
        text = dumps[0].read_text()
    slices, kind = {}, None
    for line in text.splitlines():
        if header := re.match(r"allocation (\d+): size \d+, (.*):$", line):
            number, description = header.groups()
            kept = not re.match(r"(parameter|constant|thread-local)", description)
            kind = (number, description.split(",")[0]) if kept else None
        elif kind and (value := re.match(r" value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (.*)$", line)):
            name, size, offset, shape = value.groups()
            if shape.startswith("("):  # a tuple: a table of pointers to other buffers
                continue
            entry = slices.setdefault((kind, int(offset), int(size)), {"names": [], "shapes": []})
            entry["names"].append(name)
            entry["shapes"].append(re.sub(r"\{[^}]*\}", "", shape))
    biggest = sorted(slices.items(), key=lambda item: -item[0][2])[:largest]
    return compiled, [{"bytes": size, "allocation": f"{number} ({description})", "values": len(entry["names"]),
                       "instructions": entry["names"][:4], "shapes": sorted(set(entry["shapes"]))}
                      for ((number, description), _, size), entry in biggest]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=64, help="SMC particles = MH chains")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=512, help="generated tokens per row")
    parser.add_argument("--prompts", type=int, default=1, help="also compile smc_decode and power_sample on this many prompts (a divisor of --particles) with --particles / P rows each")
    parser.add_argument("--block-size", type=int, default=64, help="SMC block size = MH block size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    parser.add_argument("--shapes", default="tiny,qwen2.5-0.5b",
                        help=f"comma-separated model shapes: {', '.join(SHAPES)}")
    parser.add_argument("--largest", type=int, default=8, help="biggest buffers of each program to report (parameters and constants excluded)")
    parser.add_argument("--gpu-target", type=existing_file, help="compile for the GPU this XLA GpuTargetConfigProto text file describes "
                        "(experiments/gpu_targets/), without a GPU; see above")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.particles % args.prompts:
        parser.error(f"--prompts must divide --particles ({args.particles}), got {args.prompts}")

    dtype = jnp.dtype(args.dtype)
    device = gpu_target_device(args.gpu_target) if args.gpu_target else None
    results, lines = {}, []
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        results[shape] = measure(shape, dtype, args, device)
        lines.append(summary(shape, results[shape]))
    compiled_for = {"compiled_for": device.device_kind, "gpu_target": args.gpu_target} if device else {}
    result = {**machine(), **compiled_for, "particles": args.particles, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "dtype": args.dtype, "shapes": results}
    report(result, "\n".join(lines), args.json)


def measure(shape: str, dtype, args, device) -> dict:
    """The programs' peaks, compiled for `device` when given (the weights placed on it commit
    the programs there; traced with it as the default device, the decode step makes the
    choices it makes on that platform, `decoder.target_platform`), else for JAX's default
    device."""
    config = model_config(shape, args.prompt_tokens + args.new_tokens)
    params = param_shapes(config, dtype)
    if device is not None:
        params = placed_on(device, params)
    lm = make_language_model(config, params)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    prompt, length = pad_prompt(lm, jnp.ones((args.prompt_tokens,), jnp.int32), args.new_tokens)
    key = jax.random.key(0)
    alpha = jnp.float32(4.0)
    proposal = Proposal(temperature=1.0 / alpha).validated()

    tracing_for = (lambda: jax.default_device(device)) if device else contextlib.nullcontext

    def smc_program(keys, prompts, lengths):
        target_of, ess_threshold = make_target(alpha, 0.0, None), jnp.float32(0.5)
        with tracing_for():  # only tracing inside: an array made eagerly would need the device
            lowered = _smc_run.lower(
                keys, lm, prompts, lengths, target_of, proposal, ess_threshold,
                num_particles=args.particles // keys.shape[0], max_new_tokens=args.new_tokens,
                block_size=args.block_size, resampler="systematic", num_rejuvenation_steps=0, lookahead=None,
                progress=False, mesh=None)
        return compile_with_report(lowered, args.largest)

    def power_program(keys, prompts, lengths):
        cut, freeze = as_jit_argument(uniform), jnp.asarray(False)
        with tracing_for():
            lowered = _power_sample.lower(
                keys, lm, prompts, lengths, alpha, proposal, cut, args.particles // keys.shape[0],
                args.block_size, 2, args.new_tokens, freeze, False, None)
        return compile_with_report(lowered, args.largest)

    programs = [("smc_decode", 1, *smc_program(key[None], prompt, length)),
                ("power_sample", 1, *power_program(key[None], prompt, length))]
    if args.prompts > 1:
        batch = (jax.random.split(key, args.prompts), jnp.tile(prompt, (args.prompts, 1)),
                 jnp.full((args.prompts,), length))
        programs += [(f"smc_decode_{args.prompts}_prompts", args.prompts, *smc_program(*batch)),
                     (f"power_sample_{args.prompts}_prompts", args.prompts, *power_program(*batch))]

    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    generated = args.particles * args.new_tokens * kv_per_token
    one_prompt = prompt.shape[0] * kv_per_token
    rows = {}
    for name, prompts, compiled, slices in programs:
        stats = peak_bytes(compiled, params_bytes)
        stats["prompts"] = prompts
        stats["ratio_to_goal_base"] = stats["peak_without_weights"] / (generated + prompts * one_prompt)
        stats["largest_buffers"] = slices
        rows[name] = stats
    return {"layers": config.num_hidden_layers, "prompt_bucket": int(prompt.shape[0]),
            "kv_bytes_per_token": kv_per_token, "generated_cache_bytes": generated,
            "one_prompt_cache_bytes": one_prompt, "weights_bytes": params_bytes,
            "per_row_full_cache_bytes": args.particles * (prompt.shape[0] + args.new_tokens) * kv_per_token,
            "programs": rows}


def summary(shape: str, result: dict) -> str:
    base = result["generated_cache_bytes"] + result["one_prompt_cache_bytes"]
    lines = [f"{shape} ({result['layers']} layers): goal base (generated cache + one prompt cache) "
             f"{base / 2**20:.0f} MiB; goal: peak <= {1.2 * base / 2**20:.0f} MiB"]
    for name, stats in result["programs"].items():
        prompts = stats.get("prompts", 1)
        lines.append(f"  {name}: peak {stats['peak_without_weights'] / 2**20:.0f} MiB = "
                     f"{stats['ratio_to_goal_base']:.2f}x the goal base"
                     + (f" (with {prompts} prompt caches)" if prompts > 1 else "") + "; largest buffers:")
        lines += [f"    {b['bytes'] / 2**20:8.1f} MiB  {' '.join(b['shapes'])}  ({', '.join(b['instructions'])}"
                  f"{', ...' if b['values'] > len(b['instructions']) else ''})" for b in stats["largest_buffers"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
