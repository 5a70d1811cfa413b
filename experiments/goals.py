"""Issue 11's accelerator goals against the JSON that `bench_gpu.sh` wrote, as a Markdown table.

Reads `check_device.json`, every `bench_decode*.json`, `bench_power.json` and
`bench_memory.json` from a results directory (runs on any machine, after the device run) and
prints one row per goal: the goal, what was measured, and whether it is met. A file or row the
run did not produce reads "not measured". Decode goals are judged on the per-layer params
`load` gives; a shape and batch measured only on stacked params (JSON written before they
became the default) is judged on those, and says so.

    python experiments/goals.py experiments/results/gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (shape, batch): the least fraction of the memory roofline (weights + filled KV slots).
DECODE_ROOFLINE = {("qwen2.5-7b", 1): 0.60, ("qwen2.5-1.5b", 1): 0.40,
                   ("qwen2.5-1.5b", 32): 0.50, ("qwen2.5-7b", 32): 0.50}
POWER_SPEEDUP = 50.0  # js.power_sample over the transformers re-implementation of the loop
MEMORY_RATIO = 1.2  # SMC peak over (generated-part cache + one prompt cache)


def _load(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _decode_rows(directory: Path) -> dict[tuple[str, int], dict]:
    """(shape, batch) -> that row's numbers on per-layer params where some file measured them,
    else on stacked params, with "layout" saying which. JSON without a "layout" field timed
    stacked params as its main contender, and per-layer ones as `unstacked_*`."""
    found: dict[tuple[str, int], dict] = {}
    for path in sorted(directory.glob("bench_decode*.json")):
        result = json.loads(path.read_text())
        for row in result.get("rows", []):
            key = (row["shape"], row["batch"])
            if result.get("layout") == "per-layer":
                numbers = {**row, "layout": "per-layer"}
            elif "unstacked_ms_per_step" in row:
                step_s = row["unstacked_ms_per_step"] / 1e3
                numbers = {"layout": "per-layer", "ms_per_step": row["unstacked_ms_per_step"],
                           "roofline_fraction": row["unstacked_roofline_fraction"],
                           "gb_per_s": row["bytes_per_step"] / step_s / 1e9,
                           "kernels_per_step": row["unstacked_kernels_per_step"]}
                if "transformers_ms_per_step" in row:
                    numbers["speedup_vs_transformers"] = row["transformers_ms_per_step"] / row["unstacked_ms_per_step"]
            else:
                numbers = {**row, "layout": "stacked"}
            if key not in found or found[key]["layout"] == "stacked":
                found[key] = numbers
    return found


def goal_rows(directory: Path) -> list[tuple[str, str, str]]:
    """`(goal, measured, met)` per goal; met is "yes", "no" or "not measured"."""
    rows = []
    check = _load(directory, "check_device")
    if check is None:
        rows.append(("correctness checks on the device pass", "—", "not measured"))
    else:
        failed = [name for name, c in check["checks"].items() if not c["passed"]]
        measured = f"{len(check['checks']) - len(failed)}/{len(check['checks'])} passed"
        measured += f" (failed: {', '.join(failed)})" if failed else ""
        rows.append(("correctness checks on the device pass", measured, "yes" if check["passed"] else "no"))

    decode_rows = _decode_rows(directory)
    for (shape, batch), least in DECODE_ROOFLINE.items():
        goal = f"decode {shape} batch {batch}: ≥ {least:.0%} of the roofline"
        row = decode_rows.get((shape, batch))
        if row is None:
            rows.append((goal, "—", "not measured"))
        else:
            measured = (f"{row['roofline_fraction']:.1%} ({row['ms_per_step']:.2f} ms/step, "
                        f"{row['gb_per_s']:.0f} GB/s, {row['kernels_per_step']} kernels/step")
            if row.get("speedup_vs_transformers"):
                measured += f", {row['speedup_vs_transformers']:.1f}× transformers"
            measured += "; stacked params)" if row["layout"] == "stacked" else ")"
            rows.append((goal, measured, "yes" if row["roofline_fraction"] >= least else "no"))

    power = _load(directory, "bench_power")
    goal = f"power MH: ≥ {POWER_SPEEDUP:.0f}× the transformers loop"
    if power is None:
        rows.append((goal, "—", "not measured"))
    else:
        if "unstacked_speedup" in power:  # written when `load` gave stacked params: per-layer ones were the extra contender
            power = {**power, "speedup": power["unstacked_speedup"], "jax_tokens_per_s": power["unstacked_tokens_per_s"]}
        measured = (f"{power['speedup']:.1f}× ({power['jax_tokens_per_s']:.0f} vs "
                    f"{power['transformers_tokens_per_s']:.0f} tokens/s, {power['model']}, {power['chains']} chains")
        if power.get("reference_chains", power["chains"]) < power["chains"]:
            measured += f", the reference timed on {power['reference_chains']}"
        measured += ")"
        rows.append((goal, measured, "yes" if power["speedup"] >= POWER_SPEEDUP else "no"))

    memory = _load(directory, "bench_memory")
    for shape, values in (memory or {}).get("shapes", {}).items():
        ratio = values["programs"]["smc_decode"]["ratio_to_goal_base"]
        measured = f"{ratio:.3f}×"
        if "compiled_for" in memory:
            measured += f" (compiled for an {memory['compiled_for']} on {memory['device']}, not run)"
        rows.append((f"SMC peak memory {shape}: ≤ {MEMORY_RATIO}× generated cache + one prompt cache",
                     measured, "yes" if ratio <= MEMORY_RATIO else "no"))
    if memory is None:
        rows.append((f"SMC peak memory: ≤ {MEMORY_RATIO}× generated cache + one prompt cache", "—", "not measured"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where bench_gpu.sh wrote its JSON")
    args = parser.parse_args(argv)
    lines = ["| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {met} |" for goal, measured, met in goal_rows(args.directory)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
