// One instantiation of every rule for every storage dtype, compiled once per
// instruction set (the build defines FO_ISA_NS and the target flags); the
// bindings pick the best set the running CPU supports.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/layouts.h"
#include "../core/rules.h"
#include "driver.h"
#include "factored.h"
#include "kernels.h"
#include "quant_driver.h"
#include "per_tensor.h"
#include "reduce.h"
#include "rows.h"

namespace fo::cpu::FO_ISA_NS {

bool launch(std::string_view kernel, const Layout& layout, const Table& t, const double* hyper,
            std::int64_t nhyper, const Mode& mode, int max_threads) {
  return with_rule(kernel, [&](auto rule) {
    using Rule = decltype(rule);
    using Hyper = typename Rule::Hyper;
    const std::int64_t size = hyper_size<Rule>();
    const bool per_tensor = nhyper == size * t.n && t.n > 1;
    if (nhyper != size && !per_tensor)
      throw std::invalid_argument(std::string(kernel) + ": expected " + std::to_string(size) +
                                  " hyperparameters (or " + std::to_string(size) +
                                  " per tensor), got " + std::to_string(nhyper));
    // Hyper is a plain struct of doubles: copy it out of the caller's array
    std::vector<Hyper> h(per_tensor ? std::size_t(t.n) : 1);
    std::memcpy(h.data(), hyper, h.size() * sizeof(Hyper));
    for (Hyper& one : h) Rule::at_step(one, mode.step);
    const bool known = with_layout(layout.param, layout.state, layout.extra,
                                   [&](auto m, auto p, auto s, auto x) {
      using M = decltype(m);
      using P = decltype(p);
      using S = decltype(s);
      constexpr Extra X = decltype(x)::value;
      constexpr bool E = decltype(x)::ema;
      if constexpr (E && !TakesEma<Rule>::value) {
        throw std::invalid_argument(std::string(kernel) + ": this kernel has no EMA slot");
      } else if constexpr (std::is_same_v<S, q8>) {
        if constexpr (Rule::kStates > 0 && reduce_count<Rule>() == 0)
          run_q8<Rule, M, X, P>(t, h.data(), per_tensor, mode, max_threads);
        else
          throw std::invalid_argument(std::string(kernel) +
                                      ": no 8-bit state for this rule (no state, or two passes)");
      } else if constexpr (reduce_count<Rule>() > 0) {
        // two passes: every tensor's sums, then the update with each tensor's Hyper
        // completed from them (csrc/core/two_pass.h)
        constexpr int R = reduce_count<Rule>();
        const std::vector<double> sums =
            reduce_per_tensor<Rule, M, X, P, S>(t, h.data(), per_tensor, mode, max_threads);
        std::vector<Hyper> ht(std::size_t(t.n));
        for (std::int64_t j = 0; j < t.n; ++j) {
          ht[std::size_t(j)] = h[per_tensor ? std::size_t(j) : 0];
          Rule::finish(ht[std::size_t(j)], sums.data() + std::size_t(j) * R);
        }
        run<Rule, M, X, E, P, S>(t, ht.data(), true, mode, max_threads);
      } else {
        run<Rule, M, X, E, P, S>(t, h.data(), per_tensor, mode, max_threads);
      }
    });
    if (!known)
      throw std::invalid_argument(std::string(kernel) + ": unsupported storage layout (param " +
                                  std::to_string(layout.param) + ", state " +
                                  std::to_string(layout.state) + ", extra " +
                                  std::to_string(layout.extra) + ")");
  });
}

bool launch_rows(std::string_view kernel, const Layout& layout, const Table& t,
                 const RowsTable& r, const double* hyper, std::int64_t nhyper, const Mode& mode,
                 int max_threads) {
  return with_rule(kernel, [&](auto rule) {
    using Rule = decltype(rule);
    using Hyper = typename Rule::Hyper;
    const std::int64_t size = hyper_size<Rule>();
    const bool per_tensor = nhyper == size * t.n && t.n > 1;
    if (nhyper != size && !per_tensor)
      throw std::invalid_argument(std::string(kernel) + ": expected " + std::to_string(size) +
                                  " hyperparameters (or " + std::to_string(size) +
                                  " per tensor), got " + std::to_string(nhyper));
    std::vector<Hyper> h(per_tensor ? std::size_t(t.n) : 1);
    std::memcpy(h.data(), hyper, h.size() * sizeof(Hyper));
    for (Hyper& one : h) Rule::at_step(one, mode.step);
    const bool known = with_layout(layout.param, layout.state, layout.extra,
                                   [&](auto m, auto p, auto s, auto x) {
      if constexpr (decltype(x)::ema || !TakesEma<Rule>::value ||
                    std::is_same_v<decltype(s), q8> || reduce_count<Rule>() > 0)
        throw std::invalid_argument(std::string(kernel) + ": no row-sparse kernel in this layout");
      else
        run_rows<Rule, decltype(m), decltype(x)::value, decltype(p), decltype(s)>(
            t, r, h.data(), per_tensor, mode, max_threads);
    });
    if (!known)
      throw std::invalid_argument(std::string(kernel) + ": unsupported storage layout (param " +
                                  std::to_string(layout.param) + ", state " +
                                  std::to_string(layout.state) + ", extra " +
                                  std::to_string(layout.extra) + ")");
  });
}

bool launch_factored(std::string_view kernel, const Layout& layout, const Table& t,
                     const FactoredShape* shape, const double* hyper, std::int64_t nhyper,
                     const Mode& mode, int max_threads) {
  return with_factored_rule(kernel, [&](auto rule) {
    using Rule = decltype(rule);
    using Hyper = typename Rule::Hyper;
    const std::int64_t size = hyper_size<Rule>();
    if (nhyper != size)
      throw std::invalid_argument(std::string(kernel) + ": expected " + std::to_string(size) +
                                  " hyperparameters, got " + std::to_string(nhyper));
    Hyper h;
    std::memcpy(&h, hyper, sizeof(Hyper));
    Rule::at_step(h, mode.step);
    bool ran = false;
    if (layout.extra == 0)
      with_layout(layout.param, layout.state, 0, [&](auto m, auto p, auto s, auto x) {
        if constexpr (decltype(x)::value == Extra::None && !decltype(x)::ema &&
                      !std::is_same_v<decltype(s), q8>) {
          run_adafactor<decltype(m), decltype(p), decltype(s)>(t, shape, h, mode, max_threads);
          ran = true;
        }
      });
    if (!ran)
      throw std::invalid_argument(std::string(kernel) + ": unsupported storage layout (param " +
                                  std::to_string(layout.param) + ", state " +
                                  std::to_string(layout.state) + ", extra " +
                                  std::to_string(layout.extra) + ")");
  });
}

// `f` called with a null pointer of the storage type of `dtype`.
template <class F>
double with_storage(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(static_cast<float*>(nullptr));
    case DType::Float64: return f(static_cast<double*>(nullptr));
    case DType::Float16: return f(static_cast<f16*>(nullptr));
    case DType::BFloat16: return f(static_cast<bf16*>(nullptr));
  }
  throw std::invalid_argument(std::string(name) + ": unsupported dtype");
}

double dot(DType dtype, const Table& t, int max_threads) {
  return with_storage(dtype, "dot", [&](auto* tag) {
    return dot<std::remove_pointer_t<decltype(tag)>>(t, max_threads);
  });
}

double sumsq(DType dtype, const Table& t, int max_threads) {
  return with_storage(dtype, "sumsq", [&](auto* tag) {
    return sumsq<std::remove_pointer_t<decltype(tag)>>(t, max_threads);
  });
}

int vector_bits() { return vector_bits<>(); }

// Threads for n elements of quantize/dequantize: one below 2 x kMinPerThread elements,
// where starting a team costs more than it saves.
int quant_threads(std::int64_t n, int max_threads) {
  return int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, n / kMinPerThread)));
}

void quantize(bool is_signed, const float* x, std::int64_t n, q8* codes, float* scales,
              int max_threads) {
  const std::int64_t blocks = quant_blocks(n);
  const int nt = quant_threads(n, max_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t at = b * kQuantBlock, m = std::min<std::int64_t>(kQuantBlock, n - at);
    if (is_signed)
      encode_block<true>(x + at, m, codes + at, scales + b, kQuantSigned);
    else
      encode_block<false>(x + at, m, codes + at, scales + b, kQuantUnsigned);
  }
}

void dequantize(bool is_signed, const q8* codes, const float* scales, std::int64_t n, float* out,
                int max_threads) {
  const std::int64_t blocks = quant_blocks(n);
  const float* table = is_signed ? kQuantSigned.code : kQuantUnsigned.code;
  const int nt = quant_threads(n, max_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t at = b * kQuantBlock, m = std::min<std::int64_t>(kQuantBlock, n - at);
    // decode_block stores whole vectors to aligned memory: decode into a buffer
    alignas(64) float buf[kQuantBlock];
    decode_block(codes + at, scales[b], table, buf, m);
    std::copy(buf, buf + m, out + at);
  }
}

}  // namespace fo::cpu::FO_ISA_NS
