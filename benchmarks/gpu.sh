#!/usr/bin/env bash
# Every GPU check in one go, each stage under its own time limit so that one slow stage cannot
# starve the rest: the CUDA tests, gossip cost, the paper's run projected, the engine table,
# interleaved ratios with torch.compile against eager.
# Results land in $1 (default runs/gpu); the .jsonl files keep whatever a stage measured before
# its limit (print them with `python benchmarks/engine.py --from-jsonl FILE`).
#
#     bash benchmarks/gpu.sh runs/gpu
set -u
out=${1:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/tests.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    2>&1 | tee -a "$out/tests.txt"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$out/tests.txt"
timeout 45 $py benchmarks/gossip.py --device cuda --sizes 100000 11173962 \
    --workers 16 64 256 --repeats 10 --budget 1 2>&1 | tee "$out/gossip.txt"
timeout 130 $py benchmarks/engine.py --device cuda --paper-projection --image 56 \
    --projection-steps 5 --step-limit 30 --budget 10 --jsonl "$out/projection.jsonl" \
    2>&1 | tee "$out/projection.txt"
timeout 200 $py benchmarks/engine.py --device cuda --workers 16 64 1 4 256 --repeats 10 \
    --step-limit 10 --budget 3 --jsonl "$out/table.jsonl" 2>&1 | tee "$out/table.txt"
# (a)/(b) from interleaved steps, with torch.compile (launch-bound small models) and bf16 beside eager
timeout 240 $py benchmarks/engine.py --device cuda --interleaved --models mlp lenet5 resnet8 \
    --workers 16 64 --methods vmap loop compile bf16 --repeats 10 2>&1 | tee "$out/interleaved.txt"
