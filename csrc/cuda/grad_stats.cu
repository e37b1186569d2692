// Gradient statistics for loss scaling and norm clipping, in one pass over the
// gradients, and the device-side step counter that goes with them.
//
// grad_stats runs the multi-tensor launcher over each gradient table (one per
// dtype) with an operation that sums g^2 in double and marks non-finite elements:
// each block adds its elements in a fixed order per thread and the threads' sums in
// a fixed tree, and writes one partial sum per block; a second kernel adds the
// partials of every table in the same fixed way and writes {skip, coef, norm}. No
// floating-point atomics: the result is the same on every run. The step kernels
// read {skip, coef} on the device (scale_ptr), so a loss-scaled, clipped step needs
// no host round trip. The formulas are the host's (fusedopt._precision).
#include <cmath>
#include <string>
#include <vector>

#include "../core/precision.h"
#include "block_sum.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"
#include "update_functor.cuh"

namespace fo::cuda {
namespace {

template <class T>
struct SumSquares {
  static constexpr int kVec = 16 / int(sizeof(T));
  double* partial;  // one sum of squares per block of this table's launches
  double* marks;    // per block: 0, or NaN when the block holds an inf or a NaN

  // acc gathers g^2; mark gathers g * 0, which is 0 for every finite g and NaN
  // (for good) once an inf or NaN was seen: the sum of squares alone cannot tell
  // finite float64 gradients beyond 1e154 (whose squares overflow) from an inf.
  __device__ __forceinline__ static void add(double& acc, double& mark, T g) {
    const double x = load<double>(g);
    acc += x * x;
    mark += x * 0.0;
  }

  __device__ __forceinline__ const SumSquares* begin_block(std::int64_t) const { return this; }

  __device__ __forceinline__ void operator()(const SumSquares*, void* const* ptr, std::int64_t,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t block) const {
    const T* g = static_cast<const T*>(ptr[0]);
    double acc = 0.0, mark = 0.0;
    std::int64_t vend = begin;
    if (std::uintptr_t(g) % 16 == 0) {
      vend = begin + (end - begin) / kVec * kVec;
      const std::int64_t stride = std::int64_t(blockDim.x) * kVec;
      for (std::int64_t i = begin + std::int64_t(threadIdx.x) * kVec; i < vend; i += stride) {
        const Vec<T, kVec> gv = *reinterpret_cast<const Vec<T, kVec>*>(g + i);
#pragma unroll
        for (int l = 0; l < kVec; ++l) add(acc, mark, gv.v[l]);
      }
    }
    for (std::int64_t i = vend + threadIdx.x; i < end; i += blockDim.x) add(acc, mark, g[i]);
    const double sum = block_sum(acc);
    const double marked = block_sum(mark);
    if (threadIdx.x == 0) {
      partial[block] = sum;
      marks[block] = marked;
    }
  }
};

__global__ void __launch_bounds__(kBlockThreads)
    finish_grad_stats(const double* partial, const double* marks, std::int64_t count,
                      double* out, double inv_scale, double max_norm, int skip_nonfinite) {
  double acc = 0.0, mark = 0.0;
  for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    acc += partial[i];
    mark += marks[i];
  }
  const double sum = block_sum(acc);
  const double marked = block_sum(mark);
  if (threadIdx.x == 0) {
    // inf for inf gradients (or an overflowing sum), NaN for NaN ones
    const double norm = std::sqrt(sum) * inv_scale;
    const bool skip = skip_nonfinite != 0 && marked != 0.0;  // NaN != 0
    double coef = inv_scale;
    if (!skip && max_norm > 0.0) {
      // torch.nn.utils.clip_grad_norm_'s coefficient, clamped to 1; an infinite norm
      // gives 0 and a NaN norm NaN, which the update then propagates
      const double clip = max_norm / (norm + 1e-6);
      coef *= !(clip >= 1.0) ? clip : 1.0;
    }
    out[0] = skip ? 1.0 : 0.0;
    out[1] = coef;
    out[2] = norm;
  }
}

__global__ void advance_step_kernel(double* count, const double* scale) {
  const bool skip = scale != nullptr && scale[0] != 0.0;
  *count += skip ? 0.0 : 1.0;
}

template <class T>
void sum_squares(const std::string& name, const StatsTable& t, cudaStream_t stream,
                 double* partial, double* marks) {
  multi_tensor_apply<1>(name, stream, t.ptrs, t.sizes, t.n, SumSquares<T>{partial, marks});
}

const char* stats_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "grad_stats[float32]";
    case DType::Float64: return "grad_stats[float64]";
    case DType::Float16: return "grad_stats[float16]";
    case DType::BFloat16: return "grad_stats[bfloat16]";
  }
  return "grad_stats";
}

}  // namespace

void grad_stats(const std::vector<StatsTable>& tables, cudaStream_t stream, double* out,
                double inv_scale, double max_norm, bool skip_nonfinite) {
  std::vector<std::int64_t> first_block{0};  // table k's blocks start at first_block[k]
  for (const StatsTable& t : tables) {
    check_table(stats_name(t.dtype), t.sizes, t.n);
    first_block.push_back(first_block.back() + count_blocks(t.sizes, t.n));
  }
  const std::int64_t blocks = first_block.back();
  StreamBuffer partial(std::size_t(2 * blocks) * sizeof(double), stream, "grad_stats");
  double* sums = partial.get<double>();
  double* marks = sums + blocks;
  for (std::size_t k = 0; k < tables.size(); ++k) {
    const StatsTable& t = tables[k];
    const std::string name = stats_name(t.dtype);
    const std::int64_t at = first_block[k];
    switch (t.dtype) {
      case DType::Float32: sum_squares<float>(name, t, stream, sums + at, marks + at); break;
      case DType::Float64: sum_squares<double>(name, t, stream, sums + at, marks + at); break;
      case DType::Float16: sum_squares<f16>(name, t, stream, sums + at, marks + at); break;
      case DType::BFloat16: sum_squares<bf16>(name, t, stream, sums + at, marks + at); break;
    }
  }
  launch("grad_stats", finish_grad_stats, 1, kBlockThreads, stream,
         static_cast<const double*>(sums), static_cast<const double*>(marks), blocks, out,
         inv_scale, max_norm, skip_nonfinite ? 1 : 0);
}

void advance_step(double* count, const double* scale, cudaStream_t stream) {
  launch("advance_step", advance_step_kernel, 1, 1, stream, count, scale);
}

}  // namespace fo::cuda
