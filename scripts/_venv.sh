# Sourced by the scripts: create/activate the venv and install torch first.
# torch==2.13.0 is pinned only when the venv has no torch yet (a CPU wheel on the project's machines; a user's
# own torch, e.g. a CUDA build in an existing venv, is kept). pyproject.toml declares only a floor.
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install --disable-pip-version-check -q "torch==2.13.0"
