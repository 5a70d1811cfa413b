"""Shared benchmark helpers: interleaved, warm-up-excluded timings with their spread.

Contenders are timed in rounds: each round runs every contender once, in an order rotated
per round, so a slow phase of a shared machine hits all of them alike. One sample is
`calls` back-to-back calls, with `calls` chosen so that a sample lasts at least
`min_sample_s` (short calls are dominated by timer and dispatch noise). Reported: the
median seconds per call over the samples and the spread (max − min) / median.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def _timed(fn: Callable, calls: int, clock: Callable = time.perf_counter) -> float:
    began = clock()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (clock() - began) / calls


def positive_int(text: str) -> int:
    """argparse `type`: an integer ≥ 1 (argparse names the flag in the error)."""
    if not _is_positive_int(text):
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}")
    return int(text)


def existing_file(text: str) -> str:
    """argparse `type`: the path of a file that exists."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    return text


def positive_ints(text: str) -> list[int]:
    """argparse `type`: comma-separated integers ≥ 1, as a list."""
    if not all(_is_positive_int(item) for item in text.split(",")):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers ≥ 1, got {text!r}")
    return [int(item) for item in text.split(",")]


def _is_positive_int(text: str) -> bool:
    try:
        return int(text) >= 1
    except ValueError:
        return False


def add_timing_options(parser: argparse.ArgumentParser, samples: int, min_sample_s: float) -> None:
    """`--samples` and `--min-sample-s`, the arguments of `interleaved_timings`, with these defaults."""
    parser.add_argument("--samples", type=positive_int, default=samples,
                        help="timed samples per contender (interleaved); the median is reported")
    parser.add_argument("--min-sample-s", type=float, default=min_sample_s,
                        help="minimum seconds per sample (calls are repeated to fill it)")


def interleaved_timings(
    contenders: dict[str, Callable], samples: int = 5, min_sample_s: float = 1.0, clock: Callable = time.perf_counter
) -> dict[str, dict]:
    """Seconds per call of each contender.

    Args:
      contenders: name -> zero-argument function; its result (JAX arrays or anything) is
        waited for with `block_until_ready`.
      samples: timed samples per contender (rounds).
      min_sample_s: minimum duration of one sample; calls are repeated to reach it (≤ 0: one
        call per sample, without the calibration call; for contenders that take seconds).
      clock: wall time by default; `time.process_time` (CPU seconds of this process, all
        threads) is steadier on a machine shared with other jobs.

    Returns:
      name -> {"median_s", "min_s", "max_s", "spread", "samples", "calls_per_sample",
      "first_call_s"} where `first_call_s` is the warm-up call (compilation included).
    """
    stats = {}
    for name, fn in contenders.items():
        began = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - began
        calls = max(1, math.ceil(min_sample_s / _timed(fn, 1))) if min_sample_s > 0 else 1
        stats[name] = {"first_call_s": first, "calls_per_sample": calls, "times": []}
    names = list(contenders)
    for round_index in range(samples):
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            stats[name]["times"].append(_timed(contenders[name], stats[name]["calls_per_sample"], clock))
    result = {}
    for name, s in stats.items():
        times = s.pop("times")
        median = statistics.median(times)
        result[name] = {**s, "median_s": median, "min_s": min(times), "max_s": max(times),
                        "spread": (max(times) - min(times)) / median, "samples": len(times)}
    return result


def memory_read_gbs(megabytes: int = 512) -> float:
    """Read bandwidth of this device: a jitted sum over a `megabytes` float32 array."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    timings = interleaved_timings({"sum": lambda: total(x)}, samples=5, min_sample_s=0.2)
    return x.nbytes / timings["sum"]["median_s"] / 1e9


def matmul_gflops(dtype, size: int) -> float:
    """Compute peak of this device: a jitted `[size, size] @ [size, size]` matmul in `dtype`."""
    x = jnp.ones((size, size), dtype)
    product = jax.jit(lambda a: a @ a)
    timings = interleaved_timings({"matmul": lambda: product(x)}, samples=5, min_sample_s=0.5)
    return 2 * size**3 / timings["matmul"]["median_s"] / 1e9


def machine() -> dict:
    """What the numbers were measured on: JAX device, CPU count, the versions of Python and
    of the packages that compile and compare, and, when called, the 1-minute load average and
    the memory read bandwidth (a shared or virtual machine's varies by 2-3x between hours,
    and memory-bound timings with it)."""
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": str(jax.devices()[0]), "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "versions": versions,
            "load_average_1min": os.getloadavg()[0], "memory_read_gbs": memory_read_gbs()}


def report(result: dict, summary: str, json_path: str | None, quiet: bool = False) -> None:
    """Prints the numbers and a summary (unless `quiet`); writes them to `json_path` if given."""
    if not quiet:
        print(json.dumps(result, indent=2))
        print(summary)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
