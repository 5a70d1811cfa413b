"""Meshes: the same keys give the same samples on one device, on 8 simulated CPU devices
(data x model mesh) and on 2 localhost processes x 4 devices (JAX's distributed runtime with
gloo CPU collectives).

Integer results (tokens, lengths, cuts, acceptances, ancestors) must match exactly. Float
results may differ by float32 reassociation only: a different per-device batch picks a
different matmul blocking, and the model axis splits the attention-output and down-projection
sums. The tiny model's logits reach O(100), so per-token log-probs carry rounding of about
1e-7 x 100 = 1e-5, and the MH log ratios sum 12 of them: atol 2e-4, rtol 1e-5.

bf16 logits (the `bf16` entries) may differ where a reassociated float32 sum of the model
axis's partial products rounds to the neighbouring bf16 value (`_assert_bf16_close`).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxsample import parallel
from jaxsample.errors import ArgumentError

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker  # noqa: E402
import run  # noqa: E402  (experiments/, put on sys.path by parallel_worker)

WORKER = Path(__file__).parent / "parallel_worker.py"
ROOT = Path(__file__).parent.parent
TIMEOUT_S = 600


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _assert_same(reference: dict, results: dict, prefix: str) -> None:
    for name, expected in reference.items():
        got = results[f"{prefix}/{name}"]
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)


def _assert_bf16_close(reference: dict, results: dict, prefix: str) -> None:
    """The split projections sum their partial products in float32 and round once, as one
    device does: a logit differs only after such a sum rounds to the neighbouring bf16 value
    (none on this batch at data=4,model=2; 3 of 3072 positions on 16 batches, by at most
    1.25 ulps). Rounded per device before the sum, 82% of these logits differed, by up to 6
    bf16 ulps of their row's largest logit."""
    expected = reference["bf16"]
    got = results[f"{prefix}/bf16"]
    ulp = 2.0 ** (np.floor(np.log2(np.abs(expected).max(axis=-1, keepdims=True))) - 7)
    differ = got != expected
    assert differ.mean() <= 0.01, differ.mean()
    assert np.all(np.abs(got - expected) <= 2 * ulp), np.max(np.abs(got - expected) / ulp)


@pytest.fixture(scope="module")
def reference():
    """Single-device results of every sampler (this process has one CPU device)."""
    return parallel_worker.run_all(parallel_worker.tiny_lm(), None)


def test_mesh_of_8_simulated_devices_matches_one_device(reference, tmp_path):
    """Also every sampler called with a key, prompt and token budget taken from a result on
    another mesh (`parallel_worker.follow_up`)."""
    out = tmp_path / "mesh.npz"
    subprocess.run([sys.executable, str(WORKER), str(out), "generate,power,smc,bf16,follow_up", "data=4,model=2"],
                   env=_env(8), check=True, timeout=TIMEOUT_S, cwd=ROOT)
    results = dict(np.load(out))
    _assert_same({k: v for k, v in reference.items() if k != "bf16"}, results, "data=4,model=2")
    _assert_bf16_close(reference, results, "data=4,model=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_two_processes_of_four_devices_match_one_process(reference, tmp_path):
    """SMC on a batch of two prompts, whose resampling gathers rows across the processes; and
    `experiments/run.py power --distributed` (the README's multi-host command, its default
    --out; generation over the 8 devices of both processes) in both processes: one run
    directory, the one-process run's results."""
    out = tmp_path / "hosts.npz"
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--distributed", str(out), "smc", "data=4,model=2"],
            env=_env(4, JAXSAMPLE_COORDINATOR=f"127.0.0.1:{port}", JAXSAMPLE_NUM_PROCESSES="2",
                     JAXSAMPLE_PROCESS_ID=str(rank)),
            cwd=tmp_path,
        )
        for rank in range(2)
    ]
    try:
        # The one-process run, while the two processes start up and compile.
        assert run.main([*parallel_worker.POWER_COMMAND, "--out", str(tmp_path / "one")]) == 0
        codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    results = dict(np.load(out))
    _assert_same({k: v for k, v in reference.items() if k.startswith("smc.")}, results,
                 "data=4,model=2")
    [run_dir] = (tmp_path / "runs").iterdir()
    assert _results(run_dir) == _results(tmp_path / "one")


# Compiles one decode step of an MLP-heavy model on a 1 x 2 (data x model) mesh and prints
# the all-gathers in it, for the model as `shard_model` returns it and with MLP blocks forced;
# and one resampling gather of a KV cache [B, L, K, S, H] laid out as the samplers lay it out
# (`constrain_rows`: rows over data, kv heads over model), with each all-gather's dimension.
_GATHERS = """
import dataclasses, json, re, jax, jax.numpy as jnp
from jaxsample import parallel
from jaxsample.models import ModelConfig, decoder, init_params, make_language_model
from jaxsample.rows import gather_rows
config = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=32768,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=64, qkv_bias=True, eos_token_ids=(0,))
lm = make_language_model(config, init_params(jax.random.key(0), config))
sharded = parallel.shard_model(lm, parallel.make_mesh(data=1, model=2))
forced = sharded.replace(decode_fn=dataclasses.replace(sharded.decode_fn, mlp_chunks=2))
def gathers(compiled):
    return re.findall(r"= ([a-z0-9]+[[][0-9,]*[]])[^ ]* all-gather[(].*dimensions=[{]([0-9]+)[}]", compiled.as_text())
def gathered_shapes(model):
    step = jax.jit(lambda m, t, c: m.decode(t, c)).lower(model, jnp.ones((2,), jnp.int32), lm.init_cache(2, 8))
    return [shape for shape, _ in gathers(step.compile())]
def resample_gathers(data):
    mesh = parallel.make_mesh(data=data, model=2)
    place = lambda tree: parallel.constrain_rows(tree, mesh)
    resample = jax.jit(lambda cache, rows: place(gather_rows(place(cache), rows)))
    return gathers(resample.lower(jax.ShapeDtypeStruct((8, 2, 4, 41, 32), jnp.float32), jnp.arange(8)).compile())
print(json.dumps({"default_chunks": decoder.default_mlp_chunks(32, 32768, jnp.float32),
                  "sharded": gathered_shapes(sharded), "forced": gathered_shapes(forced),
                  "resample_1x2": resample_gathers(1), "resample_2x2": resample_gathers(2)}))
"""


def test_tensor_parallel_decoding_keeps_the_mlp_whole_and_resampling_keeps_heads_split():
    """On CPU the decode step runs a large MLP in column blocks of its intermediate features,
    which the model axis splits; GSPMD would gather each whole stacked matrix onto every
    device for them, so `shard_model` binds one block when the model axis is split.

    Resampling gathers a KV cache's rows in place, in slices along its slot axis:
    slices across its kv heads (split over the model axis) made GSPMD gather every head of
    the cache onto every device (f32[8,2,4,41,32] on 1 x 2, per data device on 2 x 2)."""
    done = subprocess.run([sys.executable, "-c", _GATHERS], env=_env(4), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["default_chunks"] == 2  # without a split model axis, this model decodes in 2 blocks
    assert found["sharded"] == []
    # The check can fail: forced blocks gather the gate, up and down stacks whole.
    assert sorted(found["forced"]) == ["f32[2,32,32768]", "f32[2,32,32768]", "f32[2,32768,32]"]
    assert found["resample_1x2"] == []
    # Across data devices the ancestors' rows are gathered (dimension 0), each device's 2 of
    # the 4 kv heads only.
    assert found["resample_2x2"] and all(dim == "0" and shape.split("[")[1].split(",")[2] == "2"
                                         for shape, dim in found["resample_2x2"]), found["resample_2x2"]


def test_mesh_arguments_are_checked():
    assert parallel.parse_mesh("data=4,model=2") == (4, 2)
    assert parallel.parse_mesh("model=2") == (1, 2)
    for spec in ["data=0", "data=\u0663"]:  # \u0663: an Arabic-Indic 3, which int() would read
        with pytest.raises(ArgumentError, match="data=D or model=M"):
            parallel.parse_mesh(spec)
    with pytest.raises(ArgumentError, match="'data=2,data=4': data is given twice"):
        parallel.parse_mesh("data=2,data=4")
    with pytest.raises(ArgumentError, match="needs 2 devices"):
        parallel.make_mesh(data=2, model=1, devices=jax.devices()[:1])
    with pytest.raises(ArgumentError, match="devices must be distinct, got .* twice"):
        parallel.make_mesh(data=2, devices=jax.devices()[:1] * 2)
    one = jax.devices()[:1]
    assert parallel.make_mesh(data=np.int64(1), model=np.int32(1), devices=one).shape == {"data": 1, "model": 1}
    with pytest.raises(ArgumentError, match=r"model must be an integer in \[1, 1\], got 2"):
        parallel.make_mesh(model=2, devices=one)  # named before data is derived from it (0)
    with pytest.raises(ArgumentError, match=r"data must be an integer in \[1, inf\], got True"):
        parallel.make_mesh(data=True, devices=one)
    with pytest.raises(ArgumentError, match="devices must list at least one device"):
        parallel.make_mesh(devices=[])
    two_rows = Mesh(np.asarray(jax.devices()[:1] * 2).reshape(2, 1), (parallel.DATA, parallel.MODEL))
    with pytest.raises(ArgumentError, match="num_samples=3 must be a multiple"):
        parallel.check_rows(two_rows, 3, "num_samples")


def test_tensor_parallel_layout_splits_whole_heads():
    config = parallel_worker.CONFIG  # 4 query heads, 2 kv heads, vocabulary 48
    params = parallel_worker.tiny_lm().params
    mesh = Mesh(np.asarray(jax.devices()[:1] * 2).reshape(1, 2), (parallel.DATA, parallel.MODEL))
    specs = {jax.tree_util.keystr(path): sharding.spec for path, sharding in
             jax.tree_util.tree_flatten_with_path(parallel.param_shardings(mesh, params, config))[0]}
    model = parallel.MODEL
    assert specs["['layers']['self_attn']['q_proj']['kernel']"] == P(None, None, model)
    assert specs["['layers']['self_attn']['k_proj']['bias']"] == P(None, model)
    assert specs["['layers']['self_attn']['o_proj']['kernel']"] == P(None, model, None)
    assert specs["['layers']['mlp']['down_proj']['kernel']"] == P(None, model, None)
    assert specs["['embed_tokens']['embedding']"] == P(model, None)
    assert specs["['norm']['scale']"] == P()
    four = Mesh(np.asarray(jax.devices()[:1] * 4).reshape(1, 4), (parallel.DATA, parallel.MODEL))
    specs4 = {jax.tree_util.keystr(path): sharding.spec for path, sharding in
              jax.tree_util.tree_flatten_with_path(parallel.param_shardings(four, params, config))[0]}
    # 2 kv heads cannot split 4 ways: k/v stay whole (replicated); q (4 heads) splits.
    assert specs4["['layers']['self_attn']['k_proj']['kernel']"] == P()
    assert specs4["['layers']['self_attn']['q_proj']['kernel']"] == P(None, None, model)
