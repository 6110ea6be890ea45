#!/usr/bin/env bash
# GPU check: builds normext in place for this machine's GPU, runs the CUDA
# tests and the per-call overhead check, then the BatchNorm benchmark on GPU
# shapes, the fused and layer-norm CUDA kernels' benchmarks and a ResNet-50
# step (skipped with SKIP_BENCH=1). With AB_BASE=REV
# (a commit, or a .tar of one: `git archive REV -o .ab/base.tar`, for a copy
# of the repository without that commit) it also builds REV beside it and
# times the two builds' ops against each other in one process (ab_builds.py;
# AB_OPS, AB_DTYPES, AB_LAYOUTS and AB_SHAPES pick the rows).
# Logs and Markdown tables go under $OUT (else build/gpu_check); a summary is
# printed last. Needs a CUDA torch, nvcc, ninja, pytest, pytest-timeout and
# hypothesis (pytest-xdist used when present); no internet. About 6-8 min on
# an H100 with 16 cores; each stage has its own time limit, and
# BUDGET (default 540 s) caps the whole.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu_check}"
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# GIT_COMMIT: the commit sent, for the reports (the copy's .git may be stale)
[ -n "${GIT_COMMIT:-}" ] && export NORMEXT_GIT_COMMIT="$GIT_COMMIT"
# Every stage is cut short so that the whole script ends within BUDGET seconds.
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
limit() {  # limit STAGE_MAX RESERVE: seconds for a stage, keeping RESERVE for later ones
  local left=$(( deadline - $(date +%s) - $2 ))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}

arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: no CUDA GPU visible to torch"; exit 1; }
export TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  echo "commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  date -u +%Y-%m-%dT%H:%MZ
} | tee "$out/machine.txt"

echo "== build (sm_$arch, $MAX_JOBS jobs)"
start=$(date +%s)
if ! timeout $(limit 300 200) $python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  grep -m 20 -B2 -A6 "error" "$out/build.log" | head -80; echo "gpu_check: build failed"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$python -c "import normext; print(normext.build_info())" | tee -a "$out/machine.txt"
if [ -n "${AB_BASE:-}" ]; then  # built while the probes and tests run
  timeout $(limit 300 200) $python benchmarks/ab_builds.py build --cuda "base=$AB_BASE" \
    > "$out/ab_build.log" 2>&1 &
  ab_build_pid=$!
fi

# A C++ error (TORCH_CHECK) must reach Python as an exception. On the lent
# H100s' image (2026-11-27) such errors crashed the process (SIGSEGV): its CXX
# (/opt/gcc, gcc 13) has only a static libstdc++, whose iostreams are not
# initialized in a shared library; setup.py now links the shared one by its
# soname. Each probe runs in its own process; a crash is followed by a native
# backtrace when cuda-gdb exists.
echo "== error path"
{
  echo "CXX=${CXX:-c++}: $(${CXX:-c++} --version | head -1)"
  ldd normext/_C*.so | grep -E "stdc|gcc_s|gomp" | sed 's/ (0x.*//'
  command -v nm > /dev/null && echo "libstdc++ code inside the extension (0 expected):" \
    "$(nm -D --defined-only normext/_C*.so | grep -c -E '__cxa_throw|_ZNSt8ios_base4Init')"
} >> "$out/machine.txt"
error_rc=0
probe_log=$(mktemp)
for probe in "cpu" "cpu after CUDA init" "cuda"; do
  code="import torch, normext
device = 'cuda' if '$probe' == 'cuda' else 'cpu'
if 'init' in '$probe': torch.cuda.init()
x = torch.ones(3, device=device)
try:
    torch.ops.normext.batch_norm_moments(x)
except RuntimeError as error:
    print('$probe: a 1-D input raises RuntimeError:', str(error).splitlines()[0])"
  timeout $(limit 60 420) $python -X faulthandler -c "$code" > "$probe_log" 2>&1
  rc=$?
  tail -3 "$probe_log"
  { echo "== $probe (exit $rc)"; cat "$probe_log"; } >> "$out/error_path.log"
  if [ $rc -ne 0 ]; then
    error_rc=$rc
    if [ $rc -gt 128 ]; then
      echo "gpu_check: the error path CRASHED ($probe, signal $(( rc - 128 ))): C++ exceptions do not reach Python (libstdc++ code inside the extension? see machine.txt)"
    else
      echo "gpu_check: the error path failed ($probe, exit $rc)"
    fi
    command -v cuda-gdb > /dev/null && timeout $(limit 90 420) cuda-gdb -batch -ex run -ex bt \
      --args $python -c "$code" 2>&1 | grep -E "^#|signal" | tee -a "$out/error_path.log" | head -40
  fi
done
rm -f "$probe_log"

echo "== CUDA tests"
# Every device-parametrized test plus the CUDA-only file, the slow >2^31 test
# too; in parallel workers when pytest-xdist is there (a sticky CUDA error
# then spoils one worker, not the whole run).
workers=()
$python -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
start=$(date +%s)
NORMEXT_SLOW_TESTS=1 timeout $(limit 240 150) $python -m pytest tests -q -rfE -p no:cacheprovider \
  "${workers[@]}" -k "${TEST_FILTER:-cuda}" --timeout=200 --durations=10 \
  > "$out/tests.log" 2>&1
tests_rc=$?
echo "tests in $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
tail -3 "$out/tests.log"

ab_rc=0
if [ -n "${AB_BASE:-}" ]; then  # the timings below want the CPU to themselves
  wait $ab_build_pid || { ab_rc=1; tail -5 "$out/ab_build.log"; }
fi

echo "== per-call overhead (small BatchNorm2d: time, ops and GPU kernels per call)"
timeout $(limit 120 150) $python benchmarks/bench_overhead.py --device cuda --shape 32,64,8,8 \
  --repeats 5 --min-time 0.05 > "$out/overhead.md" 2> "$out/overhead.log"
overhead_rc=$?
[ $overhead_rc -ne 0 ] && tail -5 "$out/overhead.log"
sed -n '/^| mode/,$p' "$out/overhead.md"

if [ -n "${AB_BASE:-}" ] && [ $ab_rc -eq 0 ]; then
  echo "== A/B: base ($AB_BASE) against this tree, in one process"
  timeout $(limit 90 150) $python benchmarks/ab_builds.py compare base normext \
    --device cuda --ops "${AB_OPS:-train,backward,fwdbwd}" --dtypes "${AB_DTYPES:-float32,float16}" \
    --layouts "${AB_LAYOUTS:-nchw,channels_last}" --shapes "${AB_SHAPES:-64/56,2048/7}" \
    --pairs 5 --min-time 0.01 > "$out/ab.md" 2>&1
  ab_rc=$(( ab_rc || $? ))
  tail -3 "$out/ab.md"
fi

echo "== GPU time per kernel of a training step (normext and torch)"
timeout $(limit 60 150) $python benchmarks/profile_cuda_kernels.py --steps 10 \
  > "$out/kernels.md" 2> "$out/kernels.log" || tail -5 "$out/kernels.log"
grep "total" "$out/kernels.md"

if [ "${SKIP_BENCH:-0}" = 1 ]; then
  echo "== benchmarks skipped (SKIP_BENCH=1)"
  exit $(( tests_rc != 0 || overhead_rc != 0 || error_rc != 0 || ab_rc != 0 ))
fi

echo "== BatchNorm benchmark"
bench() {
  timeout $(limit 200 60) $python benchmarks/bench_batchnorm.py --device cuda \
    --repeats "${BENCH_REPEATS:-5}" ${BENCH_ARGS:-} --json "$out/bench.json" "$@" \
    > "$out/bench.md" 2>> "$out/bench.log"
}
bench
bench_rc=$?
if [ $bench_rc -ne 0 ] && grep -q "differs from torch" "$out/bench.log"; then
  # a result outside the benchmark's tolerance: say so, and still time every row
  grep "differs from torch" "$out/bench.log"
  echo "gpu_check: timing again with --no-check"
  bench --no-check
  bench_rc=1
fi
[ $bench_rc -ne 0 ] && tail -5 "$out/bench.log"

echo "== fused BatchNorm + activation (+ add): the CUDA kernels the layers do not run yet"
timeout $(limit 90 90) $python benchmarks/bench_fused.py --device cuda --repeats 3 \
  --min-time 0.05 > "$out/fused.md" 2> "$out/fused.log"
fused_rc=$?
[ $fused_rc -ne 0 ] && tail -5 "$out/fused.log"

echo "== LayerNorm / RMSNorm CUDA kernels (the functions leave CUDA to torch until these pass)"
timeout $(limit 90 60) $python benchmarks/bench_norms.py --device cuda --repeats 3 \
  --min-time 0.02 > "$out/norms.md" 2> "$out/norms.log"
norms_rc=$?
[ $norms_rc -ne 0 ] && tail -5 "$out/norms.log"

echo "== ResNet-50 step"
timeout $(limit 90 0) $python benchmarks/bench_resnet50.py --device cuda \
  --steps "${RESNET_STEPS:-5}" --repeats "${RESNET_REPEATS:-5}" \
  > "$out/resnet50.md" 2> "$out/resnet50.log"
resnet_rc=$?
[ $resnet_rc -ne 0 ] && tail -20 "$out/resnet50.log"

echo "== results (error path rc=$error_rc, tests rc=$tests_rc, overhead rc=$overhead_rc, ab rc=$ab_rc, bench rc=$bench_rc, fused rc=$fused_rc, norms rc=$norms_rc, resnet50 rc=$resnet_rc)"
cat "$out/resnet50.md"
sed -n '/^| /,$p' "$out/fused.md" | tail -8
grep -o "layer_norm forward geomean.*" "$out/norms.md"
# the BatchNorm report's speedup summary (the full table is in bench.md)
sed -n '/Speedup summary/,$p' "$out/bench.md"
exit $(( error_rc != 0 || tests_rc != 0 || overhead_rc != 0 || ab_rc != 0 || bench_rc != 0 \
  || fused_rc != 0 || norms_rc != 0 || resnet_rc != 0 ))
