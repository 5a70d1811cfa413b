#!/usr/bin/env bash
# Every GPU benchmark in one run (< 8 minutes on one H200), JSON into experiments/results/gpu/.
# Needs jax[cuda], flax, transformers and torch in one interpreter, $PYTHON (default: python;
# an image whose jax lives in a venv off the PATH needs e.g. PYTHON=/opt/torch/.venv/bin/python3);
# runs from the repository root without installing it (PYTHONPATH=.) and without network:
# models are random weights built from published config values (Qwen2.5-0.5B/1.5B/7B shapes)
# or the embedded toy model.
#
#   [PYTHON=...] bash experiments/bench_gpu.sh [OUT_DIR [STEP ...]]
#
# Named STEPs run alone (e.g. `bash experiments/bench_gpu.sh experiments/results/gpu bench_power`
# reruns one that failed); goals.md is then rewritten from all the JSON in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gpu}
ONLY=" ${*:2} "
STEPS=" $(grep -oP '^step \K\S+' experiments/bench_gpu.sh | tr '\n' ' ')"
for name in ${*:2}; do
  if [[ "$STEPS" != *" $name "* ]]; then echo "bench_gpu.sh: no step named '$name'; the steps are:$STEPS" >&2; exit 2; fi
done
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import jax, flax, torch, transformers" 2>/dev/null; then
  echo "bench_gpu.sh: '$PYTHON' cannot import jax, flax, torch and transformers; set PYTHON to an interpreter that can" >&2; exit 2
fi
if [[ "$PYTHON" != python ]]; then  # every step's `python` runs it (timeout needs a program on the PATH)
  BIN=$(mktemp -d)
  printf '#!/bin/sh\nexec %q "$@"\n' "$PYTHON" > "$BIN/python" && chmod +x "$BIN/python"
  export PATH="$BIN:$PATH"
fi
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# JAX would otherwise reserve 75% of the GPU and leave transformers too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TOKENIZERS_PARALLELISM=false
B=experiments

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit; a failure does not stop the rest
  local name=$1 limit=$2; shift 2
  if [[ "$ONLY" != "  " && "$ONLY" != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^ ' | tail -n 25
  echo "=== $name exit ${PIPESTATUS[0]}"
}

{
  python -c "import jax, flax, torch, transformers, sys; print(sys.version); print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# Steps in order of what the issue's goals need. The decode benchmark writes its JSON after
# every row, so a decode step cut off by its limit keeps the rows it measured.
# The limits are the two H200 runs of 2026-12-04 (jax 0.11.2, results/gpu/ and
# results/gpu-per-layer/): check_device ~55 s; bench_decode, with two per-layer programs per
# row (each compiling in 10-24 s) and transformers, an estimated 30-45 s per 1.5B row and 55-70 s
# per 7B row (the second run's 7B batch-1 row took 67 s with three programs); bench_memory
# ~60 s; bench_power ~60 s (34 s of it compiling power_sample over 24 unrolled layers);
# bench_smc under 30 s. transformers is timed
# over 32-token calls, and the power-MH reference loop on 2 of the 8 chains (it runs chains
# one after another, so its tokens/s does not depend on how many).

# 0. Correctness on this GPU: port parity with transformers, greedy decode, power MH and SMC
# against exact enumeration (the CPU suite's checks; pytest is not needed).
step check_device 65 python $B/check_device.py --json "$OUT/check_device.json"
# 1. Decode speed vs the roofline at the goals' shapes and batches (7B, 1.5B x batch 1, 32) on
# the per-layer params `load` gives, transformers' generate on the same shapes, and the decode
# loop picking its attention width per layer (--also-filled-widths: a lax.switch per layer,
# which XLA:GPU runs as a host-device sync; on 2026-12-04 every step did, and its ~2.2 ms above
# the roofline time at both 7B and 1.5B, 28 layers each, fits 28 syncs; the default now reads
# such small caches whole, with no switch). Stacked params were 2.2x slower at 7B that day.
# 1.5B first: its launch-bound step is what the switch decides.
DECODE="--dtype bfloat16 --prompt-tokens 64 --new-tokens 128 --bandwidth-gbs 4300 --matmul-size 8192 --transformers-new-tokens 32 --samples 3 --min-sample-s 0.5"
step bench_decode 215 python $B/bench_decode.py --shapes qwen2.5-1.5b,qwen2.5-7b --batches 1,32 \
  --transformers-batches 1,32 --also-filled-widths $DECODE --json "$OUT/bench_decode.json"
# 2. Peak memory of SMC / power sampling (compiled, not run): 64 rows, 1024-token prompt, 512 new,
# with each program's largest buffers from XLA's buffer assignment (on 2026-12-04 the GPU
# programs held about two generated-part caches where the CPU's hold one: K and V copies
# transposed to [B, K, L, S, H] and [B, K, H, L, S] beside the [B, L, S, K, H] cache; the
# cache is [B, L, K, S, H] since, and the resampling no longer passes it through a
# conditional: compiled for an H200 without one on 2026-12-05, smc_decode peaks at 1.17x /
# 1.09x, results/deviceless-h200/. Does the device's compiler agree?).
step bench_memory 70 python $B/bench_memory.py --dtype bfloat16 --shapes qwen2.5-0.5b,qwen2.5-7b \
  --json "$OUT/bench_memory.json"
# 3. Power MH end to end vs the transformers reference loop (random Qwen2.5-0.5B weights).
step bench_power 75 python $B/bench_power.py --model random:qwen2.5-0.5b --dtype bfloat16 \
  --chains 8 --reference-chains 2 --block-size 16 --max-new-tokens 32 --mcmc-steps 2 --samples 2 --min-sample-s 0 \
  --json "$OUT/bench_power.json"
# 4. SMC cost per token vs plain sampling (embedded toy model).
step bench_smc 35 python $B/bench_smc.py --particles 64 --new-tokens 40 --samples 3 --min-sample-s 0.5 \
  --json "$OUT/bench_smc.json"
# 5. The token draw (two-stage Gumbel-max vs over the whole vocabulary) at a 152k vocabulary.
step bench_draw 20 python $B/bench_draw.py --vocab 151936 --batches 1,64 --samples 3 --min-sample-s 0.2 \
  --json "$OUT/bench_draw.json"
# Not in the 8 minutes; with device time left: the rest of the decode table (stacked params
# only on 2026-12-04, results/gpu/bench_decode_more.json, bench_decode_extra.json)
#   bench_decode.py --shapes qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b --batches 8,64 $DECODE
# and why stacked params decode slower (bench_layer_weights.py: a pass over 7B-sized MLP
# weights sliced from a stack took 8.66 ms, as separate arrays 3.22 ms, static slices 8.99 ms)
#   bench_layer_weights.py --layers 28 --hidden 3584 --intermediate 18944 --dtype bfloat16 --batches 1,32
# and what power_sample's own per-chain schedule gains over chains in lockstep (a second
# ~34 s compilation; 1.15x at 2 MH steps per block and 1.35x at 8 on CPU, 2026-12-04)
#   bench_power.py --model random:qwen2.5-0.5b --dtype bfloat16 --chains 8 --reference-chains 2 --mcmc-steps 8 --lockstep
# and what a batch of problems gains over one problem after another (8 prompts x 8 chains;
# 2.17x at 4 x 4 on CPU, 2026-12-04)
#   bench_power.py --model random:qwen2.5-0.5b --dtype bfloat16 --prompts 8 --chains 8 --reference-chains 2
# and the same for SMC runs (8 prompts x 16 particles on the toy; 2.07x at 4 x 8 on SmolLM2 on CPU, 2026-12-05)
#   bench_smc.py --particles 16 --new-tokens 40 --prompts 8 --samples 3 --min-sample-s 0.5
# The issue's goals against what this run measured (reads the JSON; no device work).
python $B/goals.py "$OUT" | tee "$OUT/goals.md"
echo "done $(date -u +%T); JSON in $OUT"
