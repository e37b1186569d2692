#!/bin/sh
# Compiler launcher for the AVX2 kernels when FUSEDOPT_VEC_REPORT_FILE is set
# (CMakeLists.txt), and for tests/test_vectorized.py's own compile where there is no
# such report: `vec_report.sh REPORT COMPILER ARGS...` empties REPORT, then
# compiles with GCC's vectorization report (the loops vectorized and the loops
# missed) written to it. GCC appends to the file it is given: without the
# emptying, a rebuild would add to the last build's report.
report=$1
shift
: > "$report" || exit 1
exec "$@" "-fopt-info-vec-optimized-missed=$report"
