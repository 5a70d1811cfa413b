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


def interleaved_seconds(fns: dict, repeats: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Times of each `fns[name]()` over `repeats` rounds, the contenders interleaved within
    each round (so a load change on the machine hits them alike), after one warm-up
    (compilation) call each. `clock` is wall time by default; `time.process_time` (CPU
    seconds of this process, all threads) is steadier on a machine shared with other jobs.
    Returns `{name: [seconds per round]}`."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            began = clock()
            jax.block_until_ready(fn())
            times[name].append(clock() - began)
    return times


def spread(times: list[float]) -> dict:
    """Median, quartiles and minimum of a list of timings (seconds)."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": min(times)}
