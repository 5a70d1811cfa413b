"""Every benchmark runs CPU-sized (`bench_gpu.sh` runs them GPU-sized) and writes the JSON
the README reads its numbers from; what they count is checked, not their speed."""

import argparse
import dataclasses
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxsample.models import make_language_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import bench_decode  # noqa: E402
import bench_draw  # noqa: E402
import bench_generate  # noqa: E402
import bench_layer_weights  # noqa: E402
import bench_memory  # noqa: E402
import bench_power  # noqa: E402
import bench_smc  # noqa: E402

QUICK = ["--samples", "1", "--min-sample-s", "0"]


def _run(main, tmp_path, *args):
    path = tmp_path / "result.json"
    main([*map(str, args), "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["memory_read_gbs"] > 0  # the machine's state, recorded with every result
    assert result["versions"]["jax"] == jax.__version__
    return result


def _timed(timings):
    assert timings["samples"] >= 1 and timings["median_s"] > 0 and timings["calls_per_sample"] >= 1


def test_bench_decode_reports_every_shape_and_batch_against_the_roofline(tmp_path):
    result = _run(bench_decode.main, tmp_path, "--shapes", "tiny", "--batches", "1,2", "--prompt-tokens", 8,
                  "--new-tokens", 8, "--transformers-batches", "1", "--transformers-new-tokens", 4, "--matmul-size", 256,
                  "--matmuls-alone", "--also-stacked", "--also-filled-widths", *QUICK)
    assert [(r["shape"], r["batch"]) for r in result["rows"]] == [("tiny", 1), ("tiny", 2)]
    for row in result["rows"]:
        _timed(row["timings"]["jax"])
        assert row["roofline_fraction"] == pytest.approx(row["gb_per_s"] / result["roofline_bandwidth_gbs"])
        assert row["gb_per_s"] == pytest.approx(row["bytes_per_step"] / row["ms_per_step"] / 1e6)
        # The tiny shape's matmuls from its config: q, k, v, o and the gated MLP per layer,
        # the tied logit matrix; attention over the prompt and half the new tokens.
        c = bench_decode.SHAPES["tiny"]
        d, f, heads, kv, h = (c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim"))
        layer = d * heads * h + 2 * d * kv * h + heads * h * d + 3 * d * f
        weights = c["num_hidden_layers"] * layer + c["vocab_size"] * d
        attention = 4 * c["num_hidden_layers"] * (8 + 8 / 2) * heads * h
        assert row["flops_per_step"] == pytest.approx(row["batch"] * (2 * weights + attention))
        assert row["compute_fraction"] == pytest.approx(row["gflop_per_s"] / result["compute_peak_gflops"])
        assert row["kernels_per_step"] >= c["num_hidden_layers"]  # the layer loop's body runs once per layer
        _timed(row["timings"]["matmuls_alone"])
        for variant in ("stacked", "filled_widths"):
            _timed(row["timings"][f"jax_{variant}"])
            assert row[f"{variant}_over_default"] == pytest.approx(row[f"{variant}_ms_per_step"] / row["ms_per_step"])
            assert row[f"{variant}_roofline_fraction"] == pytest.approx(row["roofline_fraction"] / row[f"{variant}_over_default"])
            assert row[f"{variant}_kernels_per_step"] >= c["num_hidden_layers"]
        assert row["step_over_matmuls_alone"] == pytest.approx(row["ms_per_step"] / row["matmuls_alone_ms_per_step"])
    assert result["roofline_bandwidth_gbs"] == result["memory_read_gbs"]  # no --bandwidth-gbs given
    assert "transformers" in result["rows"][0]["timings"] and "transformers" not in result["rows"][1]["timings"]
    first = result["rows"][0]
    torch_timings = first["timings"]
    assert result["transformers_new_tokens"] == 4  # transformers' step from its own, shorter calls
    assert first["transformers_ms_per_step"] == pytest.approx(
        1e3 * (torch_timings["transformers"]["median_s"] - torch_timings["transformers_prefill"]["median_s"]) / 4)
    assert first["transformers_over_matmuls_alone"] == pytest.approx(first["transformers_ms_per_step"] / first["matmuls_alone_ms_per_step"])


@pytest.mark.parametrize("tied", [True, False])
def test_bench_decode_matmuls_alone_do_the_steps_matmul_flops(tied):
    config = dataclasses.replace(bench_decode.model_config("tiny", 16), tie_word_embeddings=tied)
    params = bench_decode.random_params(config, jnp.float32)
    step = bench_decode.step_matmuls(make_language_model(config, params))
    for batch in (1, 3):
        cost = jax.jit(step).lower(jnp.ones((batch, config.hidden_size))).compile().cost_analysis()
        # Its tanh, silu and sums add well under 1% at this shape.
        assert cost["flops"] == pytest.approx(bench_decode.step_flops(config, params, batch, 0), rel=0.01)


@pytest.mark.parametrize("reference_chains", [2, 1])
def test_bench_power_counts_every_decoded_token_of_both_loops(tmp_path, reference_chains):
    chains, block, new, steps = 2, 4, 8, 1
    result = _run(bench_power.main, tmp_path, "--model", "random:tiny", "--chains", chains, "--block-size", block,
                  "--max-new-tokens", new, "--mcmc-steps", steps, "--reference-chains", reference_chains, "--stacked", *QUICK)
    assert (result["chains"], result["reference_chains"]) == (chains, reference_chains)
    caps = range(block, new + 1, block)
    for loop, timed_chains in (("jax", chains), ("transformers", reference_chains)):
        # Per chain: every block extended to its cap, plus each MH proposal from its cut i < cap to the cap.
        fewest, most = timed_chains * (new + steps * len(caps)), timed_chains * (new + steps * sum(caps))
        assert fewest <= result[f"{loop}_tokens_per_call"] <= most
        _timed(result["timings"][loop])
        rate = result[f"{loop}_tokens_per_call"] / result["timings"][loop]["median_s"]
        assert result[f"{loop}_tokens_per_s"] == pytest.approx(rate)
    assert result["speedup"] == pytest.approx(result["jax_tokens_per_s"] / result["transformers_tokens_per_s"])
    # The same chains on per-layer weight arrays decode the same tokens.
    _timed(result["timings"]["jax_stacked"])
    assert result["stacked_tokens_per_s"] == pytest.approx(result["jax_tokens_per_call"] / result["timings"]["jax_stacked"]["median_s"])
    assert result["stacked_speedup"] == pytest.approx(result["stacked_tokens_per_s"] / result["transformers_tokens_per_s"])


def test_bench_power_times_a_batch_of_prompts_against_one_prompt_after_another(tmp_path):
    result = _run(bench_power.main, tmp_path, "--model", "random:tiny", "--prompts", 2, "--chains", 2, "--block-size", 4,
                  "--max-new-tokens", 4, "--mcmc-steps", 1, *QUICK)
    assert result["prompts"] == 2
    # Per chain of either prompt: the block, then one proposal from its cut to the cap.
    assert 2 * 2 * (4 + 1) <= result["jax_tokens_per_call"] <= 2 * 2 * (4 + 4)
    _timed(result["timings"]["jax_per_prompt"])
    assert result["per_prompt_tokens_per_s"] == pytest.approx(result["jax_tokens_per_call"] / result["timings"]["jax_per_prompt"]["median_s"])
    assert result["batch_gain"] == pytest.approx(result["jax_tokens_per_s"] / result["per_prompt_tokens_per_s"])


def _open_loop(body):
    """HLO of `body` in a loop whose trip count the compiler cannot know (like a decode loop)."""
    loop = lambda x, stop: jax.lax.while_loop(lambda c: c[1] < stop, lambda c: (body(c[0]), c[1] + 1), (x, 0))[0]  # noqa: E731
    return jax.jit(loop).lower(jnp.ones((4, 4)), 3).compile().as_text()


def _sorts(x, count):
    for _ in range(count):  # each step reads the last one's output, so none merge
        x = jnp.sort(x * 1.5, axis=0)
    return x


@pytest.mark.parametrize("layers", [3, 5])
def test_kernels_per_step_counts_a_nested_loop_per_trip_and_the_costliest_branch(layers):
    def kernels(in_body, in_cheap_branch, in_costly_branch):
        def layer(x, i):
            x = _sorts(x, in_body)
            branches = [lambda y: _sorts(y, in_cheap_branch), lambda y: _sorts(y, in_costly_branch)]
            return jax.lax.switch(i % 2, branches, x), None

        return bench_decode.kernels_per_step(_open_loop(lambda x: jax.lax.scan(layer, x, jnp.arange(layers))[0]))

    base = kernels(1, 1, 2)
    per_trip, remainder = divmod(kernels(2, 1, 2) - base, layers)  # one more sort step in the layer body
    assert per_trip >= 1 and remainder == 0  # counted once per trip (a sort step is 1 or 2 kernels)
    costlier = kernels(1, 1, 3)
    assert costlier - base == layers * per_trip  # one more in the costlier branch: once per trip
    assert kernels(1, 2, 3) == costlier  # one more in the cheaper branch: not counted


def test_kernels_per_step_needs_an_open_ended_loop():
    fixed = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: _sorts(y, 1), x)).lower(jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="no loop of unknown trip count"):
        bench_decode.kernels_per_step(fixed.compile().as_text())


@pytest.mark.parametrize("bench", [bench_memory, bench_decode], ids=["bench_memory", "bench_decode"])
def test_a_missing_gpu_target_is_named(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--gpu-target", str(tmp_path / "h300.txtpb")])
    assert "--gpu-target: no file" in capsys.readouterr().err


def test_bench_memory_rows_hold_no_copy_of_the_prompt_cache(tmp_path):
    rows, prompt, new = 64, 256, 64
    result = _run(bench_memory.main, tmp_path, "--shapes", "tiny", "--particles", rows, "--prompt-tokens", prompt,
                  "--new-tokens", new, "--block-size", 32, "--prompts", 4)
    shape = result["shapes"]["tiny"]
    assert shape["generated_cache_bytes"] == rows * new * shape["kv_bytes_per_token"]
    assert shape["per_row_full_cache_bytes"] == rows * (prompt + new) * shape["kv_bytes_per_token"]
    # Rows that each held the prompt's cache would need `per_row_full` for the SMC rows alone
    # (5x the generated part here), twice that for MH's current chains and proposals.
    smc, power = shape["programs"]["smc_decode"], shape["programs"]["power_sample"]
    assert smc["peak_without_weights"] < 0.5 * shape["per_row_full_cache_bytes"]
    assert power["peak_without_weights"] < 0.5 * 2 * shape["per_row_full_cache_bytes"]
    base = shape["generated_cache_bytes"] + shape["one_prompt_cache_bytes"]
    assert smc["ratio_to_goal_base"] == pytest.approx(smc["peak_without_weights"] / base)
    # 4 prompts with 16 particles or chains each hold 4 prompt caches, not one per row (63 more here).
    for name, one in (("smc_decode", smc), ("power_sample", power)):
        batch = shape["programs"][f"{name}_4_prompts"]
        extra = batch["peak_without_weights"] - one["peak_without_weights"]
        assert 3 * shape["one_prompt_cache_bytes"] <= extra < 0.25 * (rows - 4) * shape["one_prompt_cache_bytes"], name
        assert batch["ratio_to_goal_base"] == pytest.approx(
            batch["peak_without_weights"] / (base + 3 * shape["one_prompt_cache_bytes"]))
    # What fills the peak, from XLA's buffer assignment: the rows' generated-part K and V
    # caches ([rows, layers, kv heads, slots, head dim]; slots: the new tokens + 1) are among
    # each program's largest buffers, largest first.
    c = bench_decode.SHAPES["tiny"]
    cache = f"f32[{rows},{c['num_hidden_layers']},{c['num_key_value_heads']},{new + 1},{c['head_dim']}]"
    for program in (smc, power):
        buffers = program["largest_buffers"]
        assert len(buffers) == 8 and [b["bytes"] for b in buffers] == sorted((b["bytes"] for b in buffers), reverse=True)
        assert any(cache in b["shapes"] and b["bytes"] == shape["generated_cache_bytes"] // 2 * (new + 1) // new
                   for b in buffers), buffers


def test_bench_smc_and_bench_generate_report_their_ratios(tmp_path):
    smc = _run(bench_smc.main, tmp_path, "--particles", 4, "--new-tokens", 8, "--block-size", 4, "--prompts", 2, *QUICK)
    for name in ("plain", "smc_ess_half", "smc_always", "smc_batch", "smc_per_prompt"):
        _timed(smc["timings"][name])
    assert smc["cost_ratio_ess_half"] == pytest.approx(smc["plain_tokens_per_s"] / smc["smc_ess_half_tokens_per_s"])
    assert smc["batch_gain"] == pytest.approx(smc["batch_tokens_per_s"] / smc["per_prompt_tokens_per_s"])
    assert smc["batch_tokens_per_s"] == pytest.approx(2 * 4 * 8 / smc["timings"]["smc_batch"]["median_s"])
    generate = _run(bench_generate.main, tmp_path, "--model", "toy-decisions", "--batch", 2, "--new-tokens", 8,
                    "--stacked", *QUICK)
    for name in ("plain", "stacked", "transformers"):
        _timed(generate["timings"][name])
    assert generate["speedup"] == pytest.approx(generate["jax_tokens_per_s"] / generate["transformers_tokens_per_s"])
    timings = generate["timings"]
    assert generate["stacked_speedup"] == pytest.approx(timings["transformers"]["median_s"] / timings["stacked"]["median_s"])
    assert generate["stacked_ratio_to_plain"] == pytest.approx(timings["stacked"]["median_s"] / timings["plain"]["median_s"])


def test_bench_layer_weights_times_the_four_layouts_over_the_same_bytes(tmp_path):
    result = _run(bench_layer_weights.main, tmp_path, "--layers", 3, "--hidden", 16, "--intermediate", 32,
                  "--batches", "1,2", "--steps", 2, "--blocks", 4, *QUICK)
    assert result["weight_bytes"] == 3 * 3 * 16 * 32 * 4
    assert result["blocks"] == 4
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["stacked_over_blocks"] == pytest.approx(row["ms_per_pass"]["stacked"] / row["ms_per_pass"]["blocks"])
        for layout in ("stacked", "separate", "unrolled", "blocks"):
            _timed(row["timings"][layout])
            assert row["ms_per_pass"][layout] == pytest.approx(1e3 * row["timings"][layout]["median_s"] / 2)
        assert row["max_abs_difference"] < 1e-4  # the same function, float32
        assert row["stacked_over_separate"] == pytest.approx(row["ms_per_pass"]["stacked"] / row["ms_per_pass"]["separate"])
        assert row["unrolled_over_separate"] == pytest.approx(row["ms_per_pass"]["unrolled"] / row["ms_per_pass"]["separate"])


def test_bench_draw_times_both_token_draws_per_vocabulary_and_batch(tmp_path):
    result = _run(bench_draw.main, tmp_path, "--vocab", "37,300", "--batches", "1,3", "--steps", 2, *QUICK)
    assert [(row["vocab"], row["batch"]) for row in result["rows"]] == [(37, 1), (37, 3), (300, 1), (300, 3)]
    for row in result["rows"]:
        for name in ("categorical", "gumbel_whole_vocabulary", "draw_tokens"):
            _timed(row["timings"][name])
            assert row["ms_per_draw"][name] == pytest.approx(1e3 * row["timings"][name]["median_s"] / 2)
        assert row["whole_vocabulary_over_categorical"] == pytest.approx(
            row["ms_per_draw"]["gumbel_whole_vocabulary"] / row["ms_per_draw"]["categorical"])


@pytest.mark.parametrize("main, args, message", [
    (bench_draw.main, ["--samples", "0"], "argument --samples: must be an integer ≥ 1, got '0'"),
    (bench_draw.main, ["--batches", "1,0"], "argument --batches: must be comma-separated integers ≥ 1, got '1,0'"),
    (bench_draw.main, ["--vocab", "x"], "argument --vocab: must be comma-separated integers ≥ 1, got 'x'"),
    (bench_draw.main, ["--steps", "0"], "argument --steps: must be an integer ≥ 1, got '0'"),
    (bench_decode.main, ["--new-tokens", "0"], "argument --new-tokens: must be an integer ≥ 1, got '0'"),
    (bench_decode.main, ["--shapes", "tiny,huge"], "--shapes: unknown shape(s) huge"),
    (bench_decode.main, ["--batches", "1,8", "--transformers-batches", "16"],
     "--transformers-batches: 16 not in --batches 1,8; give 'all', 'none' or a subset of --batches"),
    (bench_decode.main, ["--shapes", "tiny", "--transformers-shapes", "smollm2-135m"],
     "--transformers-shapes: smollm2-135m not in --shapes tiny"),
])
def test_benchmark_arguments_are_checked_before_any_timing(main, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


class _Parsed(Exception):
    pass


def _gpu_steps():
    """`(name, limit_s, script, args)` of each `step` in bench_gpu.sh, shell variables expanded."""
    text = (ROOT / "experiments" / "bench_gpu.sh").read_text().replace("\\\n", " ")
    variables = {"B": "experiments", "OUT": "OUT", "XLA_FLAGS:-": ""}
    variables.update(re.findall(r'^([A-Z]+)="([^"]*)"$', text, re.MULTILINE))
    steps = []
    for line in re.findall(r"^step (.*)$", text, re.MULTILINE):
        words = shlex.split(re.sub(r"\$\{?([A-Z_:-]+)\}?", lambda m: variables[m.group(1)], line))
        name, limit, *command = words
        command = command[command.index("python"):]
        steps.append((name, int(limit), Path(command[1]).stem, command[2:]))
    return steps


def test_bench_gpu_steps_parse_their_arguments_and_fit_in_8_minutes(monkeypatch):
    # A GPU session has minutes of device time: an option renamed since the script was
    # written would cost a step. Each step's arguments go through its script's own parser.
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    steps = _gpu_steps()
    assert [name for name, *_ in steps][:2] == ["check_device", "bench_decode"]
    for name, _, script, args in steps:
        with pytest.raises(_Parsed):
            importlib.import_module(script).main(args)
        shapes = [shape for option, value in zip(args, args[1:]) if option in ("--shapes", "--model")
                  for shape in value.removeprefix("random:").split(",")]
        assert set(shapes) <= set(bench_decode.SHAPES), name
    assert sum(limit for _, limit, *_ in steps) <= 8 * 60


def test_bench_gpu_refuses_a_step_it_does_not_have(tmp_path):
    # A rerun names the steps it wants; a misspelt one must fail before any device work.
    result = subprocess.run(["bash", str(ROOT / "experiments" / "bench_gpu.sh"), str(tmp_path), "bench_power", "bench_powr"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    names = " ".join(name for name, *_ in _gpu_steps())
    assert result.stderr.strip() == f"bench_gpu.sh: no step named 'bench_powr'; the steps are: {names}"
    assert not any(tmp_path.iterdir())
