#!/usr/bin/env bash
# Installs jax for TPU and jaxsample on a Cloud TPU VM (run from the repository root).
# Not runnable on the development machines (no TPU there); kept minimal on purpose.
set -euo pipefail
python3 -m pip install --upgrade pip
python3 -m pip install "jax[tpu]>=0.10"
python3 -m pip install -e .
python3 -c "import jax; print('devices:', jax.devices())"
