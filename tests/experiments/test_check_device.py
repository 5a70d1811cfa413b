"""`experiments/check_device.py` (the correctness step of `bench_gpu.sh`) on the CPU."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import check_device  # noqa: E402


def test_every_check_passes_on_the_cpu_and_reports_its_numbers(tmp_path):
    path = tmp_path / "check_device.json"
    assert check_device.main(["--chains", "4096", "--runs", "400", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    checks = result["checks"]
    assert result["passed"] and all(check["passed"] for check in checks.values())
    assert sorted(checks) == ["decode_qwen2_untied_gqa", "parity_llama3_head_dim", "parity_qwen2_untied_gqa",
                              "power_mh_vs_enumeration", "smc_log_z_unbiased"]
    for name in ("parity_llama3_head_dim", "parity_qwen2_untied_gqa"):
        assert checks[name]["max_abs_log_p_error_highest"] <= check_device.PARITY_ATOL
        assert checks[name]["log_p_std"] > 1.0
        # bf16 weights and activations move log p by far more than the f32 tolerance.
        assert checks[name]["max_abs_log_p_error_bfloat16"] > 10 * check_device.PARITY_ATOL
    assert checks["decode_qwen2_untied_gqa"]["greedy_mismatches"] == []
    power = checks["power_mh_vs_enumeration"]
    assert power["num_chains"] == 4096 and 0 < power["tv"] <= power["bound"]
    smc = checks["smc_log_z_unbiased"]
    assert smc["num_runs"] == 400 and abs(smc["z"]) <= 4.0 and smc["standard_error"] > 0


def test_a_check_that_crashes_fails_the_run_and_keeps_the_others(tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("backend fault")

    passing = {"passed": True}
    monkeypatch.setattr(check_device, "_checkpoints", lambda directory: {"qwen2_untied_gqa": directory})
    monkeypatch.setattr(check_device, "REFERENCE_CHECKS", {
        "parity_qwen2_untied_gqa": (lambda path: dict(passing), "qwen2_untied_gqa"),
        "decode_qwen2_untied_gqa": (crash, "qwen2_untied_gqa"),
    })
    monkeypatch.setattr(check_device, "check_power_mh", lambda chains: dict(passing))
    monkeypatch.setattr(check_device, "check_smc", lambda runs: {"passed": False, "z": 5.0})
    path = tmp_path / "check_device.json"
    assert check_device.main(["--json", str(path)]) == 1
    checks = json.loads(path.read_text())["checks"]
    assert "RuntimeError: backend fault" in checks["decode_qwen2_untied_gqa"]["error"]
    assert [name for name, check in checks.items() if check["passed"]] == [
        "parity_qwen2_untied_gqa", "power_mh_vs_enumeration"]


def test_without_torch_the_reference_checks_are_listed_as_skipped(tmp_path, monkeypatch):
    find_spec = check_device.importlib.util.find_spec
    monkeypatch.setattr(check_device.importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    monkeypatch.setattr(check_device, "check_power_mh", lambda chains: {"passed": True})
    monkeypatch.setattr(check_device, "check_smc", lambda runs: {"passed": True})
    path = tmp_path / "check_device.json"
    assert check_device.main(["--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert sorted(result["checks"]) == ["power_mh_vs_enumeration", "smc_log_z_unbiased"]
    assert result["skipped"] == ["parity_qwen2_untied_gqa", "parity_llama3_head_dim", "decode_qwen2_untied_gqa"]
