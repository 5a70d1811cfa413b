"""Fixtures shared across test directories."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # Under `pytest -n N` every worker is a JAX process; on a GPU the first would otherwise
    # preallocate 75% of the device memory and leave the others too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_configure(config):
    """One persistent compilation cache for the whole run, new and empty at its start.

    The suite compiles the same programs many times: in both xdist workers, in every
    subprocess a CLI, notebook or multi-process test starts, and again in each module after
    `_release_compiled_programs`. A cache shared through the environment (which workers and
    subprocesses inherit; set before any test module imports jax) compiles each once.
    """
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    _compile_faster()
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="jaxsample-tests-compilation-cache-")
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


# Flags a user sets in XLA_FLAGS are kept; these are added for the whole run (workers and
# subprocesses inherit them).
_FAST_COMPILE_FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
}


def _compile_faster():
    """XLA:CPU flags that cut compile time, for the whole run.

    Most tests run toy models, whose time is compilation.
    - LLVM at -O0: the suite took 672 s against 1077 s at the default level on 2 cores. The
      HLO programs and their memory plans are the same; generated tokens were identical and
      floats differed by at most a few ulps (no FMA contraction at -O0).
    - Fusions through XLA's elemental IR emitters instead of its fusion emitters: the backend
      compile of `power_sample` and `smc_decode` on a tiny transformer took 2.6 s against
      5.6 s, and the suite 637 s against 872 s (2026-12-05). One exact comparison of two
      different programs' floats then differed by 2 ulps (power_sample against its lockstep
      loop, which now compares floats to 1e-6).
    The tests that run real-size matmuls call library kernels and take as long.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"{flag}={value}" for flag, value in _FAST_COMPILE_FLAGS.items() if flag not in flags]
    if added and not _xla_accepts(added):
        added = [flag for flag in added if _xla_accepts([flag])]
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def _xla_accepts(flags: list[str]) -> bool:
    """Whether this jaxlib's XLA knows every one of `flags`: an unknown flag in XLA_FLAGS
    aborts the process (jaxlib 0.11 dropped --xla_cpu_use_fusion_emitters). One probe for
    all of them, as this jaxlib knows them all in the common case."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
                           env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}, timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32) as a `LanguageModel`, loaded once."""
    from jaxsample import models

    return models.load("smollm2-135m-instruct")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every module's compiled XLA programs when the module ends.

    The suite compiles thousands of programs in one process; XLA:CPU maps each one's code in
    several memory mappings, and kept alive they approach the kernel's 65,530-mapping limit
    (vm.max_map_count), where the next compilation segfaults.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
