#!/usr/bin/env bash
# The GPU check for a bare GPU host (docs/training.md "GPU check"): Python 3.12 with torch, triton, transformers,
# accelerate, peft and pandas, but no diffusers, pydantic, deepspeed, typer or mlflow, and no network.
#
#   make gpu-wheels                      # here, once: the missing wheels into build/gpu-wheels (~19 MB)
#   benchmarks/gpu_check.sh [--dry-run]  # there: install, CUDA tests, benchmarks; results in $OUT
#   benchmarks/gpu_check.sh accel [--dry-run]  # there: install, then the accelerator grid alone (its own run)
#
# 1. a venv that sees the host's packages (a .pth file, so the host Python may itself be a venv), our two
#    packages installed with --no-deps plus the carried wheels, all offline;
# 2. the CUDA tests (tests/model/test_kernels_cuda.py, -m gpu);
# 3. benchmarks: kernels (RoPE, loss), one real-size block fwd/bwd at 4K tokens (TFLOP/s, MFU), VAE decode at
#    4096² by mode (time, peak memory), 50-step 1024²/4096² generation extrapolated to 57 blocks.
# Every step is time-boxed (the boxes add up to 435 s: the whole run stays under 8 minutes) and recorded in $OUT/summary.json;
# a failing step does not stop the others. --dry-run (a machine without CUDA) does the install and the imports,
# runs the tests (the gpu test skips) and the benchmarks that skip cleanly without CUDA, and skips the rest.
# `accel`: install (90 s) + every cache × compile × quantize combination of generate.accel at 1024² and 4096²
# (benchmarks/bench_generate.py --mode accel, 420 s box: each compiled combination compiles once per size), seconds
# per step and the ratio against none/none/none, in $OUT/generate_accel_cuda.{csv,json}; under 9 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
ACCEL=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    accel) ACCEL=1 ;;
    *) echo "usage: benchmarks/gpu_check.sh [accel] [--dry-run]"; exit 2 ;;
  esac
done
OUT=${OUT:-benchmarks/results/gpu-check}
WHEELS=${WHEELS:-build/gpu-wheels}
HOST_PY=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/ultraflux-gpu-check-venv}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"
START=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
  return $rc
}

skip() {
  echo "== $1 skipped ($2)"
  printf '{"step": "%s", "rc": null, "skipped": "%s"}\n' "$1" "$2" >> "$SUMMARY"
}

install_venv() {
  [[ -d "$WHEELS" ]] || { echo "no wheel folder $WHEELS: run 'make gpu-wheels' where a package index is reachable"; return 2; }
  rm -rf "$VENV" && "$HOST_PY" -m venv "$VENV" || return 2
  # the host's packages, visible to the venv whether the host Python is a system one or itself a venv
  "$HOST_PY" -c 'import site, sysconfig; print("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-packages.pth" || return 2
  local pip=("$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check)
  "${pip[@]}" --no-deps "$WHEELS"/*.whl || return 2
  "${pip[@]}" --no-deps ./packages/ultraflux_core ./packages/ultraflux_eval ./packages/ultraflux_model || return 2
  "$VENV/bin/python" - <<'EOF'
import importlib
for name in ("torch", "triton", "diffusers", "pydantic", "ultraflux_model.modules.transformer",
             "ultraflux_model.vae.autoencoder", "ultraflux_model.inference.pipeline", "ultraflux_model.kernels.rope",
             "ultraflux_model.kernels.wavelet_loss", "benchmarks.bench_kernels", "benchmarks.bench_block",
             "benchmarks.bench_vae_decode", "benchmarks.bench_generate", "ultraflux_model.inference.accel"):
    module = importlib.import_module(name)
    print(f"{name:42s} {getattr(module, '__version__', '')}")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

export -f install_venv
export WHEELS VENV HOST_PY
step install 90 bash -c install_venv || { echo "install failed: see $OUT/install.log"; exit 2; }
PY="$VENV/bin/python"
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if (( ACCEL )); then
  # without CUDA (the dry run) the benchmark writes one 'skipped' row and exits 0
  step bench_accel 420 "$PY" -m benchmarks.bench_generate --mode accel --device cuda --sizes 1024 4096 --out "$OUT"
else
step gpu_tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/model/test_kernels_cuda.py
step bench_block 45 "$PY" -m benchmarks.bench_block --device cuda --tokens 4096 16384 --out "$OUT"
step bench_generate 105 "$PY" -m benchmarks.bench_generate --device cuda --sizes 1024 4096 --out "$OUT"
if (( DRY_RUN )); then
  skip bench_kernels "dry run: needs CUDA"
  skip bench_vae_decode "dry run: needs CUDA"
else
  step bench_kernels 75 "$PY" -m benchmarks.bench_kernels --device cuda --repeats 10
  step bench_vae_decode 60 "$PY" -m benchmarks.bench_vae_decode --device cuda --dtype bf16 --sizes 4096
  cp benchmarks/results/kernels_cuda.* benchmarks/results/vae_decode.* "$OUT"/ 2> /dev/null
fi
fi
"$PY" - "$SUMMARY" "$OUT/summary.json" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"steps": steps, "seconds": int(sys.argv[3])}, open(sys.argv[2], "w"), indent=2)
failed = [s["step"] for s in steps if s.get("rc") not in (0, None)]
print(f"gpu check: {len(steps)} steps, {sys.argv[3]} s, failed: {failed or 'none'}")
sys.exit(1 if failed else 0)
EOF
