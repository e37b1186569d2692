// The sum of one double per thread over a block, in a fixed order (no atomics): the
// same value on every run. Shared by the reductions of this module.
#pragma once

#include <cuda_runtime.h>

#include "runtime.cuh"

namespace fo::cuda {

// The sum of v over the threads of the block, in a fixed order; valid in every
// thread. Every thread of the block must call it; it may be called again at once.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double buf[kBlockThreads];
  __syncthreads();  // a previous call's readers are done with buf
  buf[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int width = kBlockThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) buf[threadIdx.x] += buf[threadIdx.x + width];
    __syncthreads();
  }
  return buf[0];
}

}  // namespace fo::cuda
