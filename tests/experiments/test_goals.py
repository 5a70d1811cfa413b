"""`experiments/goals.py` judges the JSON the benchmarks write (stored CPU results, relabelled)."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))
import goals  # noqa: E402


def test_each_goal_is_judged_from_what_the_benchmarks_wrote(tmp_path, capsys):
    shutil.copy(RESULTS / "check_device_cpu.json", tmp_path / "check_device.json")
    shutil.copy(RESULTS / "bench_power_smollm2_c16.json", tmp_path / "bench_power.json")
    shutil.copy(RESULTS / "bench_memory.json", tmp_path / "bench_memory.json")
    decode = json.loads((RESULTS / "bench_decode_smollm2_cpu_matmuls_alone.json").read_text())
    first, second = decode["rows"]
    decode["rows"] = [{**first, "shape": "qwen2.5-7b", "batch": 1, "roofline_fraction": 0.61},
                      {**second, "shape": "qwen2.5-1.5b", "batch": 1, "roofline_fraction": 0.39}]
    (tmp_path / "bench_decode.json").write_text(json.dumps({**decode, "layout": "per-layer"}))

    met = {goal: verdict for goal, _, verdict in goals.goal_rows(tmp_path)}
    assert met == {
        "correctness checks on the device pass": "yes",
        "decode qwen2.5-7b batch 1: ≥ 60% of the roofline": "yes",
        "decode qwen2.5-1.5b batch 1: ≥ 40% of the roofline": "no",
        "decode qwen2.5-1.5b batch 32: ≥ 50% of the roofline": "not measured",
        "decode qwen2.5-7b batch 32: ≥ 50% of the roofline": "not measured",
        "power MH: ≥ 50× the transformers loop": "no",  # 13.9× on the CPU
        "SMC peak memory tiny: ≤ 1.2× generated cache + one prompt cache": "no",  # 1.30×
        "SMC peak memory smollm2-135m: ≤ 1.2× generated cache + one prompt cache": "yes",
        "SMC peak memory qwen2.5-0.5b: ≤ 1.2× generated cache + one prompt cache": "yes",
        "SMC peak memory qwen2.5-1.5b: ≤ 1.2× generated cache + one prompt cache": "yes",
        "SMC peak memory qwen2.5-7b: ≤ 1.2× generated cache + one prompt cache": "yes",
    }
    goals.main([str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| goal | measured | met |", "|---|---|---|"] and len(table) == 2 + len(met)
    assert "| 61.0% (" in table[3] and "kernels/step, 1.8× transformers) | yes |" in table[3]


def test_an_empty_directory_reads_not_measured(tmp_path):
    verdicts = [verdict for _, _, verdict in goals.goal_rows(tmp_path)]
    assert verdicts and set(verdicts) == {"not measured"}


def test_a_failed_device_check_is_named(tmp_path):
    check = json.loads((RESULTS / "check_device_cpu.json").read_text())
    check["checks"]["smc_log_z_unbiased"]["passed"] = check["passed"] = False
    (tmp_path / "check_device.json").write_text(json.dumps(check))
    goal, measured, met = goals.goal_rows(tmp_path)[0]
    assert (measured, met) == ("4/5 passed (failed: smc_log_z_unbiased)", "no")


def test_the_power_row_says_when_the_reference_ran_fewer_chains(tmp_path):
    power = json.loads((RESULTS / "bench_power_smollm2_c16.json").read_text())
    (tmp_path / "bench_power.json").write_text(json.dumps(power))
    measured = {goal: m for goal, m, _ in goals.goal_rows(tmp_path)}["power MH: ≥ 50× the transformers loop"]
    assert measured.endswith("smollm2-135m-instruct, 16 chains)")
    (tmp_path / "bench_power.json").write_text(json.dumps({**power, "reference_chains": 2}))
    measured = {goal: m for goal, m, _ in goals.goal_rows(tmp_path)}["power MH: ≥ 50× the transformers loop"]
    assert measured.endswith("16 chains, the reference timed on 2)")


def test_decode_goals_take_per_layer_numbers_over_stacked_ones_from_any_decode_file(tmp_path):
    """JSON from before per-layer params were the default timed them as `unstacked_*` beside
    the stacked scan; a shape measured only stacked is judged on that and says so."""
    decode = json.loads((RESULTS / "bench_decode_smollm2_cpu_matmuls_alone.json").read_text())
    first, second = decode["rows"]
    stacked_only = {**decode, "rows": [{**first, "shape": "qwen2.5-7b", "batch": 1, "roofline_fraction": 0.3},
                                       {**second, "shape": "qwen2.5-1.5b", "batch": 1, "roofline_fraction": 0.41}]}
    with_per_layer = {**decode, "rows": [{**first, "shape": "qwen2.5-7b", "batch": 1, "roofline_fraction": 0.3,
                                          "unstacked_ms_per_step": first["ms_per_step"] / 2,
                                          "unstacked_roofline_fraction": 0.6, "unstacked_kernels_per_step": 7}]}
    (tmp_path / "bench_decode.json").write_text(json.dumps(stacked_only))
    (tmp_path / "bench_decode_layouts.json").write_text(json.dumps(with_per_layer))
    measured = {goal: (m, met) for goal, m, met in goals.goal_rows(tmp_path)}
    seven, met = measured["decode qwen2.5-7b batch 1: ≥ 60% of the roofline"]
    assert met == "yes" and seven.startswith(f"60.0% ({first['ms_per_step'] / 2:.2f} ms/step, ")
    assert "7 kernels/step" in seven and "stacked" not in seven
    assert f"{2 * first['gb_per_s']:.0f} GB/s" in seven
    one_and_a_half, met = measured["decode qwen2.5-1.5b batch 1: ≥ 40% of the roofline"]
    assert met == "yes" and one_and_a_half.startswith("41.0% (") and one_and_a_half.endswith("; stacked params)")


def test_the_power_goal_takes_the_per_layer_contender_of_json_written_when_load_gave_stacked_params(tmp_path):
    power = json.loads((RESULTS / "bench_power_smollm2_c16.json").read_text())
    power.update(unstacked_speedup=2 * power["speedup"], unstacked_tokens_per_s=2 * power["jax_tokens_per_s"])
    (tmp_path / "bench_power.json").write_text(json.dumps(power))
    measured = {goal: m for goal, m, _ in goals.goal_rows(tmp_path)}["power MH: ≥ 50× the transformers loop"]
    assert measured.startswith(f"{2 * power['speedup']:.1f}× ({2 * power['jax_tokens_per_s']:.0f} vs ")


def test_a_memory_peak_compiled_for_a_gpu_without_one_says_so(tmp_path):
    shutil.copy(RESULTS / "deviceless-h200" / "bench_memory.json", tmp_path / "bench_memory.json")
    rows = {goal: (measured, met) for goal, measured, met in goals.goal_rows(tmp_path)}
    measured, met = rows["SMC peak memory qwen2.5-0.5b: ≤ 1.2× generated cache + one prompt cache"]
    assert measured == "1.166× (compiled for an NVIDIA H200 on cpu:0, not run)" and met == "yes"
