"""Progress bars for long jitted loops.

A jitted sampler is one XLA program, so no Python loop is there to report progress. Inside
the program, `report(done)` sends the count of finished units to the host with
`jax.debug.callback`; around the call, `progress_bar(total, desc)` shows it with tqdm.
Samplers emit the callbacks only when called with `progress=True` (a static argument), so
quiet runs compile without them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
from tqdm.auto import tqdm

_OPEN_BARS: list = []


def _advance(done) -> None:
    # Callbacks may arrive out of order: move to the largest count seen, never back.
    if _OPEN_BARS:
        bar = _OPEN_BARS[-1]
        bar.update(max(0, int(done) - bar.n))


def report(done: jax.Array) -> None:
    """From inside a jitted loop: `done` units (an int32 scalar) are finished."""
    jax.debug.callback(_advance, done)


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[None]:
    """Shows the counts `report` sends while the block runs; completes the bar at the end."""
    bar = tqdm(total=total, desc=desc)
    _OPEN_BARS.append(bar)
    try:
        yield
        jax.effects_barrier()  # every callback of the finished program has run
        bar.update(total - bar.n)
    finally:
        _OPEN_BARS.remove(bar)
        bar.close()
