"""Trains the embedded masked-diffusion model `toy-diffusion` on a short decision-task variant.

Data: traces of one fixed problem of the stylized decision task (jaxsample.tasks.decisions;
K = 2 items, L = 2 binary digits, 1 right + 2 wrong options, r = 0.3), drawn from the task's
exact p*: fixed-length sequences of T = 8 tokens over its 13-token vocabulary, e.g.
`R 1 0 <sep> W2 0 1 <eos>`. The model is unconditional (the problem is fixed), so its reward
is the task's verifier: `grade(problem, x_0)`, the trace is the right one (p* = r^K = 0.09).
Loss: masked-token cross-entropy at a uniform noise level (`jaxsample.diffusion.mdlm_loss`).

    python experiments/train_toy_diffusion.py              # writes jaxsample/checkpoints/toy-diffusion
    python experiments/train_toy_diffusion.py --out /tmp/td --steps 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxsample import diffusion
from jaxsample.tasks import decisions

SHIPPED = diffusion.checkpoint.SHIPPED["toy-diffusion"]
TASK = decisions.DecisionTaskConfig(right_prob=0.3, num_wrong=2, stretch_length=2, num_symbols=2,
                                    max_decisions=2)
ITEMS = (2, 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per step")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam peak learning rate")
    parser.add_argument("--num-traces", type=int, default=50_000, help="training traces drawn from p*")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and masks")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    problem = decisions.DecisionProblem(TASK, ITEMS)
    traces = jnp.asarray(decisions.sample_traces(args.seed, problem, args.num_traces))
    config = diffusion.DiffusionConfig(vocab_size=decisions.DecisionVocabulary(TASK).size,
                                       seq_len=traces.shape[1], num_steps=traces.shape[1])
    model = diffusion.init_model(jax.random.key(args.seed), config)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.learning_rate, args.steps))
    opt_state = optimizer.init(model.params)
    chunk = 50

    @jax.jit
    def train_chunk(model, opt_state, key):
        def step(carry, key):
            model, opt_state = carry
            batch_key, loss_key = jax.random.split(key)
            batch = traces[jax.random.randint(batch_key, (args.batch_size,), 0, traces.shape[0])]
            loss, grads = jax.value_and_grad(lambda p: diffusion.mdlm_loss(model.replace(params=p), loss_key, batch))(
                model.params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return (model.replace(params=optax.apply_updates(model.params, updates)), opt_state), loss

        (model, opt_state), losses = jax.lax.scan(step, (model, opt_state), jax.random.split(key, chunk))
        return model, opt_state, losses.mean()

    start = time.time()
    key = jax.random.key(args.seed + 1)
    losses = []
    for _ in (bar := tqdm(range(args.steps // chunk), desc="train toy-diffusion")):
        key, chunk_key = jax.random.split(key)
        model, opt_state, loss = train_chunk(model, opt_state, chunk_key)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    samples = diffusion.unmask(jax.random.key(args.seed + 2), model, 4096).tokens
    accuracy = float(np.mean(decisions.grade(problem, np.asarray(samples))))
    training = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "seed": args.seed, "final_masked_token_loss": losses[-1], "seconds": round(time.time() - start, 1),
                "sampled_accuracy": accuracy, "data_accuracy": TASK.right_prob ** len(ITEMS)}
    diffusion.save(args.out, model, problem, training)
    print(training)


if __name__ == "__main__":
    main()
