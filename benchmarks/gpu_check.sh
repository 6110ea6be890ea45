#!/usr/bin/env bash
# GPU check: builds normext in place for this machine's GPU, runs the CUDA
# tests, then the BatchNorm benchmark on GPU shapes. Logs and a Markdown table
# go under $OUT (else build/gpu_check); the table is printed last.
# Needs a CUDA torch, nvcc, pytest and hypothesis; no internet. About 5-8 min on
# an H100 with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu_check}"
mkdir -p "$out"
python=${PYTHON:-python3}

arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: no CUDA GPU visible to torch"; exit 1; }
export TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  git rev-parse --short HEAD 2>/dev/null
  date -u +%Y-%m-%dT%H:%MZ
} | tee "$out/machine.txt"

echo "== build (sm_$arch)"
start=$(date +%s)
if ! $python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "gpu_check: build failed"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$python -c "import normext; print(normext.build_info())" | tee -a "$out/machine.txt"

echo "== CUDA tests"
# Every device-parametrized test plus the CUDA-only file; the slow >2^31 test too.
NORMEXT_SLOW_TESTS=1 timeout 300 $python -m pytest tests -q -x -p no:cacheprovider \
  -k "cuda" --timeout=240 > "$out/tests.log" 2>&1
tests_rc=$?
tail -5 "$out/tests.log"

echo "== benchmark"
timeout 200 $python benchmarks/bench_batchnorm.py --device cuda --json "$out/bench.json" \
  > "$out/bench.md" 2> "$out/bench.log"
bench_rc=$?

echo "== results (tests rc=$tests_rc, bench rc=$bench_rc)"
cat "$out/bench.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
