"""Fixtures shared across test directories."""

import os
import shutil
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
    _compile_without_llvm_optimizations()
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="jaxsample-tests-compilation-cache-")
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def _compile_without_llvm_optimizations():
    """XLA:CPU's LLVM backend at -O0 for the whole run (workers and subprocesses inherit it).

    Most tests run toy models, whose time is compilation: -O0 halves it, and the suite took
    672 s against 1077 s at the default level on 2 cores (the tests that run real-size
    matmuls call library kernels and take as long). The HLO programs and their memory plans
    are the same; generated tokens were identical and floats differed by at most a few ulps
    (no FMA contraction at -O0). A level the user sets in XLA_FLAGS is kept.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


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
