#!/usr/bin/env bash
# The main job: venv, install, prepare tiny Shakespeare, train the CPU preset for a few minutes, print samples.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install --disable-pip-version-check -q -e .
unmask prepare shakespeare_char
unmask train cpu --max_iters="${MAX_ITERS:-1000}" --warmup_iters=50 --learning_rate=1e-3 --eval_interval=200 \
    --out_dir=out/quickstart
unmask sample --out_dir=out/quickstart --num_samples=2 --prompt="ROMEO:" --length=256
