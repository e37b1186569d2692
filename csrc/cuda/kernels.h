// Entry points of the CUDA kernels, compiled in several objects so that the
// build runs in parallel: one per parameter dtype, and for 16-bit parameters one
// per state dtype (cmake/cuda.cmake). The bindings validate a call and pick the
// object from its layout.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../core/layouts.h"
#include "../core/rules.h"

namespace fo::cuda {

// One validated step call. Every pointer in `ptrs` and `scale`/`count` is device
// memory of the current device; `hyper` is host memory, one Hyper or one per tensor.
struct StepCall {
  std::string_view kernel;
  std::string name;  // the kernel and its layout, for error messages
  int param, state, extra;
  const std::uint64_t* ptrs;  // ptrs[slot * n + j]
  const std::int64_t* sizes;
  std::int64_t n;
  const double* hyper;
  bool per_tensor;
  Mode mode;
  cudaStream_t stream;
  const double* scale;  // {skip, coef, norm} written by grad_stats, or null
  const double* count;  // the step count t of this update, or null
};

// One validated row-sparse call: the StepCall's table holds the gradient rows in its
// gradient slot; rows[j] is the device address of tensor j's counts[j] distinct int64
// row indices, row_len[j] its elements per row (host arrays). No EMA slot, no device-side
// scale or step count.
struct RowsCall {
  StepCall step;
  const std::uint64_t* rows;
  const std::int64_t* counts;
  const std::int64_t* row_len;
};

// One validated factored call (Adafactor): the StepCall's table has 4 slots (param, grad,
// row factors or a vector's moment, column factors); shapes holds (batch, rows, cols)
// per tensor (host memory), rows 0 for a vector.
struct FactoredCall {
  StepCall step;
  const std::int64_t* shapes;
};

template <class T>
constexpr int dtype_code() {
  if constexpr (std::is_same_v<T, float>) return int(DType::Float32);
  if constexpr (std::is_same_v<T, double>) return int(DType::Float64);
  if constexpr (std::is_same_v<T, f16>) return int(DType::Float16);
  if constexpr (std::is_same_v<T, q8>) return int(DType::Int8Block);
  return int(DType::BFloat16);
}

// Whether this module has a kernel for the rule in the layout: every optimizer in
// every layout (8-bit state: every rule with states); the bandwidth probes (stream*)
// only where the benchmarks use them, float32, float64 and bfloat16 params with
// float32 states and master weights (without the EMA slot), which keeps the build time
// in check.
template <class Rule, Extra X, class P, class S, bool E = false>
constexpr bool is_built() {
  if constexpr (E && !TakesEma<Rule>::value) return false;
  if constexpr (std::is_same_v<S, q8>)
    return !E && Rule::kStates > 0 && !IsStreamProbe<Rule>::value;
  if constexpr (!IsStreamProbe<Rule>::value) return true;
  return !E && (std::is_same_v<P, float> || std::is_same_v<P, double> ||
                (std::is_same_v<P, bf16> && std::is_same_v<S, float> && X == Extra::Master));
}

#define FO_DECLARE_CUDA_STEP(ns)     \
  namespace ns {                     \
  void step(const StepCall& call);   \
  void step_rows(const RowsCall& call); \
  void step_factored(const FactoredCall& call); \
  }
FO_DECLARE_CUDA_STEP(variant_f32)
FO_DECLARE_CUDA_STEP(variant_f64)
FO_DECLARE_CUDA_STEP(variant_f16_f32)
FO_DECLARE_CUDA_STEP(variant_f16_bf16)
FO_DECLARE_CUDA_STEP(variant_bf16_f32)
FO_DECLARE_CUDA_STEP(variant_bf16_bf16)
FO_DECLARE_CUDA_STEP(variant_f32_q8)
FO_DECLARE_CUDA_STEP(variant_f16_q8)
FO_DECLARE_CUDA_STEP(variant_bf16_q8)
#undef FO_DECLARE_CUDA_STEP

// One gradient table of grad_stats: the gradients of one dtype.
struct StatsTable {
  DType dtype;
  const std::uint64_t* ptrs;  // n device addresses
  const std::int64_t* sizes;
  std::int64_t n;
};

// Sum of squares of every gradient of the tables, accumulated in double with a
// fixed association (no atomics): the same value on every run. Writes to the
// device memory `out`: out[2] = norm = sqrt(sum) * inv_scale; out[0] = 1 when
// skip_nonfinite and some gradient is inf or NaN (else 0); out[1] = the gradient
// multiplier inv_scale * min(1, max_norm / (norm + 1e-6)) when max_norm > 0, else
// inv_scale: the host's formulas (fusedopt._precision.grad_multiplier).
void grad_stats(const std::vector<StatsTable>& tables, cudaStream_t stream, double* out,
                double inv_scale, double max_norm, bool skip_nonfinite);

// *count += 1, unless scale is given and scale[0] (skip) is non-zero.
void advance_step(double* count, const double* scale, cudaStream_t stream);

}  // namespace fo::cuda
