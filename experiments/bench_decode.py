"""Decode speed against the memory roofline, with transformers' `generate` on the same shapes.

For each model shape (random weights built from the published config values, in the
per-layer layout `load` gives; nothing is downloaded) and batch size, the jitted decode loop (`jaxsample.decoding.extend`, the loop
every sampler runs) decodes `--new-tokens` tokens per row after a `--prompt-tokens` prompt,
stop tokens suppressed. Reported per (shape, batch):

- ms per decode step (median over interleaved samples, with the spread);
- bytes a step must read: every weight once, plus the KV cache of the filled slots
  (prompt + half the generation on average, all layers, K and V);
- achieved GB/s = bytes / step time, and the fraction of the roofline bandwidth
  (`--bandwidth-gbs`, default: `timing.memory_read_gbs`, a jitted sum over 512 MiB in this run);
- floating-point operations a step must do (2 per weight of every projection and of the
  logit matrix per row, plus attention's q·k and p·v over the filled slots), achieved
  GFLOP/s and the fraction of the compute peak (`--peak-gflops`, default: measured in this
  run by `timing.matmul_gflops`, a jitted square matmul in the model's dtype); the step's
  bound is the larger of the two roofline times (bytes / bandwidth, FLOPs / peak);
- compile time (first call minus a timed call);
- kernels per decode step, counted in the compiled program (`kernels_per_step`): every
  instruction of the decode loop's body that runs as its own kernel (a fusion, a library
  call, an unfused op; the layer loop's body counted once per layer). On a GPU each is a
  kernel launch unless XLA groups them into a CUDA graph; on a CPU each is a runtime thunk;
- transformers' `generate` (same shape, dtype and batch; sampling, EOS suppressed) ms per step,
  over `--transformers-new-tokens` steps (default `--new-tokens`; fewer fit a GPU session's
  time limit: its steps cost about the same at these short contexts, host-bound);
- with `--also-stacked`: the same decode loop on the stacked layout (`models.stack_layers`:
  one layer scan, a dynamic slice of each weight per layer; a second copy of the layer
  weights), its ms per step, roofline fraction, compile time and kernels (`stacked_*`),
  timed in the same run; with `--also-filled-widths`, likewise the loop attending over the
  narrowest power-of-two width that holds the filled slots, picked per layer
  (`DecodeStep(attend_over_capacity=False)`; `filled_widths_*`), where the default reads a
  cache that is cheap beside the weights whole (`decoder.attention_widths`): on a GPU each
  per-layer pick is a host-device sync;
- with `--matmuls-alone`: the step's weight matmuls alone (`matmuls_alone_ms_per_step`),
  timed in the same run: the same projections and logit matrix on the same rows through
  XLA's own dot kernels, each weight matrix whole in its own array (no slicing, attention,
  norms, cache or draw). The step's time over it (`step_over_matmuls_alone`) says how much
  the rest costs; below 1 the step issues its matmuls better than whole (the CPU step's MLP
  blocks). transformers' step over it (`transformers_over_matmuls_alone`) is the speedup a
  step made of these matmuls and nothing else would have.

With `--gpu-target experiments/gpu_targets/h200.txtpb` nothing is timed: each row's decode
program is compiled for that GPU on a machine without one (see `bench_memory.py` for what
that needs) and its kernels per step and `conditional`s are reported.

Both sides' steps exclude the prompt: the time of a prefill-only call (`init_decode`; one
transformers forward over the prompt) is subtracted from the whole call's.

    python experiments/bench_decode.py --shapes smollm2-135m --batches 1,8 --dtype float32 --matmuls-alone  # CPU
    python experiments/bench_decode.py --shapes qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b \\
        --batches 1,8,32,64 --dtype bfloat16 --bandwidth-gbs 4300 --matmul-size 8192 \\
        --transformers-batches 1,32  # H200
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from jaxsample import Proposal
from jaxsample.decoding import extend, init_decode
from jaxsample.models import DecodeStep, ModelConfig, init_params, make_language_model, stack_layers, unstack_layers
from timing import add_timing_options, existing_file, interleaved_timings, machine, matmul_gflops, positive_int, positive_ints, report

# Published config.json values (hf.co/Qwen/Qwen2.5-*, hf.co/HuggingFaceTB/SmolLM2-135M-Instruct).
SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       rope_theta=1000000.0, tie_word_embeddings=False, qkv_bias=True, rms_norm_eps=1e-6),
    # CI-sized: runs in seconds on a laptop CPU.
    "tiny": dict(model_type="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, rms_norm_eps=1e-6),
}


def model_config(shape: str, max_positions: int) -> ModelConfig:
    return ModelConfig(max_position_embeddings=max_positions, eos_token_ids=(0,), **SHAPES[shape])


def param_shapes(config: ModelConfig, dtype) -> dict:
    """The shapes and dtypes of per-layer params (`load`'s layout), nothing allocated."""
    return jax.eval_shape(lambda key: unstack_layers(init_params(key, config, dtype)), jax.random.key(0))


def random_params(config: ModelConfig, dtype) -> dict:
    """Per-layer params, N(0, 0.02²) leaf by leaf (one draw per leaf: a single draw over 7B
    elements would overflow threefry's 32-bit counter)."""
    leaves, treedef = jax.tree.flatten(param_shapes(config, dtype))
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype), static_argnums=1)
    return jax.tree.unflatten(treedef, [draw(jax.random.key(i), leaf.shape) for i, leaf in enumerate(leaves)])


def step_flops(config: ModelConfig, params, batch: int, filled: float) -> float:
    """FLOPs of one decode step: 2 per projection weight and per logit-matrix weight (the
    tied embedding when there is no `lm_head`), per row, + q·k and p·v over `filled` slots."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    matmul_weights = sum(leaf.size for path, leaf in leaves if path[-1].key == "kernel")
    if config.tie_word_embeddings:
        matmul_weights += config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * filled * config.num_attention_heads * config.head_dim
    return batch * (2 * matmul_weights + attention)


def step_bytes(config: ModelConfig, params, batch: int, filled: float, dtype) -> float:
    """Bytes one decode step must read: all weights + K and V of `filled` slots per row."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = 2 * batch * config.num_hidden_layers * filled * config.num_key_value_heads * config.head_dim
    return weights + kv * jnp.dtype(dtype).itemsize


# Instructions that name or regroup buffers and run no kernel of their own.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
              "after-all", "add-dependency", "domain"}


def kernels_per_step(hlo: str) -> int:
    """Kernels one iteration of a compiled program's decode loop runs, from its optimized HLO
    text (`jitted.lower(...).compile().as_text()`). The decode loop is the costliest `while`
    whose trip count the compiler cannot know (it stops on EOS); the layer scan and the
    random bits' loops inside it have known trip counts.

    A fusion, custom call or unfused op counts 1; a nested loop of known trip count n counts
    n times its body plus n + 1 times its condition; a `conditional` counts 1 plus its
    costliest branch; a `call` counts its callee.
    """
    computations, name = {}, None
    for line in hlo.splitlines():
        if header := re.match(r"(?:ENTRY )?%(\S+) ", line):
            name = header.group(1)
            computations[name] = []
        elif line == "}":
            name = None
        elif name is not None and (instruction := re.match(r"\s+(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\((.*)$", line)):
            computations[name].append(instruction.groups())

    def callee(attributes: str, key: str) -> str:
        return re.search(rf"\b{key}=%([^,\s}}]+)", attributes).group(1)

    def trip_count(attributes: str) -> int | None:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
        return None if known is None else int(known.group(1))

    @functools.cache
    def cost(computation: str) -> int:
        total = 0
        for opcode, attributes in computations[computation]:
            if opcode == "while":
                trips = trip_count(attributes)
                if trips is None:
                    raise ValueError(f"a loop inside {computation!r} has no known trip count")
                total += trips * cost(callee(attributes, "body")) + (trips + 1) * cost(callee(attributes, "condition"))
            elif opcode == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", attributes)
                branches = (re.findall(r"%([^,\s}]+)", listed.group(1)) if listed else
                            [callee(attributes, "true_computation"), callee(attributes, "false_computation")])
                total += 1 + max(cost(branch) for branch in branches)
            elif opcode == "call":
                total += cost(callee(attributes, "to_apply"))
            elif opcode not in _NO_KERNEL:
                total += 1
        return total

    loops = [attributes for instructions in computations.values() for opcode, attributes in instructions
             if opcode == "while" and trip_count(attributes) is None]
    if not loops:
        raise ValueError("the program has no loop of unknown trip count (no decode loop)")
    return max(cost(callee(a, "body")) + cost(callee(a, "condition")) for a in loops)


def decode_loop(new_tokens: int):
    """The decode program timed: `new_tokens` steps of `extend` (sampling at temperature 1),
    `(key, lm, state) -> state`, the state donated."""
    proposal = Proposal(temperature=1.0).validated()
    return jax.jit(lambda key, lm, state: extend(key, lm, state, new_tokens, proposal)[0], donate_argnums=2)


def gpu_target_device(path: str):
    """A compile-only CUDA device for the GPU that the XLA GpuTargetConfigProto text file
    `path` describes (`experiments/gpu_targets/`): programs placed on it compile for that GPU
    on a machine without one."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=Path(path).read_text(), topology="1x1x1")
    except NotImplementedError as error:
        raise SystemExit(
            f"--gpu-target needs JAX's CUDA plugin (pip install jax-cuda13-plugin=={jax.__version__} "
            f"jax-cuda13-pjrt=={jax.__version__}; JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 where CUDA's "
            f"libraries are absent): {error}") from None
    return topology.devices[0]


def placed_on(device, tree):
    """`tree`'s arrays or shapes as shapes committed to `device` (nothing allocated)."""
    sharding = SingleDeviceSharding(device)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


def compiled_rows(device, shapes: list[str], batches: list[int], dtype, prompt_tokens: int, new_tokens: int) -> list[dict]:
    """`--gpu-target`: each (shape, batch)'s decode program compiled for `device`, not run:
    its kernels per step and its `conditional`s (each an XLA:GPU host-device sync per run).
    Traced with `device` as the default device, the step makes that platform's choices."""
    rows = []
    for shape in shapes:
        config = model_config(shape, prompt_tokens + new_tokens)
        lm = make_language_model(config, placed_on(device, param_shapes(config, dtype)), name=shape)
        lm = lm.replace(eos_token_ids=(lm.vocab_size,))
        prompt = jax.ShapeDtypeStruct((prompt_tokens,), jnp.int32, sharding=SingleDeviceSharding(device))
        key = placed_on(device, jax.eval_shape(lambda: jax.random.key(0)))
        for batch in batches:
            state = placed_on(device, jax.eval_shape(lambda lm, p, b=batch: init_decode(lm, p, b, new_tokens), lm, prompt))
            decode, began = decode_loop(new_tokens), time.perf_counter()
            with jax.default_device(device):  # only tracing inside: an eager op would need the device
                text = decode.lower(key, lm, state).compile().as_text()
            rows.append({"shape": shape, "batch": batch, "dtype": jnp.dtype(dtype).name,
                         "kernels_per_step": kernels_per_step(text), "conditionals": text.count(" conditional("),
                         "compile_s": time.perf_counter() - began})
            print(f"{shape} B={batch}: {rows[-1]['kernels_per_step']} kernels/step, "
                  f"{rows[-1]['conditionals']} conditionals (compiled for {device.device_kind}, not run)", flush=True)
    return rows


def jax_contender(lm, batch: int, prompt_tokens: int, new_tokens: int, decode_lm=None):
    """Prefill with `lm`, then the decode loop with `decode_lm` (default `lm`)."""
    decode_lm = lm if decode_lm is None else decode_lm
    prompt = jnp.arange(1, prompt_tokens + 1, dtype=jnp.int32) % lm.vocab_size
    decode = decode_loop(new_tokens)
    start = jax.jit(init_decode, static_argnums=(2, 3))

    def run():
        state = start(lm, prompt, batch, new_tokens)
        return decode(jax.random.key(0), decode_lm, state).tokens

    prefill_only = lambda: start(lm, prompt, batch, new_tokens).next_logits  # noqa: E731
    # After the timed calls this is the executable they ran, not a new compilation.
    compiled_text = lambda: decode.lower(jax.random.key(0), decode_lm, start(lm, prompt, batch, new_tokens)).compile().as_text()  # noqa: E731
    return run, prefill_only, compiled_text


def step_matmuls(lm):
    """One decode step's weight matmuls alone, `h [B, D] -> h [B, D]`: per layer q, k, v, o
    and the gated MLP, then the logit matrix, each matrix its own array (the per-layer
    params). Biases, norms, attention, the cache and the draw are left
    out; tanh keeps random weights' activations finite."""
    config, params = lm.config, lm.params
    layers = params["layers"]
    tied = "lm_head" not in params
    logit_matrix = params["embed_tokens"]["embedding"] if tied else params["lm_head"]["kernel"]

    def step(h):
        for layer in layers:
            attention, mlp = layer["self_attn"], layer["mlp"]
            q = h @ attention["q_proj"]["kernel"]
            # k and v go to the cache in a real step; their sums keep them computed here.
            k, v = h @ attention["k_proj"]["kernel"], h @ attention["v_proj"]["kernel"]
            kv = k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True)
            h = jnp.tanh(h + (q + kv) @ attention["o_proj"]["kernel"])
            gated = jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])
            h = jnp.tanh(h + gated @ mlp["down_proj"]["kernel"])
        # The tied embedding is read as the decoder reads it: `[V, D]` contracted over D.
        logits = jnp.einsum("bd,vd->bv", h, logit_matrix) if tied else h @ logit_matrix
        return jnp.tanh(h + logits[:, : config.hidden_size])

    return step


def matmuls_alone_contender(lm, batch: int, new_tokens: int):
    """`new_tokens` calls of `step_matmuls` in one compiled loop."""
    step = step_matmuls(lm)
    run = jax.jit(lambda h: jax.lax.fori_loop(0, new_tokens, lambda _, h: step(h), h))
    h = jnp.full((batch, lm.config.hidden_size), 0.1, lm.params["embed_tokens"]["embedding"].dtype)
    return lambda: run(h)


def torch_contender(shape: str, dtype_name: str, batch: int, prompt_tokens: int, new_tokens: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    values.pop("qkv_bias", None)
    hf_config = AutoConfig.for_model(model_type, max_position_embeddings=prompt_tokens + new_tokens,
                                     **values)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    ids = (torch.arange(1, prompt_tokens + 1, device=device) % values["vocab_size"])[None].repeat(batch, 1)

    def synchronized(out):
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    def run():
        with torch.no_grad():
            return synchronized(model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None))

    def prefill_only():
        with torch.no_grad():
            return synchronized(model(ids, attention_mask=torch.ones_like(ids)).logits)

    return run, prefill_only, model


def _free_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _subset(parser: argparse.ArgumentParser, flag: str, text: str, of_flag: str, chosen: list[str]) -> list[str]:
    """`flag`'s value: 'all', 'none' or a comma-separated subset of `chosen` (`of_flag`'s items)."""
    if text in ("all", "none"):
        return chosen if text == "all" else []
    items = text.split(",")
    outside = [item for item in items if item not in chosen]
    if outside:
        parser.error(f"{flag}: {', '.join(outside)} not in {of_flag} {','.join(chosen)}; give 'all', 'none' or a subset of {of_flag}")
    return items


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m", help=f"comma-separated model shapes: {', '.join(SHAPES)}")
    parser.add_argument("--batches", type=positive_ints, default="1,8", help="comma-separated batch sizes (rows decoded together)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations (logits and log-softmax stay float32)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="decode steps timed per call")
    parser.add_argument("--transformers-new-tokens", type=int, help="decode steps per transformers generate call (default: --new-tokens)")
    parser.add_argument("--transformers-batches", default="all", help="batch sizes at which transformers' generate is timed too: 'all', 'none' or a comma-separated subset of --batches")
    parser.add_argument("--transformers-shapes", default="all", help="shapes at which transformers' generate is timed: 'all', 'none' or a comma-separated subset of --shapes")
    parser.add_argument("--also-stacked", action="store_true", help="also time the decode loop on stacked layer params (one layer scan; a second copy of the layer weights)")
    parser.add_argument("--also-filled-widths", action="store_true", help="also time the decode loop picking the attention width per layer (DecodeStep(attend_over_capacity=False))")
    parser.add_argument("--matmuls-alone", action="store_true", help="also time the step's weight matmuls alone, each matrix whole")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0, help="roofline bandwidth in GB/s (0: measure it in this run; an H200 copies at ~4300)")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="compute peak in GFLOP/s (0: measure it in this run with a square matmul)")
    parser.add_argument("--matmul-size", type=positive_int, default=2048, help="side of the square matmul that measures the compute peak (GPUs need ~8192 to reach theirs)")
    parser.add_argument("--gpu-target", type=existing_file, help="compile each row's decode program for the GPU this XLA GpuTargetConfigProto "
                        "text file describes (experiments/gpu_targets/), without a GPU, and report its kernels per step "
                        "and conditionals instead of timing it (JAX's CUDA plugin needed; see bench_memory.py)")
    add_timing_options(parser, samples=3, min_sample_s=1.0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch_new_tokens = args.new_tokens if args.transformers_new_tokens is None else args.transformers_new_tokens
    if not 1 <= torch_new_tokens <= args.new_tokens:
        parser.error(f"--transformers-new-tokens must be between 1 and --new-tokens ({args.new_tokens}), got {torch_new_tokens}")
    shapes = args.shapes.split(",")
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    torch_batches = _subset(parser, "--transformers-batches", args.transformers_batches, "--batches", [str(b) for b in args.batches])
    torch_shapes = _subset(parser, "--transformers-shapes", args.transformers_shapes, "--shapes", shapes)

    dtype = jnp.dtype(args.dtype)
    if args.gpu_target:
        device = gpu_target_device(args.gpu_target)
        rows = compiled_rows(device, shapes, args.batches, dtype, args.prompt_tokens, args.new_tokens)
        result = {**machine(), "compiled_for": device.device_kind, "gpu_target": args.gpu_target, "layout": "per-layer",
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows}
        table = ["| shape | batch | kernels/step | conditionals |", "|---|---|---|---|"]
        table += [f"| {r['shape']} | {r['batch']} | {r['kernels_per_step']} | {r['conditionals']} |" for r in rows]
        report(result, "\n".join(table), args.json)
        return
    header = machine()
    bandwidth = args.bandwidth_gbs or header["memory_read_gbs"]
    measured_gflops = matmul_gflops(dtype, args.matmul_size)
    peak_gflops = args.peak_gflops or measured_gflops
    rows = []
    header = {**header, "roofline_bandwidth_gbs": bandwidth,
              "measured_matmul_gflops": measured_gflops, "matmul_size": args.matmul_size,
              "compute_peak_gflops": peak_gflops,
              "layout": "per-layer", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "transformers_new_tokens": torch_new_tokens}
    for shape in shapes:
        config = model_config(shape, args.prompt_tokens + args.new_tokens)
        params = random_params(config, dtype)
        lm = make_language_model(config, params, name=shape)
        lm = lm.replace(eos_token_ids=(lm.vocab_size,))  # no token stops: fixed lengths
        for batch in args.batches:
            run_jax, prefill, compiled_text = jax_contender(lm, batch, args.prompt_tokens, args.new_tokens)
            contenders = {"jax": run_jax, "jax_prefill": prefill}
            variants = {}
            if args.also_stacked:  # a second copy of the layer weights, until the row is done
                variants["stacked"] = lm.replace(params=stack_layers(lm.params))
            if args.also_filled_widths:
                variants["filled_widths"] = lm.replace(decode_fn=DecodeStep(lm.config, attend_over_capacity=False))
            variant_texts = {}
            for name, decode_lm in variants.items():
                contenders[f"jax_{name}"], _, variant_texts[name] = jax_contender(
                    lm, batch, args.prompt_tokens, args.new_tokens, decode_lm)
            if args.matmuls_alone:
                contenders["matmuls_alone"] = matmuls_alone_contender(lm, batch, args.new_tokens)
            with_torch = str(batch) in torch_batches and shape in torch_shapes
            if with_torch:
                run_torch, prefill_torch, torch_model = torch_contender(shape, args.dtype, batch, args.prompt_tokens,
                                                                        torch_new_tokens)
            began = time.perf_counter()
            timings = interleaved_timings(contenders, args.samples, args.min_sample_s)
            if with_torch:  # seconds per call: one call per sample, fewer samples
                timings.update(interleaved_timings({"transformers": run_torch, "transformers_prefill": prefill_torch},
                                                   2, 0.0))
            # The loop's steps alone: the prefill (timed separately) is subtracted.
            step_s = (timings["jax"]["median_s"] - timings["jax_prefill"]["median_s"]) / args.new_tokens
            filled = args.prompt_tokens + args.new_tokens / 2
            nbytes = step_bytes(config, params, batch, filled, dtype)
            flops = step_flops(config, params, batch, filled)
            row = {
                "shape": shape, "batch": batch, "dtype": args.dtype,
                "ms_per_step": 1e3 * step_s,
                "spread": timings["jax"]["spread"],
                "bytes_per_step": nbytes,
                "gb_per_s": nbytes / step_s / 1e9,
                "roofline_fraction": nbytes / step_s / 1e9 / bandwidth,
                "flops_per_step": flops,
                "gflop_per_s": flops / step_s / 1e9,
                "compute_fraction": flops / step_s / 1e9 / peak_gflops,
                "bound": "memory" if nbytes / bandwidth >= flops / peak_gflops else "compute",
                "compile_s": sum(timings[k]["first_call_s"] - timings[k]["median_s"] for k in ("jax", "jax_prefill")),
                "kernels_per_step": kernels_per_step(compiled_text()),
                "timings": timings,
                "wall_s": time.perf_counter() - began,
            }
            for name, text in variant_texts.items():
                variant = timings[f"jax_{name}"]
                variant_s = (variant["median_s"] - timings["jax_prefill"]["median_s"]) / args.new_tokens
                row.update({f"{name}_ms_per_step": 1e3 * variant_s,
                            f"{name}_roofline_fraction": nbytes / variant_s / 1e9 / bandwidth,
                            f"{name}_compile_s": variant["first_call_s"] - variant["median_s"],
                            f"{name}_kernels_per_step": kernels_per_step(text()),
                            f"{name}_over_default": variant_s / step_s})
            if args.matmuls_alone:
                row["matmuls_alone_ms_per_step"] = 1e3 * timings["matmuls_alone"]["median_s"] / args.new_tokens
                row["step_over_matmuls_alone"] = row["ms_per_step"] / row["matmuls_alone_ms_per_step"]
            if with_torch:
                torch_step_s = (timings["transformers"]["median_s"] - timings["transformers_prefill"]["median_s"]) / torch_new_tokens
                row["transformers_ms_per_step"] = 1e3 * torch_step_s
                row["speedup_vs_transformers"] = row["transformers_ms_per_step"] / row["ms_per_step"]
                if args.matmuls_alone:
                    row["transformers_over_matmuls_alone"] = row["transformers_ms_per_step"] / row["matmuls_alone_ms_per_step"]
                del torch_model, run_torch, prefill_torch
                _free_torch_memory()
            print(f"{shape} B={batch}: {row['ms_per_step']:.2f} ms/step ({row['spread']:.0%} spread), "
                  f"{row['gb_per_s']:.1f} GB/s = {row['roofline_fraction']:.0%} of {bandwidth:.0f} GB/s, "
                  f"{row['gflop_per_s']:.0f} GFLOP/s = {row['compute_fraction']:.0%} of {peak_gflops:.0f} "
                  f"({row['bound']}-bound), "
                  f"compile {row['compile_s']:.1f} s, {row['kernels_per_step']} kernels/step"
                  + "".join(f"; {name} {row[name + '_ms_per_step']:.2f} ms/step = {row[name + '_roofline_fraction']:.0%}, "
                            f"compile {row[name + '_compile_s']:.1f} s, {row[name + '_kernels_per_step']} kernels/step"
                            for name in variant_texts)
                  + (f"; matmuls alone {row['matmuls_alone_ms_per_step']:.2f} ms/step" if args.matmuls_alone else "")
                  + (f"; transformers {row['transformers_ms_per_step']:.2f} ms/step" if with_torch else ""),
                  flush=True)
            del contenders, variants, variant_texts  # frees the stacked copy of the weights
            rows.append(row)
            if args.json:  # written after every row: a run cut short keeps what it measured
                report({**header, "rows": rows}, "", args.json, quiet=True)
        del lm, params
    result = {**header, "rows": rows}
    table = ["| shape | batch | ms/step | GB/s | roofline | GFLOP/s | of compute peak | compile s | kernels/step "
             "| stacked ms/step | filled widths ms/step | matmuls alone ms/step | transformers ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = f"{r['transformers_ms_per_step']:.2f}" if "transformers_ms_per_step" in r else "—"
        alone = f"{r['matmuls_alone_ms_per_step']:.2f}" if "matmuls_alone_ms_per_step" in r else "—"
        stacked, filled = (f"{r[k]:.2f}" if k in r else "—" for k in ("stacked_ms_per_step", "filled_widths_ms_per_step"))
        table.append(f"| {r['shape']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['gb_per_s']:.1f} | "
                     f"{r['roofline_fraction']:.0%} | {r['gflop_per_s']:.0f} | {r['compute_fraction']:.0%} | "
                     f"{r['compile_s']:.1f} | {r['kernels_per_step']} | {stacked} | {filled} | {alone} | {hf} |")
    report(result, "\n".join(table), args.json)


if __name__ == "__main__":
    main()
