#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: training speed per network under AMP, then the hippocampus benchmark's
# medseg recipe trained on the GPU (the plan picks DynUNet 32-256 there) and scored with medseg's infer on CUDA
# (with the CRF's slabs on the GPU too when training's decision turns it on: summary.json's crf_decision).
#
#   bash benchmarks/cuda.sh HIPPOCAMPUS_DIR OUT_DIR [MINUTES]
#
# Results in OUT_DIR: train_speed.txt, summary.json, metrics.tsv, history.tsv (seconds per epoch), plan.json.
set -euo pipefail
data=$(realpath "$1"); out=$(realpath "$2"); minutes=${3:-4}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
"$python" "$here/train_speed.py" --device cuda --iterations 20 | tee "$out/train_speed.txt"
work=$(mktemp -d)
(cd "$work" && "$python" "$here/hippocampus.py" --train-dir "$data" --minutes "$minutes" --recipes medseg \
    --threads 4 --workdir "$work")
cp "$work/summary.json" "$work/metrics.tsv" "$work/medseg/history.tsv" "$work/medseg/plan.json" "$out/"
