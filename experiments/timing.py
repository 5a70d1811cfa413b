"""Shared benchmark helpers: warm-up-excluded median timings and result reporting."""

from __future__ import annotations

import json
import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up (compilation) call.

    `fn` may return JAX arrays (waited for with `block_until_ready`) or anything else.
    """
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def report(result: dict, summary: str, json_path: str | None) -> None:
    """Prints the numbers and a one-line summary; writes them to `json_path` if given."""
    print(json.dumps(result, indent=2))
    print(summary)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
