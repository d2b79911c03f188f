#!/usr/bin/env bash
# The main job: venv, install, prepare tiny Shakespeare, train the quickstart preset for a few minutes, print samples.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install --disable-pip-version-check -q -e .
unmask prepare shakespeare_char
unmask train quickstart --max_iters="${MAX_ITERS:-1000}" --out_dir=out/quickstart --overwrite=True
unmask sample --out_dir=out/quickstart --num_samples=2 --prompt="ROMEO:" --length=256 --preset=guide
