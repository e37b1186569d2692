// Gradient statistics for loss scaling and norm clipping, in one pass over the
// gradients, and the device-side step counter that goes with them.
//
// grad_stats runs the multi-tensor launcher with an operation that sums
// (g * inv_scale)^2 in double: each block adds its elements in a fixed order per
// thread and the threads' sums in a fixed tree, and writes one partial sum per
// block; a second kernel adds the partials in the same fixed way and writes
// {skip, coef, norm}. No floating-point atomics: the result is the same on every
// run. The step kernels read {skip, coef} on the device (scale_ptr), so a loss-scaled,
// clipped step needs no host round trip.
#include <cmath>
#include <string>

#include "../core/precision.h"
#include "kernels.h"
#include "multi_tensor.cuh"
#include "update_functor.cuh"

namespace fo::cuda {
namespace {

// The sum of v over the threads of the block, in a fixed order; valid in thread 0.
// Every thread of the block must call it.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double buf[kBlockThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int width = kBlockThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) buf[threadIdx.x] += buf[threadIdx.x + width];
    __syncthreads();
  }
  return buf[0];
}

template <class T>
struct SumSquares {
  static constexpr int kVec = 16 / int(sizeof(T));
  double inv_scale;
  double* partial;  // one sum per block of the call

  __device__ __forceinline__ void add(double& acc, T g) const {
    const double x = load<double>(g) * inv_scale;
    acc += x * x;
  }

  __device__ __forceinline__ const SumSquares* begin_block(std::int64_t) const { return this; }

  __device__ __forceinline__ void operator()(const SumSquares*, void* const* ptr, std::int64_t,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t block) const {
    const T* g = static_cast<const T*>(ptr[0]);
    double acc = 0.0;
    std::int64_t vend = begin;
    if (std::uintptr_t(g) % 16 == 0) {
      vend = begin + (end - begin) / kVec * kVec;
      const std::int64_t stride = std::int64_t(blockDim.x) * kVec;
      for (std::int64_t i = begin + std::int64_t(threadIdx.x) * kVec; i < vend; i += stride) {
        const Vec<T, kVec> gv = *reinterpret_cast<const Vec<T, kVec>*>(g + i);
#pragma unroll
        for (int l = 0; l < kVec; ++l) add(acc, gv.v[l]);
      }
    }
    for (std::int64_t i = vend + threadIdx.x; i < end; i += blockDim.x) add(acc, g[i]);
    const double sum = block_sum(acc);
    if (threadIdx.x == 0) partial[block] = sum;
  }
};

__global__ void __launch_bounds__(kBlockThreads)
    finish_grad_stats(const double* partial, std::int64_t count, double* out, double inv_scale,
                      double max_norm) {
  double acc = 0.0;
  for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  const double sum = block_sum(acc);
  if (threadIdx.x == 0) {
    const double norm = std::sqrt(sum);
    // torch.nn.utils.clip_grad_norm_'s coefficient, clamped to 1. A sum that is
    // not finite means an inf or a NaN in some gradient: the step is to be skipped,
    // and the coefficient means nothing.
    const double clip = max_norm / (norm + 1e-6);
    const double coef = max_norm > 0.0 && clip < 1.0 ? clip : 1.0;
    out[0] = std::isfinite(sum) ? 0.0 : 1.0;
    out[1] = inv_scale * coef;
    out[2] = norm;
  }
}

__global__ void advance_step_kernel(double* count, const double* scale) {
  const bool skip = scale != nullptr && scale[0] != 0.0;
  *count += skip ? 0.0 : 1.0;
}

template <class T>
void run_grad_stats(const std::string& name, const std::uint64_t* ptrs, const std::int64_t* sizes,
                    std::int64_t n, cudaStream_t stream, double* out, double inv_scale,
                    double max_norm) {
  check_table(name, sizes, n);
  const std::int64_t blocks = count_blocks(sizes, n);
  StreamBuffer partial(std::size_t(blocks) * sizeof(double), stream, name);
  multi_tensor_apply<1>(name, stream, ptrs, sizes, n,
                        SumSquares<T>{inv_scale, partial.get<double>()});
  launch(name, finish_grad_stats, 1, kBlockThreads, stream,
         static_cast<const double*>(partial.get<double>()), blocks, out, inv_scale, max_norm);
}

}  // namespace

void grad_stats(DType dtype, const std::uint64_t* ptrs, const std::int64_t* sizes,
                std::int64_t n, cudaStream_t stream, double* out, double inv_scale,
                double max_norm) {
  switch (dtype) {
    case DType::Float32:
      return run_grad_stats<float>("grad_stats[float32]", ptrs, sizes, n, stream, out, inv_scale, max_norm);
    case DType::Float64:
      return run_grad_stats<double>("grad_stats[float64]", ptrs, sizes, n, stream, out, inv_scale, max_norm);
    case DType::Float16:
      return run_grad_stats<f16>("grad_stats[float16]", ptrs, sizes, n, stream, out, inv_scale, max_norm);
    case DType::BFloat16:
      return run_grad_stats<bf16>("grad_stats[bfloat16]", ptrs, sizes, n, stream, out, inv_scale, max_norm);
  }
  throw std::invalid_argument("grad_stats: unsupported dtype");
}

void advance_step(double* count, const double* scale, cudaStream_t stream) {
  launch("advance_step", advance_step_kernel, 1, 1, stream, count, scale);
}

}  // namespace fo::cuda
