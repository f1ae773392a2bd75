#!/usr/bin/env bash
# Creates the virtual environments of benchmarks/compare.py's peer rows, one per toolkit (their torch
# and transformers pins conflict with edgeq's): DIR/gptqmodel and DIR/llmcompressor, DIR the first
# argument, else $EDGEQ_PEER_VENVS, else /work/venvs (compare.py's --peer-venvs has the same default).
#
#     bash benchmarks/peers/setup.sh [DIR]
#
# torch==2.13.0 goes in first, on its own, so that pip takes the CPU wheel (a bare torch requirement
# can pull a multi-GB CUDA build); a constraint then keeps every later install from moving it. The
# toolkits and all their dependencies are pinned in requirements-<toolkit>.txt beside this script.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-${EDGEQ_PEER_VENVS:-/work/venvs}}
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"

constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "$torch_pin" > "$constraint"

for toolkit in gptqmodel llmcompressor; do
    venv="$dir/$toolkit"
    echo "== $venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install "$torch_pin"
    "$venv/bin/pip" install -c "$constraint" -r "$here/requirements-$toolkit.txt"
    "$venv/bin/python" -c "import torch, $toolkit; print('$toolkit ready, torch', torch.__version__)"
done
