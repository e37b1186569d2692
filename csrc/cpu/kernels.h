// Entry points of the CPU kernels, one namespace per instruction set.
#pragma once

#include <cstdint>
#include <string_view>

#include "../core/layouts.h"
#include "../core/rules.h"
#include "table.h"

namespace fo::cpu {

// Storage dtype codes of a call (fo::DType) and its extra buffer (0 none, 1 master, 2 Kahan).
struct Layout {
  int param, state, extra;
};

#define FO_DECLARE_LAUNCH(ns)                                                           \
  namespace ns {                                                                        \
  bool launch(std::string_view kernel, const Layout& layout, const Table& t,             \
              const double* hyper, std::int64_t nhyper, const Mode& mode, int max_threads); \
  bool launch_rows(std::string_view kernel, const Layout& layout, const Table& t,        \
                   const RowsTable& r, const double* hyper, std::int64_t nhyper,         \
                   const Mode& mode, int max_threads);                                  \
  bool launch_factored(std::string_view kernel, const Layout& layout, const Table& t,    \
                       const FactoredShape* shape, const double* hyper,                  \
                       std::int64_t nhyper, const Mode& mode, int max_threads);          \
  double dot(DType dtype, const Table& t, int max_threads);                             \
  double sumsq(DType dtype, const Table& t, int max_threads);                           \
  int vector_bits();                                                                    \
  void quantize(bool is_signed, const float* x, std::int64_t n, q8* codes, float* scales,  \
                int max_threads);                                                       \
  void dequantize(bool is_signed, const q8* codes, const float* scales, std::int64_t n,   \
                  float* out, int max_threads);                                         \
  }
FO_DECLARE_LAUNCH(isa_avx512)
FO_DECLARE_LAUNCH(isa_avx2)
FO_DECLARE_LAUNCH(isa_base)
#undef FO_DECLARE_LAUNCH

}  // namespace fo::cpu
