#!/bin/bash
# Run the synthesis job on every GPU of this machine: jobs/torchrun.sh seeds=0-9999 ...
# NPROC overrides the process count (default: the number of visible GPUs, or 2 on a CPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${DMGR_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}"
nproc="${NPROC:-$("$python_bin" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec "$python_bin" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m dmgr.synth "$@"
