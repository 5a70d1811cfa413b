"""Exceptions raised by jaxsample.

Every error names the file, key, tensor, shape or argument at fault, so a user sees what to
fix instead of a traceback from deep inside XLA.
"""


class JaxsampleError(Exception):
    """Base class of every jaxsample error."""


class ConfigError(JaxsampleError, ValueError):
    """A model configuration is malformed or uses a feature the port does not implement."""


class CheckpointError(JaxsampleError, ValueError):
    """A checkpoint file is missing, truncated, or holds missing/unexpected/mis-shaped tensors."""


class ModelNotFoundError(JaxsampleError, FileNotFoundError):
    """A model name or path does not resolve to a checkpoint on this machine."""


class ArgumentError(JaxsampleError, ValueError):
    """A function argument is out of its documented range."""


class InfeasibleError(ArgumentError):
    """A well-formed optimisation instance (e.g. a routing batch) that no solution satisfies."""


class DataError(JaxsampleError, ValueError):
    """A data file (tasks, benchmarks) is missing or malformed."""


class NumericalError(JaxsampleError, FloatingPointError):
    """A NaN (or another impossible value) appeared where the algorithm forbids it."""


class SandboxError(JaxsampleError, RuntimeError):
    """This machine cannot confine untrusted code well enough for what was asked (e.g. an
    unforgeable verdict); the message names the missing mechanisms."""


class VerificationError(JaxsampleError, AssertionError):
    """A `jaxsample.testing` check failed: a kernel does not leave its target invariant,
    samples lie too far from their law, an estimator is biased. The message names the worst
    state or value and the bound it broke."""
