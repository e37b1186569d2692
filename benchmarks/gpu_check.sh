#!/usr/bin/env bash
# The GPU check in one command: build fusedopt with CUDA, run the CUDA tests and the
# short form of the GPU benchmark, and write ONE report file.
#
#   benchmarks/gpu_check.sh                         # report: gpu_check_report.md
#   benchmarks/gpu_check.sh --out /tmp/report.md --wheelhouse /path/to/wheels
#   benchmarks/gpu_check.sh --dry-run               # check what is there, run nothing
#
# Needs: an NVIDIA GPU with a driver of the 580 series or newer (fusedopt._cuda links
# the CUDA 13 runtime statically), nvcc 13 and cmake on PATH, and a Python with numpy,
# pybind11 and pytest (ninja is used when found). The array libraries the
# GPU tests use: CuPy (most tests and the benchmark) and/or PyTorch with CUDA (the
# torch tests and `bench_gpu.py --mixed`). Nothing is downloaded: a machine without
# internet access can be given a directory of wheels (--wheelhouse, e.g. made with
# `pip download cupy-cuda13x pytest pybind11 -d wheels` elsewhere), from which missing
# packages are installed with `pip install --no-index`. Without CuPy and without torch
# with CUDA the check stops before building; with one of them, the tests that need the
# other are skipped, with that reason in the report.
#
# The build goes to --build-dir (default build/gpu-check) with the Python package
# staged next to it, never over a development build. A build directory made at the
# same paths is reused (cmake rebuilds only what changed), one made at other paths
# is configured anew; the CUDA architectures come from the GPU (nvidia-smi's compute
# capability), or --arch. Every phase has a time limit, so the whole check stays under
# ten minutes:
# build 300 s, tests 180 s, benchmark 100 s (--build-timeout, --test-timeout,
# --bench-timeout).
#
# Exit status: 0 when the build, the tests and the benchmark passed; 1 when one of
# them failed, or the built module finds no usable GPU (the report says why); 2 when
# a prerequisite is missing (no GPU, no nvcc, ...), found before anything is built.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
command_line="$0 $*"

out=gpu_check_report.md
wheelhouse=""
build=build/gpu-check
python=${PYTHON:-python3}
arch=""
dry_run=0
build_timeout=300
test_timeout=180
bench_timeout=100
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --build-timeout) build_timeout=$2; shift 2 ;;
    --test-timeout) test_timeout=$2; shift 2 ;;
    --bench-timeout) bench_timeout=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$out" in /*) ;; *) out="$root/$out" ;; esac
case "$build" in /*) ;; *) build="$root/$build" ;; esac
mkdir -p "$(dirname "$out")"
log_dir="$build/logs"
start=$(date +%s)

# --- the report: sections appended as the check goes --------------------------------------
report_tmp=$(mktemp)
trap 'rm -f "$report_tmp"' EXIT
say() { printf '%s\n' "$*" | tee -a "$report_tmp"; }
section() { printf '\n## %s\n\n' "$1" >>"$report_tmp"; echo "== $1"; }
block() { { echo '```'; cat; echo '```'; } >>"$report_tmp"; }
finish() {
  local status=$1
  section "Summary"
  say "- exit status: $status ($2)"
  say "- total wall time: $(( $(date +%s) - start )) s"
  cp "$report_tmp" "$out"
  echo "report: $out"
  exit "$status"
}

{
  echo "# fusedopt GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- host: $(hostname)"
  echo "- commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- command: $command_line"
} >"$report_tmp"

# --- prerequisites ------------------------------------------------------------------------
section "Prerequisites"
missing=()
have() { command -v "$1" >/dev/null 2>&1; }

if have nvidia-smi && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap \
    --format=csv 2>&1 | block
  gpu_cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  nvidia-smi 2>/dev/null | grep -m1 "CUDA Version" | sed 's/^[| ]*//' | block
else
  say "- GPU: none found (nvidia-smi is missing or lists no device)"
  missing+=("an NVIDIA GPU with its driver (nvidia-smi)")
  gpu_cc=""
fi
if have nvcc; then
  say "- nvcc: $(nvcc --version | grep -m1 release | sed 's/.*release //')"
else
  say "- nvcc: not found"
  missing+=("nvcc (CUDA 13 toolkit) on PATH")
fi
have cmake && say "- cmake: $(cmake --version | head -1)" || missing+=("cmake")
if ! have "$python"; then
  say "- python: $python not found"
  finish 2 "no Python"
fi
say "- python: $("$python" -c 'import sys; print(sys.version.split()[0], sys.executable)')"

pymissing() {  # the modules of "$@" that do not import
  "$python" - "$@" <<'PY'
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name)
PY
}
# import name -> wheel name
declare -A wheel=([numpy]=numpy [pybind11]=pybind11 [pytest]=pytest)
need=$(pymissing numpy pybind11 pytest)
if [ -n "$need" ] && [ -n "$wheelhouse" ] && [ "$dry_run" = 0 ]; then
  for m in $need; do
    "$python" -m pip install -q --no-index --find-links "$wheelhouse" "${wheel[$m]}" 2>&1 |
      tail -2 | block
  done
  need=$(pymissing numpy pybind11 pytest)
fi
for m in $need; do missing+=("Python package ${wheel[$m]}"); done

cupy_line=$("$python" -c "import cupy; print('CuPy', cupy.__version__)" 2>/dev/null)
if [ -z "$cupy_line" ] && [ -n "$wheelhouse" ] && [ "$dry_run" = 0 ]; then
  for pkg in cupy-cuda13x cupy-cuda12x; do
    if "$python" -m pip install -q --no-index --find-links "$wheelhouse" "$pkg" >/dev/null 2>&1; then
      break
    fi
  done
  cupy_line=$("$python" -c "import cupy; print('CuPy', cupy.__version__)" 2>/dev/null)
fi
say "- CuPy: ${cupy_line:-not installed (tests that need it are skipped, the benchmark does not run)}"
torch_line=$("$python" -c "
import torch
print('torch', torch.__version__, 'built for CUDA', torch.version.cuda,
      '(a GPU is usable)' if torch.cuda.is_available() else '(no usable GPU)')
" 2>/dev/null)
torch_cuda=0
[[ "$torch_line" == *"(a GPU is usable)" ]] && torch_cuda=1
say "- PyTorch: ${torch_line:-not installed (the torch GPU tests are skipped)}"
if [ -z "$cupy_line" ] && [ $torch_cuda = 0 ]; then
  missing+=("a GPU array library for the tests: CuPy (cupy-cuda13x), or PyTorch with CUDA")
fi

if [ ${#missing[@]} -gt 0 ]; then
  say ""
  say "Missing:"
  for m in "${missing[@]}"; do say "- $m"; done
fi
if [ -z "$arch" ]; then
  arch=${gpu_cc:-"80-real;90"}
fi
plan=(
  "build: cmake -S . -B $build -DFUSEDOPT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch (limit ${build_timeout} s)"
  "tests: FUSEDOPT_REQUIRE_CUDA=1 pytest tests/test_cuda.py and the cuda-marked tests of tests/test_interop.py (limit ${test_timeout} s)"
  "benchmark: bench_gpu.py --algos adam,sgd_momentum --workloads 256M,gpt2 --repeats 5, and --mixed --elements 67108864 --repeats 5 when torch has CUDA (limit ${bench_timeout} s)"
)
section "Plan"
for p in "${plan[@]}"; do say "- $p"; done
if [ "$dry_run" = 1 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    finish 0 "dry run: would stop here, ${#missing[@]} prerequisite(s) missing"
  fi
  finish 0 "dry run: all prerequisites found"
fi
if [ ${#missing[@]} -gt 0 ]; then
  finish 2 "prerequisites missing: ${missing[*]}"
fi

# --- build --------------------------------------------------------------------------------
section "Build"
mkdir -p "$log_dir"
stage="$build/python"
t0=$(date +%s)
generator=()
have ninja && generator=(-G Ninja)
pybind11_dir=$("$python" -c "import pybind11; print(pybind11.get_cmake_dir())")
if [ -f "$build/CMakeCache.txt" ] && ! { grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$root" "$build/CMakeCache.txt" &&
    grep -qx "CMAKE_CACHEFILE_DIR:INTERNAL=$build" "$build/CMakeCache.txt"; }; then
  rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"  # made at another path: configure anew
fi
( timeout "$build_timeout" cmake -S . -B "$build" "${generator[@]}" -DFUSEDOPT_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$stage/fusedopt" \
    -Dpybind11_DIR="$pybind11_dir" &&
  timeout "$build_timeout" cmake --build "$build" -j "$(nproc)" ) >"$log_dir/build.log" 2>&1
build_status=$?
outcome() {  # "ok", "FAILED (status N)" or "TIMED OUT (limit N s)"
  case "$1" in
    0) echo ok ;;
    124|137) echo "TIMED OUT (limit $2 s)" ;;
    *) echo "FAILED (status $1)" ;;
  esac
}
say "- build: $(outcome $build_status "$build_timeout"), $(( $(date +%s) - t0 )) s, architectures $arch"
if [ $build_status != 0 ]; then
  tail -40 "$log_dir/build.log" | block
  finish 1 "the build failed"
fi
cp python/fusedopt/*.py "$stage/fusedopt/"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
"$python" - <<'PY' 2>&1 | block
import fusedopt
from fusedopt import _cuda
print(f"fusedopt from {fusedopt.__file__}")
print(f"CUDA runtime (static): {_cuda.cuda_runtime_version}, driver supports: {_cuda.driver_version()}")
print(f"devices: {_cuda.device_count()}; cuda_available: {fusedopt.cuda_available()}; "
      f"reason: {fusedopt.cuda_unavailable_reason()}")
PY
reason=$("$python" -c "import fusedopt; print(fusedopt.cuda_unavailable_reason() or '')" 2>&1)
if [ -n "$reason" ]; then
  finish 1 "the module was built but finds no usable GPU: $reason"
fi

# --- tests --------------------------------------------------------------------------------
section "Tests"
t0=$(date +%s)
FUSEDOPT_REQUIRE_CUDA=1 timeout "$test_timeout" "$python" -m pytest -q -rfEs -p no:cacheprovider \
  --junitxml="$log_dir/tests.xml" tests/test_cuda.py >"$log_dir/tests.log" 2>&1
test_status=$?
FUSEDOPT_REQUIRE_CUDA=1 timeout 60 "$python" -m pytest -q -rfEs -p no:cacheprovider -m cuda \
  tests/test_interop.py >"$log_dir/interop.log" 2>&1
interop_status=$?
[ $interop_status = 5 ] && interop_status=0  # none selected
say "- tests/test_cuda.py: $(outcome $test_status "$test_timeout"), $(( $(date +%s) - t0 )) s"
tail -1 "$log_dir/tests.log" | block
say "- cuda tests of tests/test_interop.py: $(outcome $interop_status 60)"
tail -1 "$log_dir/interop.log" | block
if [ $test_status != 0 ]; then
  say ""
  say "Failures and errors (first 150 lines of pytest's summary):"
  sed -n '/short test summary info/,$p' "$log_dir/tests.log" | head -150 | block
  say ""
  say "Tracebacks (last 150 lines):"
  grep -v '^\(PASSED\|SKIPPED\)' "$log_dir/tests.log" | tail -150 | block
else
  say ""
  say "Skipped (reasons):"
  grep '^SKIPPED' "$log_dir/tests.log" | head -40 | block
fi

# --- benchmark ----------------------------------------------------------------------------
section "Benchmark (short form)"
t0=$(date +%s)
bench_status=0
if [ -n "$cupy_line" ]; then
  deadline=$(( $(date +%s) + bench_timeout ))
  timeout "$bench_timeout" "$python" benchmarks/bench_gpu.py --algos adam,sgd_momentum \
    --workloads 256M,gpt2 --repeats 5 --json "$log_dir/bench.json" >"$log_dir/bench.log" 2>&1
  bench_status=$?
  block <"$log_dir/bench.log"
  left=$(( deadline - $(date +%s) ))
  if [ $bench_status = 0 ] && [ $left -gt 10 ] && [ $torch_cuda = 1 ]; then
    timeout "$left" "$python" benchmarks/bench_gpu.py --mixed --elements 67108864 --repeats 5 \
      >"$log_dir/bench_mixed.log" 2>&1
    mixed_status=$?
    say "- --mixed: status $mixed_status"
    block <"$log_dir/bench_mixed.log"
    [ $mixed_status != 0 ] && bench_status=$mixed_status
  fi
else
  say "- not run: the GPU benchmark needs CuPy"
fi
say "- benchmark: $(outcome $bench_status "$bench_timeout"), $(( $(date +%s) - t0 )) s"

if [ $test_status != 0 ] || [ $interop_status != 0 ] || [ $bench_status != 0 ]; then
  finish 1 "tests $test_status, interop tests $interop_status, benchmark $bench_status"
fi
finish 0 "build, tests and benchmark passed"
