"""Runs generate, and power_sample and smc_decode on a batch of two prompts, on a tiny random
Qwen2 (and its bf16 copy's logits) under several meshes and saves every result leaf to an
.npz (`tests/test_parallel.py` starts it in subprocesses with simulated CPU devices, and as the processes of a localhost
multi-host run).

    python tests/parallel_worker.py OUT.npz generate,power,smc,bf16 none data=4,model=2 ...
    JAXSAMPLE_COORDINATOR=127.0.0.1:PORT JAXSAMPLE_NUM_PROCESSES=2 JAXSAMPLE_PROCESS_ID=0 \
        python tests/parallel_worker.py --distributed OUT.npz smc data=4,model=2

With --distributed every process first runs `experiments/run.py POWER_COMMAND --distributed
--mesh data=8`, which joins the multi-host run itself, as the README's multi-host command
does (process 0 writes the run directory under the working directory's runs/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
# The power experiment at its smallest: one problem, 8 chains (one per device of 2 x 4).
POWER_COMMAND = ["power", "--decisions", "1", "--problems-per-k", "1", "--chains", "8", "--methods", "base"]

if "--distributed" in sys.argv:
    import run

    run.main([*POWER_COMMAND, "--distributed", "--mesh", "data=8"])

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402
from jaxsample import parallel  # noqa: E402
from jaxsample.models import ModelConfig, init_params, make_language_model  # noqa: E402
from jaxsample.sampling import proposal as proposal_module  # noqa: E402

ROWS = 8
CONFIG = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=64, qkv_bias=True, eos_token_ids=(47,))


def tiny_lm() -> js.LanguageModel:
    # 0.02-scale init gives near-uniform logits; scaled up, the samples depend on the model.
    params = jax.tree.map(lambda x: 20.0 * x, init_params(jax.random.key(0), CONFIG))
    return make_language_model(CONFIG, params, name="tiny-qwen2")


def reward(tokens, length):
    inside = jnp.arange(tokens.shape[0]) < length
    return jnp.sum(jnp.where(inside, jnp.cos(tokens.astype(jnp.float32)), 0.0))


def bf16_logits(key, lm, prompt, mesh):
    """Logits of the bf16 model on 8 random rows of 24 tokens (placed on `mesh`)."""
    del prompt
    lm = lm.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm.params))
    return parallel.shard_model(lm, mesh).logits(jax.random.randint(key, (ROWS, 24), 0, CONFIG.vocab_size))


SAMPLERS = {
    "generate": lambda key, lm, prompt, mesh: js.generate(
        key, lm, prompt, 12, num_samples=ROWS, mesh=mesh),
    # Two prompts of 4 chains each (rows split over the data axis across the prompts' groups),
    # each with its own α. One prompt runs as a batch of one (`follow_up` calls it alone).
    "power": lambda key, lm, prompt, mesh: js.power_sample(
        jax.random.split(key, 2), lm, [prompt, prompt[:2]], alpha=jnp.array([2.0, 3.0]), num_chains=ROWS // 2, block_size=6,
        num_mcmc_steps=3, max_new_tokens=12, mesh=mesh),
    "bf16": bf16_logits,
    # Two prompts' runs of 4 particles in one loop, the rows of both split over the data axis;
    # each prompt's own α and λ.
    "smc": lambda key, lm, prompt, mesh: js.smc_decode(
        jax.random.split(key, 2), lm, [prompt, prompt[:2]], jax.tree_util.Partial(reward), num_particles=ROWS // 2,
        max_new_tokens=12, alpha=jnp.array([2.0, 3.0]), lam=jnp.array([0.5, 1.0]), block_size=4,
        num_rejuvenation_steps=1, mesh=mesh),
}


def follow_up(key, lm, prompt, mesh):
    """Calls whose key, prompt and token budget come from the generate sampler's result; on a
    mesh they run on a 2 x 2 mesh of the last 4 devices, so their inputs start out on another
    mesh (jit refused such inputs)."""
    first = SAMPLERS["generate"](key, lm, prompt, mesh)
    key, prompt = jax.random.fold_in(key, first.lengths[0]), jnp.concatenate([prompt, first.tokens[0, :2]])
    second = None if mesh is None else parallel.make_mesh(data=2, model=2, devices=jax.devices()[-4:])
    return {
        "generate": js.generate(key, lm, prompt, 4, num_samples=4, mesh=second),
        "power": js.power_sample(key, lm, prompt, alpha=2.0, num_chains=4, block_size=4, num_mcmc_steps=1,
                                 max_new_tokens=4, mesh=second),
        "best_of_n": js.best_of_n(key, lm, prompt, 2, num_chains=4, max_new_tokens=4,
                                  token_budget=first.lengths[:4], mesh=second),
        "smc": js.smc_decode(key, lm, prompt, num_particles=4, max_new_tokens=4, block_size=4, mesh=second),
    }


SAMPLERS["follow_up"] = follow_up


def run_all(lm, mesh, samplers=tuple(SAMPLERS)) -> dict[str, np.ndarray]:
    """`{"sampler.leaf": array}` for every result leaf of each sampler in `samplers`."""
    prompt = jnp.asarray([1, 5, 9, 2], jnp.int32)
    flat = {}
    for name in samplers:
        result = SAMPLERS[name](jax.random.key(3), lm, prompt, mesh)
        for path, leaf in jax.tree_util.tree_flatten_with_path(result)[0]:
            flat[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return flat


def main(argv: list[str]) -> None:
    # Token draws in chunks of 4 of the 8 rows here (every second row; the single-device
    # reference draws all 8 at once): chunked, sharded draws must give the same results.
    proposal_module.DRAW_ELEMENTS = 4 * CONFIG.vocab_size
    argv = [a for a in argv if a != "--distributed"]
    out, samplers, specs = argv[0], argv[1].split(","), argv[2:]
    lm = tiny_lm()
    saved = {}
    for spec in specs:
        mesh = None if spec == "none" else parallel.make_mesh(*parallel.parse_mesh(spec))
        saved.update({f"{spec}/{k}": v for k, v in run_all(lm, mesh, samplers).items()})
    if jax.process_index() == 0:
        np.savez(out, **saved)


if __name__ == "__main__":
    main(sys.argv[1:])
