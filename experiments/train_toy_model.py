"""Trains the embedded default model `toy-decisions` on the stylized decision task.

A tiny Qwen2-architecture model (the project's Flax port) learns the exact data distribution
of `jaxsample.tasks.decisions`; the result is written as a Hugging Face checkpoint
(config.json, model.safetensors, tokenizer.json) that `js.load("toy-decisions")` and
transformers' `Qwen2ForCausalLM` both load.

    python experiments/train_toy_model.py                       # writes the shipped checkpoint
    python experiments/train_toy_model.py --out /tmp/toy --steps 200

Seed-reproducible; orbax checkpoints every --save-every steps under --work-dir, and a
restarted run resumes from the latest one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxsample.models import ModelConfig, forward, init_params, save_pretrained
from jaxsample import tasks
from jaxsample.tasks import decisions

SHIPPED = Path(__file__).resolve().parents[1] / "jaxsample" / "checkpoints" / "toy-decisions"


def model_config(task: decisions.DecisionTaskConfig, args) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": decisions.DecisionVocabulary(task).size,
            "hidden_size": args.width,
            "intermediate_size": 4 * args.width,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.heads,
            "max_position_embeddings": task.max_sequence_length,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "bos_token_id": decisions.BOS,
            "eos_token_id": decisions.EOS,
            "pad_token_id": decisions.PAD,
        }
    )


def loss_fn(params, config, tokens, mask):
    logits = forward(params, config, tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:]
    return jnp.sum(nll * weights) / jnp.sum(weights)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED, help="HF checkpoint directory to write")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/train-toy"), help="orbax checkpoints (resume)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    task = decisions.DecisionTaskConfig()
    config = model_config(task, args)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.02)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    params = init_params(jax.random.key(args.seed), config)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, config, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    manager = ocp.CheckpointManager(
        args.work_dir.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}))
        params, opt_state = restored["params"], restored["opt_state"]
        print(f"resumed from step {start} in {args.work_dir}")

    began = time.time()
    losses = []
    with tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", mininterval=5) as bar:
        for step in bar:
            # Batch i depends only on (seed, i): a resumed run sees the same data.
            rng = np.random.default_rng([args.seed, step])
            tokens, mask = decisions.sample_batch(rng, task, args.batch_size)
            params, opt_state, loss = train_step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask, jnp.float32))
            if step % 50 == 0:
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                manager.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()

    args.out.mkdir(parents=True, exist_ok=True)
    save_pretrained(params, config, args.out, tokenizer=None)
    tasks.write_tokenizer(args.out, task)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "seed": args.seed,
                "seconds_this_session": round(time.time() - began, 1),
                "final_loss": losses[-1] if losses else None,
                "task": task.to_dict(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
