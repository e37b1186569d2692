// Entry points of the CPU kernels, one namespace per instruction set.
#pragma once

#include <cstdint>
#include <string_view>

#include "../core/rules.h"
#include "driver.h"

namespace fo::cpu {

#define FO_DECLARE_LAUNCH(ns)                                                           \
  namespace ns {                                                                        \
  bool launch(std::string_view kernel, DType dtype, const Table& t, const double* hyper, \
              std::int64_t nhyper, int max_threads);                                    \
  double dot(DType dtype, const Table& t, int max_threads);                             \
  }
FO_DECLARE_LAUNCH(isa_avx512)
FO_DECLARE_LAUNCH(isa_avx2)
FO_DECLARE_LAUNCH(isa_base)
#undef FO_DECLARE_LAUNCH

}  // namespace fo::cpu
