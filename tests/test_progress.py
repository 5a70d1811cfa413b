"""`progress=True` shows how far a jitted sampler has got, without changing its result."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxsample as js
from jaxsample import progress

from test_generate import EOS, VOCAB, _logits_fn


class RecordingBar:
    """Stands in for tqdm: records every position the bar reaches."""

    opened = []

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.positions = total, desc, 0, []
        RecordingBar.opened.append(self)

    def update(self, amount):
        self.n += amount
        self.positions.append(self.n)

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.opened = []
    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    return RecordingBar.opened


@pytest.fixture(scope="module")
def lm():
    return js.LanguageModel.from_logits_fn(_logits_fn, VOCAB, EOS, max_length=24)


PROMPT = jnp.array([1, 2, 3])


def test_power_sample_reports_every_mh_step(lm, bars):
    kwargs = dict(alpha=2.0, num_chains=3, block_size=3, num_mcmc_steps=4, max_new_tokens=6,
                  freeze_finished=False)
    quiet = js.power_sample(jax.random.key(0), lm, PROMPT, **kwargs)
    shown = js.power_sample(jax.random.key(0), lm, PROMPT, progress=True, **kwargs)
    chex.assert_trees_all_equal(quiet, shown)
    (bar,) = bars
    assert bar.total == 2 * 4 and bar.n == bar.total
    # Reported from inside the program, step by step (not only the final completion).
    assert len(bar.positions) > 2 and bar.positions == sorted(bar.positions)


def test_smc_decode_reports_blocks(lm, bars):
    kwargs = dict(num_particles=4, max_new_tokens=8, alpha=2.0, block_size=2)
    quiet = js.smc_decode(jax.random.key(1), lm, PROMPT, **kwargs)
    shown = js.smc_decode(jax.random.key(1), lm, PROMPT, progress=True, **kwargs)
    chex.assert_trees_all_equal(quiet, shown)
    (bar,) = bars
    assert bar.total == 4 and bar.n == 4
