#!/bin/bash
# Every GPU check of the data pipeline and the main job, in one run on the offline GPU machine (see
# ../shared/gpu/README.md). Prepare here first: echo /.whl/ >> .git/info/exclude &&
# ../shared/gpu/pack_wheels.sh ; then run with the device tool: bash perf/gpu_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q tests/data/test_prefetch_cuda.py 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
python3 -m dsfm.sim --preset small --datasets navier_stokes,gray_scott --out /tmp/small \
  --workers 16 --quiet
python3 -m perf.loader_bench --base /tmp/small --workers 14 --batches 50 --rounds 2 \
  --rss-batches 2000 --json "$OUT/loader_gpu.json" 2>&1 | tee "$OUT/loader_gpu.txt"
python3 dsfm/train.py --ds_config ds_configs/zero2.json --run-dir /tmp/run_gpu \
  --set train.max_steps=60 --set train.progress=false 2>&1 | tail -25 | tee "$OUT/train_gpu.txt"
python3 -m dsfm.monitor.report /tmp/run_gpu --out "$OUT/report_gpu.png" | tee "$OUT/report_gpu.txt"
cp -r /tmp/run_gpu/tb "$OUT/run_gpu_tb"          # for a TensorBoard screenshot back home
python3 -m pytest -q tests/monitor 2>&1 | tail -3 | tee "$OUT/monitor_tests.txt"
timeout 60 python3 -m perf.monitor_overhead 2>&1 | tail -8 | tee "$OUT/monitor_overhead.txt"
python3 -m perf.feed_bench --base /tmp/small --size B --batch 8 --workers 8 --steps 40 \
  --json "$OUT/feed_bench_gpu.json" 2>&1 | tail -6 | tee "$OUT/feed_bench_gpu.txt"
timeout 300 python3 -m perf.train_bench --steps 6 --warmup 2 --json "$OUT/train_bench_gpu.json" \
  2>/dev/null | tee "$OUT/train_bench_gpu.txt"
python3 -m perf.allreduce_sweep --backend nccl --nprocs 1 -e 64M -c all_reduce,all_gather \
  --out /tmp/sweep_gpu 2>&1 | tail -12 | tee "$OUT/sweep_gpu.txt"
mkdir -p "$OUT/nccl_logs" && cp /tmp/sweep_gpu/default/nccl.*.log "$OUT/nccl_logs/" 2>/dev/null
echo "== summary =="
tail -3 "$OUT/cuda_tests.txt"
grep -E "dsfm/upstream|1 reader|alone|in situ|host-to-device|memory" "$OUT/loader_gpu.txt"
grep -E "via|done:" "$OUT/train_gpu.txt"
cat "$OUT/report_gpu.txt"; tail -1 "$OUT/monitor_tests.txt"; tail -2 "$OUT/monitor_overhead.txt"
tail -2 "$OUT/feed_bench_gpu.txt"
grep -E "^(Ti|S|B|L) " "$OUT/train_bench_gpu.txt"
grep -E "Avg bus|flag" "$OUT/sweep_gpu.txt"
