"""Device meshes and shardings: data-parallel rows, tensor-parallel model, multi-host.

A mesh has two axes:

- `data`: the rows of a decode state (samples, MH chains, SMC particles). Row r's
  randomness comes from `fold_in(key, r)`, so splitting rows over devices changes no draw.
- `model`: tensor parallelism (Megatron layout). Query/key/value, gate and up projections
  are split along their output features (whole heads), the attention output and down
  projections along their input features, the embedding and LM head along the vocabulary,
  and the KV cache along its kv heads. A dimension the axis size does not divide is
  replicated instead (correct, only less parallel). With the model axis split, the decode
  step runs each MLP whole (no CPU column blocks, which would gather the split matrices).

Same key, same samples: with float32 weights, integer results on any mesh match one device's
and float results agree to float32 reassociation. The model axis splits the sums of the
attention-output and down projections; each device's partial sum stays float32 and is
rounded once after the all-reduce, as one device rounds its whole sum. In bf16 a
reassociated sum can still round to the neighbouring bf16 value, and the difference flows
on through the later layers, so logits can differ slightly and, rarely, a draw: on a tiny
random bf16 model (meshes 4x2, 2x4, 1x8), at most 3 of 3072 positions' logits differed, by
at most 1.25 bf16 ulps of their row's largest logit, and no token of 400 sampled 16-token rows
changed. A data axis alone changed nothing.

    mesh = js.parallel.make_mesh(data=4, model=2)
    result = js.generate(key, lm, prompt, 64, num_samples=32, mesh=mesh)

The samplers place the params with `shard_model` and any input committed to other devices
with `place_inputs` (a prompt cut from a result on another mesh), constrain their decode
state with `constrain_rows` inside the jitted program (GSPMD propagates the layout through
the loop) and return results replicated on every device, so every process of a multi-host
run can read them. Multi-host: call `initialize_distributed()` first in every process, then
build the mesh from the global device list (`make_mesh` does); each process runs the same
program.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsample.errors import ArgumentError
from jaxsample.models.decoder import DecodeStep
from jaxsample.rows import Shared, is_shared
from jaxsample.validation import check_int

DATA = "data"
MODEL = "model"

# Projections split along their output features (kernel [(L,) in, out], bias [(L,) out]) and
# along their input features (kernel [(L,) in, out]); L leads in stacked params only.
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A `(data, model)` mesh over `devices` (default: every device of every process).

    Args:
      data: size of the data axis (default: all devices left after `model`).
      model: size of the tensor-parallel axis, at most the number of devices.
      devices: distinct devices to use, in mesh order (default `jax.devices()`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ArgumentError("devices must list at least one device, got none")
    repeated = next((d for i, d in enumerate(devices) if d in devices[:i]), None)
    if repeated is not None:
        raise ArgumentError(f"devices must be distinct, got {repeated} twice")
    model = check_int("model", model, 1, len(devices))
    data = len(devices) // model if data is None else check_int("data", data, 1)
    if data * model > len(devices):
        raise ArgumentError(
            f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def parse_mesh(spec: str) -> tuple[int, int]:
    """Parses `"data=D,model=M"` (either part optional, default 1) into `(D, M)`."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(data|model)=([0-9]+)", part)
        if match is None or int(match.group(2)) < 1:
            raise ArgumentError(
                f"mesh spec {spec!r}: each part must be data=D or model=M with a positive integer, "
                f"got {part!r}"
            )
        if match.group(1) in sizes:
            raise ArgumentError(f"mesh spec {spec!r}: {match.group(1)} is given twice")
        sizes[match.group(1)] = int(match.group(2))
    return sizes.get(DATA, 1), sizes.get(MODEL, 1)


def _divisible(size: int, mesh: Mesh) -> bool:
    return size % mesh.shape[MODEL] == 0


def _param_spec(path, leaf, mesh: Mesh, config) -> P:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    shape = leaf.shape
    if "embed_tokens" in names and _divisible(shape[0], mesh):
        return P(MODEL, None)
    if "lm_head" in names and _divisible(shape[-1], mesh):
        return P(None, MODEL)
    heads = {"q_proj": config.num_attention_heads, "o_proj": config.num_attention_heads,
             "k_proj": config.num_key_value_heads, "v_proj": config.num_key_value_heads}
    for name in names:
        # Whole heads per device: splitting a head would need a reshard before attention.
        if name in heads and not _divisible(heads[name], mesh):
            return P()
        if name in _COLUMN_PARALLEL and _divisible(shape[-1], mesh):
            return P(*([None] * (len(shape) - 1)), MODEL)
        if name in _ROW_PARALLEL and names[-1] == "kernel" and _divisible(shape[-2], mesh):
            return P(*([None] * (len(shape) - 2)), MODEL, None)
    return P()


def param_shardings(mesh: Mesh, params: Any, config) -> Any:
    """`NamedSharding`s of a decoder params pytree (`jaxsample.models` layout, per-layer or
    stacked), tensor-parallel over the mesh's model axis; leaves it does not recognise (norms,
    adapters) are replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _param_spec(path, leaf, mesh, config)), params
    )


def shard_model(lm, mesh: Mesh | None):
    """`lm` with its params placed on `mesh` (a no-op without a mesh or params)."""
    if mesh is None or lm.params is None:
        return lm
    if lm.config is None:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), lm.params)
    else:
        shardings = param_shardings(mesh, lm.params, lm.config)
    lm = lm.replace(params=jax.device_put(lm.params, shardings))
    if mesh.shape[MODEL] > 1 and isinstance(lm.decode_fn, DecodeStep):
        # The CPU decode step's MLP blocks slice the intermediate features this axis splits,
        # for which GSPMD would gather whole matrices onto every device.
        lm = lm.replace(decode_fn=dataclasses.replace(lm.decode_fn, mlp_chunks=1))
    return lm


def place_inputs(tree: Any, mesh: Mesh | None) -> Any:
    """`tree` (a sampler's inputs) with each array committed off `mesh`, to another mesh or
    device (a prompt cut from an earlier result, a key folded with one), copied onto it,
    replicated: jit refuses one program's inputs on different devices. Arrays already on
    `mesh` (the params `shard_model` placed), uncommitted arrays and tracers are left as they
    are. Identity without a mesh."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, P())

    def place(x):
        elsewhere = (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed
                     and getattr(x.sharding, "mesh", None) != mesh)
        return jax.device_put(x, replicated) if elsewhere else x

    return jax.tree.map(place, tree)


def check_rows(mesh: Mesh | None, num_rows: int, what: str) -> None:
    """Raises `ArgumentError` unless the mesh's data axis divides the `num_rows` rows."""
    if mesh is not None and num_rows % mesh.shape[DATA]:
        raise ArgumentError(
            f"{what}={num_rows} must be a multiple of the mesh's data axis ({mesh.shape[DATA]} devices)"
        )


def _spec(leaf, mesh: Mesh, rows: str | None) -> P:
    # Rows (None: a Shared part, on every data device) and, for KV caches ([B, L, K, S, H]),
    # kv heads over the model axis.
    if leaf.ndim == 5 and _divisible(leaf.shape[2], mesh):
        return P(rows, None, MODEL, None, None)
    return P(rows) if leaf.ndim else P()


def constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Inside `jit`: lays out every row-leading leaf of `tree` (a decode state, SMC particles)
    along the data axis, KV caches' heads along the model axis; `Shared` parts (the prompt
    cache) are replicated over the data axis. Identity without a mesh."""
    if mesh is None:
        return tree

    def constrain(x, rows):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _spec(x, mesh, rows)))

    def place(node):
        if is_shared(node):
            return Shared(jax.tree.map(lambda x: constrain(x, None), node.value))
        return constrain(node, DATA)

    return jax.tree.map(place, tree, is_leaf=is_shared)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Inside `jit`: makes `tree`'s leaves replicated on every device (results that every
    process reads). Identity without a mesh."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def _environment_int(name: str, minimum: int) -> int | None:
    """The integer in environment variable `name` (`None` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ArgumentError(f"environment variable {name} must be an integer ≥ {minimum}, got {raw!r}")
    return value


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> None:
    """Joins this process to a multi-host JAX run (`jax.distributed.initialize`).

    Call it once per process, before anything touches a device. Arguments not given are read
    from the environment (`JAXSAMPLE_COORDINATOR` as host:port, `JAXSAMPLE_NUM_PROCESSES`,
    `JAXSAMPLE_PROCESS_ID`); left unset, JAX detects them itself on Cloud TPU pods, SLURM and
    Open MPI clusters. Afterwards `jax.devices()` lists every process's devices and
    `make_mesh()` spans them all.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXSAMPLE_COORDINATOR")
    if num_processes is None:
        num_processes = _environment_int("JAXSAMPLE_NUM_PROCESSES", 1)
    if process_id is None:
        process_id = _environment_int("JAXSAMPLE_PROCESS_ID", 0)
    if num_processes is not None and (process_id is None or not 0 <= process_id < num_processes):
        raise ArgumentError(
            f"process_id must lie in [0, {num_processes}) when num_processes is set, got {process_id!r} "
            "(JAXSAMPLE_PROCESS_ID / JAXSAMPLE_NUM_PROCESSES, or the arguments)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
