#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see README "GPU checks"): the gpu-marked tests, then the
# benchmarks at their real sizes. Everything it writes lands in $OUT (or benchmarks/results/ without it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi | tee "$OUT/nvidia-smi.txt"
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt"
$PY -m benchmarks.bench_kernels --device cuda 2>&1 | tee "$OUT/bench_kernels_gpu.txt"
$PY -m benchmarks.bench_vae_decode --device cuda --dtype bf16 --sizes 2048 4096 2>&1 | tee "$OUT/bench_vae_gpu.txt"
$PY -m benchmarks.bench_training --device cuda 2>&1 | tee "$OUT/bench_training_gpu.txt"
cp benchmarks/results/*.csv benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
