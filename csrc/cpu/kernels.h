// Entry points of the CPU kernels, one namespace per instruction set.
#pragma once

#include <string_view>

#include "../core/rules.h"
#include "driver.h"

namespace fo::cpu {

#define FO_DECLARE_LAUNCH(ns)                                                           \
  namespace ns {                                                                        \
  bool launch(std::string_view kernel, DType dtype, const Table& t, const double* hyper, \
              int nhyper, int max_threads);                                             \
  double dot(DType dtype, const Table& t, int max_threads);                             \
  }
FO_DECLARE_LAUNCH(isa_avx512)
FO_DECLARE_LAUNCH(isa_avx2)
FO_DECLARE_LAUNCH(isa_base)
#undef FO_DECLARE_LAUNCH

}  // namespace fo::cpu
