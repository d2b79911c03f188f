#!/usr/bin/env bash
# The whole test suite: venv, dev extras, lint, types, pytest. pytest exit code 5 (no tests) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install --disable-pip-version-check -q -e ".[dev]"
# Tests prepare tiny Shakespeare from the shared mirror next to the checkout when it exists.
if [ -z "${UNMASK_DATA_MIRROR:-}" ] && [ -d ../shared/data ]; then
    UNMASK_DATA_MIRROR="$(cd ../shared/data && pwd)"
    export UNMASK_DATA_MIRROR
fi
ruff check unmask tests benchmarks
ruff format --check unmask tests benchmarks
mypy unmask
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
