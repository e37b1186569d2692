// The CUDA driver of factored second moments (Adafactor; the CPU's is csrc/cpu/factored.h,
// whose passes and work items this follows): five kernels enqueued on the call's stream,
// nothing read back by the host.
//   pass1    one block per work item: row sums of g^2 (per row), the item's column sums
//            and sum of p^2; a vector's second moment moved, its item's sum of u^2;
//   factors  one block per matrix: the column sums combined in item order, the factors
//            moved, the mean row factor;
//   pass2    one block per item of a matrix: the item's sum of u^2;
//   coef     one block per tensor: the step's coefficient from the sums in item order;
//   pass3    one block per item: the step.
// Block sums are tree reductions in shared memory with a fixed shape: the same bits on
// every run (not the CPU's bits: the association differs).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/adafactor.h"
#include "runtime.cuh"

namespace fo::cuda {

struct FactoredTensor {
  std::uint64_t p, g, r, c;  // param, gradient, row factors (or a vector's moment), columns
  std::int64_t batch, rows, cols;  // rows == 0: a vector of cols elements
  std::int64_t row_at, mat_at;     // offsets of its row sums and of its matrices' rbar
  std::int64_t first_item, end_item;
};

struct FactoredWork {
  std::int64_t j, b, r0, r1, cols_at;
};

constexpr int kFactoredThreads = 256;

// Sum of `x` over the block (every thread passes its value; all threads get the sum).
__device__ __forceinline__ double block_total(double x, double* shared) {
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int half = kFactoredThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

template <class M, class P, class S>
__global__ void __launch_bounds__(kFactoredThreads)
    factored_pass1(const FactoredTensor* tensors, const FactoredWork* items, AdafactorHyper h,
                   double grad_scale, double* row_sum, double* col_sum, double* p_part,
                   double* u_part) {
  using A = Adafactor;
  __shared__ double shared[kFactoredThreads];
  const FactoredWork it = items[blockIdx.x];
  const FactoredTensor t = tensors[it.j];
  const P* p = reinterpret_cast<const P*>(t.p);
  const P* g = reinterpret_cast<const P*>(t.g);
  const M gs = M(grad_scale);
  if (t.rows == 0) {
    S* v = reinterpret_cast<S*>(t.r);
    double ps = 0.0, us = 0.0;
    for (std::int64_t i = it.r0 + threadIdx.x; i < it.r1; i += blockDim.x) {
      const M gi = A::grad(h, load<M>(g[i]) * gs);
      const S vi = Store<S>::template apply<false>(A::moved(h, load<M>(v[i]), gi * gi), 0);
      v[i] = vi;
      const double x = load<double>(p[i]);
      const double u = double(A::update(h, gi, load<M>(vi)));
      ps += x * x;
      us += u * u;
    }
    ps = block_total(ps, shared);
    us = block_total(us, shared);
    if (threadIdx.x == 0) {
      p_part[blockIdx.x] = ps;
      u_part[blockIdx.x] = us;
    }
    return;
  }
  double* cols = col_sum + it.cols_at;
  for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) cols[c] = 0.0;
  double ps = 0.0;
  for (std::int64_t i = it.r0; i < it.r1; ++i) {
    const std::int64_t at = (it.b * t.rows + i) * t.cols;
    double rs = 0.0;
    for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
      const double x = double(A::grad(h, load<M>(g[at + c]) * gs));
      const double y = load<double>(p[at + c]);
      rs += x * x;
      cols[c] += x * x;  // (each column's sum belongs to one thread)
      ps += y * y;
    }
    rs = block_total(rs, shared);
    if (threadIdx.x == 0) row_sum[t.row_at + it.b * t.rows + i] = rs;
  }
  ps = block_total(ps, shared);
  if (threadIdx.x == 0) p_part[blockIdx.x] = ps;
}

template <class M, class S>
__global__ void __launch_bounds__(kFactoredThreads)
    factored_factors(const FactoredTensor* tensors, const std::int64_t* matrix_tensor,
                     const FactoredWork* items, AdafactorHyper h, const double* row_sum,
                     const double* col_sum, double* rbar) {
  using A = Adafactor;
  __shared__ double shared[kFactoredThreads];
  const std::int64_t j = matrix_tensor[blockIdx.x];
  const FactoredTensor t = tensors[j];
  const std::int64_t b = std::int64_t(blockIdx.x) - t.mat_at;
  S* cf = reinterpret_cast<S*>(t.c) + b * t.cols;
  S* rf = reinterpret_cast<S*>(t.r) + b * t.rows;
  for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
    double total = 0.0;
    for (std::int64_t k = t.first_item; k < t.end_item; ++k)
      if (items[k].b == b) total += col_sum[items[k].cols_at + c];
    cf[c] = Store<S>::template apply<false>(
        A::moved(h, load<M>(cf[c]), A::mean_square<M>(total, double(t.rows))), 0);
  }
  double mean = 0.0;
  const double* rs = row_sum + t.row_at + b * t.rows;
  for (std::int64_t i = threadIdx.x; i < t.rows; i += blockDim.x) {
    const S ri = Store<S>::template apply<false>(
        A::moved(h, load<M>(rf[i]), A::mean_square<M>(rs[i], double(t.cols))), 0);
    rf[i] = ri;
    mean += load<double>(ri);
  }
  mean = block_total(mean, shared);
  if (threadIdx.x == 0) {
    const M m = M(mean / double(t.rows)), floor = M(h.eps1);
    rbar[blockIdx.x] = double(m < floor ? floor : m);
  }
}

template <class M, class P, class S>
__global__ void __launch_bounds__(kFactoredThreads)
    factored_pass2(const FactoredTensor* tensors, const FactoredWork* items, AdafactorHyper h,
                   double grad_scale, const double* rbar, double* u_part) {
  using A = Adafactor;
  __shared__ double shared[kFactoredThreads];
  const FactoredWork it = items[blockIdx.x];
  const FactoredTensor t = tensors[it.j];
  if (t.rows == 0) return;  // (a vector's sum was taken in pass 1)
  const P* g = reinterpret_cast<const P*>(t.g);
  const S* rf = reinterpret_cast<const S*>(t.r) + it.b * t.rows;
  const S* cf = reinterpret_cast<const S*>(t.c) + it.b * t.cols;
  const M rb = M(rbar[t.mat_at + it.b]), gs = M(grad_scale);
  double us = 0.0;
  for (std::int64_t i = it.r0; i < it.r1; ++i) {
    const std::int64_t at = (it.b * t.rows + i) * t.cols;
    const M ri = load<M>(rf[i]);
    for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
      const M gi = A::grad(h, load<M>(g[at + c]) * gs);
      const double u = double(A::update(h, gi, A::estimate(ri, load<M>(cf[c]), rb)));
      us += u * u;
    }
  }
  us = block_total(us, shared);
  if (threadIdx.x == 0) u_part[blockIdx.x] = us;
}

// A template, like the other kernels of this header: kernels.cu is compiled into one
// object per group of layouts, and a plain __global__ function defined here would be
// defined in each of them (a duplicate symbol when the module is linked).
template <int = 0>
__global__ void factored_coef(const FactoredTensor* tensors, AdafactorHyper h,
                              const double* p_part, const double* u_part, double* coef) {
  if (threadIdx.x != 0) return;
  const FactoredTensor t = tensors[blockIdx.x];
  double ps = 0.0, us = 0.0;
  for (std::int64_t k = t.first_item; k < t.end_item; ++k) {
    ps += p_part[k];
    us += u_part[k];
  }
  const double numel = t.rows == 0 ? double(t.cols) : double(t.batch * t.rows * t.cols);
  const double root = pow(numel, 0.5);
  const double rms = sqrt(ps) / root;
  const double alpha = (h.eps2 > rms ? h.eps2 : rms) * h.rho;
  const double ratio = sqrt(us) / (root * h.d);
  coef[blockIdx.x] = -alpha / (ratio > 1.0 ? ratio : 1.0);
}

template <class M, class P, class S>
__global__ void __launch_bounds__(kFactoredThreads)
    factored_pass3(const FactoredTensor* tensors, const FactoredWork* items, AdafactorHyper h,
                   double grad_scale, const double* rbar, const double* coef) {
  using A = Adafactor;
  const FactoredWork it = items[blockIdx.x];
  const FactoredTensor t = tensors[it.j];
  P* p = reinterpret_cast<P*>(t.p);
  const P* g = reinterpret_cast<const P*>(t.g);
  const M gs = M(grad_scale), cj = M(coef[it.j]);
  const M shrink = M(h.weight_decay != 0.0 ? 1.0 - h.lr * h.weight_decay : 1.0);
  if (t.rows == 0) {
    const S* v = reinterpret_cast<const S*>(t.r);
    for (std::int64_t i = it.r0 + threadIdx.x; i < it.r1; i += blockDim.x) {
      const M u = A::update(h, A::grad(h, load<M>(g[i]) * gs), load<M>(v[i]));
      p[i] = Store<P>::template apply<false>(A::step(load<M>(p[i]), u, shrink, cj), 0);
    }
    return;
  }
  const S* rf = reinterpret_cast<const S*>(t.r) + it.b * t.rows;
  const S* cf = reinterpret_cast<const S*>(t.c) + it.b * t.cols;
  const M rb = M(rbar[t.mat_at + it.b]);
  for (std::int64_t i = it.r0; i < it.r1; ++i) {
    const std::int64_t at = (it.b * t.rows + i) * t.cols;
    const M ri = load<M>(rf[i]);
    for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
      const M u = A::update(h, A::grad(h, load<M>(g[at + c]) * gs),
                            A::estimate(ri, load<M>(cf[c]), rb));
      p[at + c] = Store<P>::template apply<false>(A::step(load<M>(p[at + c]), u, shrink, cj), 0);
    }
  }
}

}  // namespace fo::cuda
