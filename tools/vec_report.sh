#!/bin/sh
# Compiler launcher for the AVX2 kernels when FUSEDOPT_VEC_REPORT_FILE is set
# (CMakeLists.txt): `vec_report.sh REPORT COMPILER ARGS...` empties REPORT, then
# compiles with GCC's whole vectorization report written to it (GCC appends to
# the file it is given, so without this a rebuild would add to the last report).
report=$1
shift
: > "$report" || exit 1
exec "$@" "-fopt-info-vec-all=$report"
