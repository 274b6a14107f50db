#!/usr/bin/env bash
# Issue #13 on a lent GPU: EfficientNet-Lite0 W4A4 on the ImageNet samples (calibrate on 500, evaluate on the
# other 500): naive, qdrop and the candidate qdrop-plus-fastround at 500 and 2,000 iterations per unit, plus the
# CUDA checks (benchmarks/gpu_check.py). The runs share the one GPU side by side: each is bound by kernel launches
# (small convolutions, batch 32), so a lone run leaves the GPU mostly idle. Each run is capped at LIMIT seconds so
# that the results of those that finish are packed even if one does not.
#     bash benchmarks/gpu_lite0.sh OUT_DIR DATA_DIR [LIMIT_S]
# OUT_DIR gets gpu.txt, gpu_check.json and results.tgz (each run's metrics.json, recon report and log).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_lite0.sh OUT_DIR DATA_DIR [LIMIT_S]}
data=${2:?usage: bash benchmarks/gpu_lite0.sh OUT_DIR DATA_DIR [LIMIT_S]}
limit=${3:-450}
runs=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >> "$out/gpu.txt"
export PYTHONUNBUFFERED=1
quant() {  # name algo iters
    local start=$SECONDS
    timeout "$limit" python -m qdrop quantize --model efficientnet_lite0 --data "$data" --bits w4a4 --algo "$2" \
        ${3:+--iters "$3"} --calib 500 --device cuda --threads 2 --out "$runs/$1" > "$runs/$1.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s" >> "$runs/$1.log"
}
quant naive naive "" &
for iters in 2000 500; do
    for algo in qdrop qdrop-plus-fastround; do
        quant "${algo}_${iters}" "$algo" "$iters" &
    done
done
timeout "$limit" python benchmarks/gpu_check.py --out "$out/gpu_check.json" > "$runs/gpu_check.log" 2>&1 &
wait
(cd "$runs" && tar czf "$out/results.tgz" --exclude='*.pt' --exclude='*.onnx' .)
ls -la "$runs"/* > "$out/listing.txt"
tail -n 3 "$runs"/*.log
