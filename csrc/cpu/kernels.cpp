// One instantiation of every rule for every storage dtype, compiled once per
// instruction set (the build defines FO_ISA_NS and the target flags); the
// bindings pick the best set the running CPU supports.
#include <cstring>
#include <stdexcept>
#include <string>

#include "../core/rules.h"
#include "driver.h"
#include "kernels.h"
#include "reduce.h"

namespace fo::cpu::FO_ISA_NS {

bool launch(std::string_view kernel, DType dtype, const Table& t, const double* hyper,
            int nhyper, int max_threads) {
  return with_rule(kernel, [&](auto rule) {
    using Rule = decltype(rule);
    if (nhyper != hyper_size<Rule>())
      throw std::invalid_argument(std::string(kernel) + ": expected " +
                                  std::to_string(hyper_size<Rule>()) +
                                  " hyperparameters, got " + std::to_string(nhyper));
    typename Rule::Hyper h;
    std::memcpy(&h, hyper, sizeof(h));
    if (dtype == DType::Float32)
      run<Rule, float, float>(rule, t, h, max_threads);
    else
      run<Rule, double, double>(rule, t, h, max_threads);
  });
}

double dot(DType dtype, const Table& t, int max_threads) {
  return dtype == DType::Float32 ? cpu::dot<float>(t, max_threads)
                                 : cpu::dot<double>(t, max_threads);
}

}  // namespace fo::cpu::FO_ISA_NS
