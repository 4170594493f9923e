#!/usr/bin/env bash
# Builds the virtual environment with everything archive-asr needs on this OS, lean:
# mlx-whisper goes in with --no-deps so its metadata cannot drag in a multi-GB CUDA torch
# (it never imports torch at run time; pyproject.toml lists what it does import).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ "$(uname -s)" = Linux ]; then
  bash "$(dirname "$0")/ensure-openblas.sh" || echo "warning: OpenBLAS not installed; MLX will use its slow reference BLAS" >&2
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test]'
"$venv/bin/python" -m pip install -q --no-deps 'mlx-whisper==0.4.3'
if "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "note: torch is importable in $venv but archive-asr does not need it" >&2
fi
echo "installed into $venv"
