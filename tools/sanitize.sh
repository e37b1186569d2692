#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   tools/sanitize.sh                       # build, then the suite on every instruction set
#   tools/sanitize.sh --isa avx2 -- -k adam # one set, extra pytest arguments after --
#
# Builds fusedopt._cpu with -DFUSEDOPT_SANITIZE=ON into build/sanitize (never over the
# development build in python/fusedopt), stages the Python package with that module
# next to it, and runs pytest once per instruction set of the CPU kernels
# (FUSEDOPT_TEST_ISA, see tests/conftest.py) that this CPU has. Any ASan or UBSan
# report fails the run.
#
# Python is not built with ASan, so the ASan runtime is preloaded, and libstdc++ with
# it: python does not link libstdc++, and without it preloaded the first C++
# exception thrown inside the module (every bad-input test throws one) aborts the
# interpreter. pytest runs with --capture=sys: its default (fd) capture would hide the
# sanitizers' reports, which go to file descriptor 2, for tests that pass.
#
# Environment: PYTHON (default python3, with the test extra installed), CXX (the
# compiler; its libasan is preloaded), FUSEDOPT_SANITIZE_BUILD (default build/sanitize).
set -euo pipefail
cd "$(dirname "$0")/.."

isas=""
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --isa) isas="$2"; shift 2 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown argument $1 (pytest arguments go after --)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
cxx=${CXX:-c++}
build=${FUSEDOPT_SANITIZE_BUILD:-build/sanitize}
start=$(date +%s)

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
pybind11_dir=$("$python" -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_CXX_COMPILER="$cxx" \
  -DFUSEDOPT_SANITIZE=ON -DFUSEDOPT_CUDA=OFF \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/$build/lib" -Dpybind11_DIR="$pybind11_dir" >/dev/null
cmake --build "$build"
built=$(date +%s)

# the package as it is in the tree, with the sanitized module and no other build
stage="$build/python"
rm -rf "$stage"
mkdir -p "$stage"
cp -R python/fusedopt "$stage/"  # subpackages (algorithms, bench) and data files too
find "$stage/fusedopt" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cp "$build"/lib/_cpu*.so "$stage/fusedopt/"

libasan=$("$cxx" -print-file-name=libasan.so)
libstdcxx=$("$cxx" -print-file-name=libstdc++.so)
for lib in "$libasan" "$libstdcxx"; do
  if [ ! -e "$lib" ]; then echo "sanitize.sh: $lib not found (compiler: $cxx)" >&2; exit 1; fi
done
export LD_PRELOAD="$libasan:$libstdcxx"
# CPython frees little at exit: leak reports would be its own, not the module's.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:check_initialization_order=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$PWD/$stage${PYTHONPATH:+:$PYTHONPATH}"

# the module must be the sanitized one, linked with the ASan runtime
so=$(STAGE="$PWD/$stage" "$python" -c "
import os, fusedopt._cpu as c
assert c.__file__.startswith(os.environ['STAGE']), c.__file__
print(c.__file__)")
if ! nm -D "$so" | grep __asan_init >/dev/null; then echo "sanitize.sh: $so is not linked with ASan" >&2; exit 1; fi
echo "sanitized module: $so"
if [ -z "$isas" ]; then
  isas=$("$python" -c "
import fusedopt._cpu as c
ok = []
for isa in ('avx512', 'avx2', 'base'):
    try:
        c.set_isa(isa); ok.append(isa)
    except ValueError:
        pass
print(' '.join(ok))")
fi

status=0
for isa in $isas; do
  echo "=== ASan + UBSan, CPU kernels: $isa"
  t0=$(date +%s)
  if ! FUSEDOPT_TEST_ISA=$isa "$python" -m pytest -q --capture=sys -p no:cacheprovider \
       "${pytest_args[@]}"; then
    status=1
    echo "=== $isa: FAILED"
  fi
  echo "=== $isa: $(( $(date +%s) - t0 )) s"
done
echo "=== build $(( built - start )) s, total $(( $(date +%s) - start )) s"
exit $status
