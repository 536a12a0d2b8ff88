#!/usr/bin/env bash
# GPU figures on one CUDA device: the speed-switch checks, then sampling and fine-tune step
# speed against the FLOPs limit at XL size (under 5 minutes on one H100). Writes its tables to
# ${OUT:-bench/results}/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__)"
  $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
  for batch in 8 32 256; do
    $py bench/sampling.py --device cuda --model XL/2 --batch "$batch" --steps 10 --repeats 5 --bf16
    $py bench/sampling.py --device cuda --model XL/2 --batch "$batch" --steps 10 --repeats 5 --bf16 --cuda-graphs
  done
  # Fine-tune steps; one run for all batches shares the model build (under a minute).
  $py bench/training.py --device cuda --model XL/2 --batch 32 128 --bf16 --repeats 5
} 2>&1 | tee "$out/gpu.txt"
