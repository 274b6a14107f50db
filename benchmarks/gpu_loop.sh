#!/usr/bin/env bash
# Fills the README's pending GPU-loop rows (issue #14) on a machine with one CUDA GPU, in about 10 min:
# CUDA checks (parity, no host sync, graph vs eager), per-unit loop/bare ratios eager and graphed, and
# ResNet-20 W4A4 QDrop at 20,000 iterations per unit with the graphed loop, timed end to end.
#     bash benchmarks/gpu_loop.sh OUT_DIR [DATA_DIR]
# On a lent machine (64 MiB of working tree and carried paths) make DATA_DIR first, here:
#     python benchmarks/compact_cifar.py ../shared/data/cifar10 gpu_carry/cifar10   (32 MB; seed-0 runs exact)
# and there: PYTHONPATH=src bash benchmarks/gpu_loop.sh $OUT gpu_carry/cifar10
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_loop.sh OUT_DIR [DATA_DIR]}
data=${2:-../shared/data/cifar10}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
python benchmarks/gpu_check.py --out "$out/gpu_check.json"
python benchmarks/recon_speed.py --device cuda --iters 500 --data "$data" --out "$out/recon_speed_cuda_eager.json"
python benchmarks/recon_speed.py --device cuda --iters 500 --data "$data" --cuda-graph --out "$out/recon_speed_cuda_graph.json"
start=$(date +%s)
python -m qdrop quantize --model cifar10_resnet20 --data "$data" --bits w4a4 --algo qdrop --iters 20000 --device cuda --cuda-graph \
    --out "$out/r20_w4a4_qdrop_20k_graph"
echo "end to end: $(( $(date +%s) - start )) s" | tee "$out/r20_w4a4_qdrop_20k_graph/wall.txt"
