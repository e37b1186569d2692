// The CPU driver of factored second moments (Adafactor, csrc/core/adafactor.h): per-tensor
// reductions over the rows and the columns of matrices, between elementwise passes.
//
// A tensor of the call is a stack of `batch` matrices of rows x cols elements (its last two
// dimensions), or, with rows == 0, an unfactored tensor of cols elements (a vector). Slots
// of the pointer table: 0 param, 1 gradient, 2 row factors (batch x rows) or the vector's
// second moment (cols), 3 column factors (batch x cols; a vector's is not read).
//
// One call is three passes over the elements, each split into fixed work items (blocks of
// rows of one matrix; ranges of a vector), each item summed on its own and the items
// combined in item order, so that no result depends on the thread count:
//   1. read p and g: the sums of g^2 along each row and, per item, along each column of
//      its rows, and the item's sum of p^2; a vector's second moment moves toward g^2
//      here (read and written), and the item's sum of its squared update is taken;
//   -  per matrix: the column sums combined, the factors moved, their mean row factor;
//   2. read g (matrices only): the item's sum of the squared update;
//   -  per tensor: the step's coefficient -alpha / denom;
//   3. read p and g (and a vector's second moment), write p: the step.
// Bytes per element (float32): matrices 8 + 4 + 12 = 24 (the factors are O(rows + cols));
// vectors 16 + 16 = 32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/adafactor.h"
#include "reduce.h"

#ifndef FO_ISA_NS
#error "factored.h belongs to the per-instruction-set kernels: define FO_ISA_NS"
#endif

namespace fo::cpu::FO_ISA_NS {

// reduce.h's block_sum (fixed lanes, the same bits for every vector width), inlined so
// that the rows' sums vectorize inside the passes' loops.
template <class Term>
inline __attribute__((always_inline)) double lane_sum(std::int64_t lo, std::int64_t hi,
                                                      const Term& term) {
  double acc[kLanes] = {};
  std::int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  }
  for (int l = 0; i < hi; ++i, ++l) acc[l] += term(i);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// A work item: rows [r0, r1) of matrix b of tensor j (a vector: elements [r0, r1)).
struct FactoredItem {
  std::int64_t j, b, r0, r1;
  std::int64_t cols_at;  // offset of its column sums in the scratch (matrices)
};

template <class M, class P, class S>
void run_adafactor(const Table& t, const FactoredShape* shape, const AdafactorHyper& h,
                   const Mode& mode, int max_threads) {
  using A = Adafactor;
  const std::int64_t n = t.n;
  auto slot = [&](int k, std::int64_t j) { return t.ptrs[k * n + j]; };
  std::vector<FactoredItem> items;
  const std::size_t nn = static_cast<std::size_t>(n);
  std::vector<std::int64_t> first_item(nn + 1, 0), row_at(nn + 1, 0), mat_at(nn + 1, 0),
      numel(nn, 0);
  std::int64_t cols_scratch = 0, rows_total = 0, mats_total = 0, numel_total = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    const FactoredShape& s = shape[j];
    first_item[j] = std::int64_t(items.size());
    row_at[j] = rows_total;
    mat_at[j] = mats_total;
    if (s.rows == 0) {
      for (std::int64_t lo = 0; lo < s.cols; lo += kBlock)
        items.push_back({j, 0, lo, std::min(lo + kBlock, s.cols), 0});
      numel[j] = s.cols;
    } else {
      const std::int64_t per =
          std::clamp<std::int64_t>(kBlock / std::max<std::int64_t>(1, s.cols), 1, s.rows);
      for (std::int64_t b = 0; b < s.batch; ++b)
        for (std::int64_t r0 = 0; r0 < s.rows; r0 += per) {
          items.push_back({j, b, r0, std::min(r0 + per, s.rows), cols_scratch});
          cols_scratch += s.cols;
        }
      rows_total += s.batch * s.rows;
      mats_total += s.batch;
      numel[j] = s.batch * s.rows * s.cols;
    }
    numel_total += numel[j];
  }
  first_item[n] = std::int64_t(items.size());
  const std::int64_t nitems = std::int64_t(items.size());
  if (nitems == 0) return;
  std::vector<double> col_sum(static_cast<std::size_t>(cols_scratch), 0.0),
      row_sum(static_cast<std::size_t>(rows_total), 0.0),
      rbar(static_cast<std::size_t>(mats_total), 0.0),
      p_part(static_cast<std::size_t>(nitems), 0.0), u_part(static_cast<std::size_t>(nitems), 0.0),
      coef(nn, 0.0);
  const int nthreads = int(std::max<std::int64_t>(
      1, std::min<std::int64_t>(max_threads, numel_total / kMinPerThread)));
  const AdafactorHyper hc = h;
  const M gscale = M(mode.grad_scale);
  const auto grad = [&hc, gscale](const P* g, std::int64_t i) {
    return A::grad(hc, load<M>(g[i]) * gscale);
  };
  const auto square = [](const P* a) {
    return [a](std::int64_t i) {
      const double x = load<double>(a[i]);
      return x * x;
    };
  };

  // pass 1: sums of g^2 by row and by column, of p^2; a vector's moment and update
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t k = 0; k < nitems; ++k) {
    const FactoredItem& it = items[std::size_t(k)];
    const FactoredShape& s = shape[it.j];
    const P* p = reinterpret_cast<const P*>(slot(0, it.j));
    const P* g = reinterpret_cast<const P*>(slot(1, it.j));
    if (s.rows == 0) {
      S* v = reinterpret_cast<S*>(slot(2, it.j));
      for (std::int64_t i = it.r0; i < it.r1; ++i) {
        const M gi = grad(g, i);
        v[i] = Store<S>::template apply<false>(A::moved(hc, load<M>(v[i]), gi * gi), 0);
      }
      p_part[std::size_t(k)] = block_sum(it.r0, it.r1, square(p));
      u_part[std::size_t(k)] = block_sum(it.r0, it.r1, [&](std::int64_t i) {
        const double u = double(A::update(hc, grad(g, i), load<M>(v[i])));
        return u * u;
      });
      continue;
    }
    double* cols = col_sum.data() + it.cols_at;
    double psum = 0.0;
    for (std::int64_t i = it.r0; i < it.r1; ++i) {
      const std::int64_t at = (it.b * s.rows + i) * s.cols;
      const P* __restrict gi = g + at;
      const P* __restrict pi = p + at;
      // (the sign of a maximized gradient does not change its square)
      row_sum[std::size_t(row_at[it.j] + it.b * s.rows + i)] =
          lane_sum(0, s.cols, [gi, gscale](std::int64_t c) {
            const double x = double(load<M>(gi[c]) * gscale);
            return x * x;
          });
      double* __restrict cs = cols;
      for (std::int64_t c = 0; c < s.cols; ++c) {
        const double x = double(load<M>(gi[c]) * gscale);
        cs[c] += x * x;
      }
      psum += lane_sum(0, s.cols, [pi](std::int64_t c) {
        const double y = load<double>(pi[c]);
        return y * y;
      });
    }
    p_part[std::size_t(k)] = psum;
  }

  // per matrix: the column sums combined in item order, the factors moved, their mean
#pragma omp parallel for schedule(dynamic) num_threads(nthreads)
  for (std::int64_t j = 0; j < n; ++j) {
    const FactoredShape& s = shape[j];
    if (s.rows == 0) continue;
    S* rf = reinterpret_cast<S*>(slot(2, j));
    S* cf = reinterpret_cast<S*>(slot(3, j));
    std::vector<double> total(static_cast<std::size_t>(s.cols), 0.0);
    std::int64_t k = first_item[j];
    for (std::int64_t b = 0; b < s.batch; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      for (; k < first_item[j + 1] && items[std::size_t(k)].b == b; ++k) {
        const double* part = col_sum.data() + items[std::size_t(k)].cols_at;
        for (std::int64_t c = 0; c < s.cols; ++c) total[std::size_t(c)] += part[c];
      }
      S* cb = cf + b * s.cols;
      for (std::int64_t c = 0; c < s.cols; ++c)
        cb[c] = Store<S>::template apply<false>(
            A::moved(hc, load<M>(cb[c]), A::mean_square<M>(total[std::size_t(c)], double(s.rows))), 0);
      S* rb = rf + b * s.rows;
      const double* rs = row_sum.data() + row_at[j] + b * s.rows;
      double mean = 0.0;
      for (std::int64_t i = 0; i < s.rows; ++i) {
        rb[i] = Store<S>::template apply<false>(
            A::moved(hc, load<M>(rb[i]), A::mean_square<M>(rs[i], double(s.cols))), 0);
        mean += load<double>(rb[i]);
      }
      const M m = M(mean / double(s.rows)), floor = M(hc.eps1);
      rbar[std::size_t(mat_at[j] + b)] = double(m < floor ? floor : m);
    }
  }

  // pass 2: the sums of the squared update of the matrices
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t k = 0; k < nitems; ++k) {
    const FactoredItem& it = items[std::size_t(k)];
    const FactoredShape& s = shape[it.j];
    if (s.rows == 0) continue;
    const P* g = reinterpret_cast<const P*>(slot(1, it.j));
    const S* rf = reinterpret_cast<const S*>(slot(2, it.j)) + it.b * s.rows;
    const S* cf = reinterpret_cast<const S*>(slot(3, it.j)) + it.b * s.cols;
    const M rb = M(rbar[std::size_t(mat_at[it.j] + it.b)]);
    double usum = 0.0;
    for (std::int64_t i = it.r0; i < it.r1; ++i) {
      const P* gi = g + (it.b * s.rows + i) * s.cols;
      const M ri = load<M>(rf[i]);
      usum += lane_sum(0, s.cols, [&](std::int64_t c) {
        const double u = double(A::update(hc, grad(gi, c), A::estimate(ri, load<M>(cf[c]), rb)));
        return u * u;
      });
    }
    u_part[std::size_t(k)] = usum;
  }

  // per tensor: the step's coefficient, from the sums in item order
  for (std::int64_t j = 0; j < n; ++j) {
    double psum = 0.0, usum = 0.0;
    for (std::int64_t k = first_item[j]; k < first_item[j + 1]; ++k) {
      psum += p_part[std::size_t(k)];
      usum += u_part[std::size_t(k)];
    }
    const double root = std::pow(double(numel[j]), 0.5);
    const double rms = std::sqrt(psum) / root;
    const double alpha = (hc.eps2 > rms ? hc.eps2 : rms) * hc.rho;
    const double ratio = std::sqrt(usum) / (root * hc.d);
    const double denom = ratio > 1.0 ? ratio : 1.0;
    coef[std::size_t(j)] = -alpha / denom;
  }

  // pass 3: the step
  const M shrink = M(hc.weight_decay != 0.0 ? 1.0 - hc.lr * hc.weight_decay : 1.0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t k = 0; k < nitems; ++k) {
    const FactoredItem& it = items[std::size_t(k)];
    const FactoredShape& s = shape[it.j];
    P* p = reinterpret_cast<P*>(slot(0, it.j));
    const P* g = reinterpret_cast<const P*>(slot(1, it.j));
    const M cj = M(coef[std::size_t(it.j)]);
    if (s.rows == 0) {
      const S* v = reinterpret_cast<const S*>(slot(2, it.j));
#pragma omp simd
      for (std::int64_t i = it.r0; i < it.r1; ++i)
        p[i] = Store<P>::template apply<false>(
            A::step(load<M>(p[i]), A::update(hc, grad(g, i), load<M>(v[i])), shrink, cj), 0);
      continue;
    }
    const S* rf = reinterpret_cast<const S*>(slot(2, it.j)) + it.b * s.rows;
    const S* cf = reinterpret_cast<const S*>(slot(3, it.j)) + it.b * s.cols;
    const M rb = M(rbar[std::size_t(mat_at[it.j] + it.b)]);
    for (std::int64_t i = it.r0; i < it.r1; ++i) {
      const std::int64_t at = (it.b * s.rows + i) * s.cols;
      P* pi = p + at;
      const P* gi = g + at;
      const M ri = load<M>(rf[i]);
#pragma omp simd
      for (std::int64_t c = 0; c < s.cols; ++c) {
        const M u = A::update(hc, grad(gi, c), A::estimate(ri, load<M>(cf[c]), rb));
        pi[c] = Store<P>::template apply<false>(A::step(load<M>(pi[c]), u, shrink, cj), 0);
      }
    }
  }
}

}  // namespace fo::cpu::FO_ISA_NS
