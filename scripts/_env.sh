# Shared by scripts/demo and scripts/test: a project virtualenv with the coordinator extra.
# torch is pinned to the CPU build this machine ships (pip picks the local +cpu wheel for
# torch==2.13.0); installing it first keeps pip from pulling a multi-GB CUDA build for a range.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${FEDGE_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e "$ROOT[${FEDGE_EXTRAS:-dev}]"
