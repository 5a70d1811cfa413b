#!/usr/bin/env bash
# Installs jax for TPU and jaxsample on a Cloud TPU VM (run from the repository root).
# Not runnable on the development machines (no TPU there); kept minimal on purpose.
set -euo pipefail
python3 -m pip install --upgrade pip
python3 -m pip install "jax[tpu]>=0.10"
python3 -m pip install -e .
python3 -c "import jax; print('devices:', jax.devices())"
# The test suite's exactness checks on the TPU (the transformers-parity checks need torch, which
# this script does not install, and are listed as skipped); exits 1 if any fails.
python3 experiments/check_device.py
# Pod slices (several hosts): run the same command on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command="cd jaxsample && bash tpu_setup.sh && python experiments/run.py power --distributed --mesh data=32"
# Each process joins the run with js.parallel.initialize_distributed() (run.py --distributed
# does it; on TPU pods JAX finds the coordinator itself). GPU clusters: the same under srun / mpirun, or set
# JAXSAMPLE_COORDINATOR=host0:1234 JAXSAMPLE_NUM_PROCESSES=N JAXSAMPLE_PROCESS_ID=i per process.
# Worker 0 alone writes the run directory (on its own disk) and prints the summary.
