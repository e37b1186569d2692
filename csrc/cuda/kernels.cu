// The update kernels of one group of layouts, compiled once per group: the build
// defines FO_CUDA_NS (the namespace of the entry point), FO_CUDA_PARAM and
// FO_CUDA_STATE (dtype codes of the params and the states of the group).
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "multi_tensor.cuh"
#include "factored.cuh"
#include "quant_functor.cuh"
#include "reduce_functor.cuh"
#include "rows.cuh"
#include "update_functor.cuh"

namespace fo::cuda::FO_CUDA_NS {
namespace {

// The functor of a layout: 8-bit state (q8) decodes and encodes blocks of it (no EMA
// slot with it).
template <class Rule, class M, Extra X, class P, class S, bool SR, bool E>
struct FunctorOf {
  using type = UpdateFunctor<Rule, M, X, P, S, SR, E>;
};
template <class Rule, class M, Extra X, class P, bool SR>
struct FunctorOf<Rule, M, X, P, q8, SR, false> {
  using type = QuantFunctor<Rule, M, X, P, SR>;
};

// The update pass of a call; for a two-pass rule (csrc/core/two_pass.h) first the
// per-tensor sums, which stay in device memory for the update to read.
template <class Rule, class M, Extra X, class P, class S, class Op>
void update(const StepCall& c, Op op) {
  if constexpr (reduce_count<Rule>() > 0 && std::is_same_v<S, q8>) {
    throw std::invalid_argument(c.name + ": no 8-bit state for a two-pass rule");
  } else if constexpr (reduce_count<Rule>() > 0) {
    constexpr int R = reduce_count<Rule>();
    using Reduce = ReduceFunctor<Rule, M, X, P, S>;
    // tensor j's chunks are blocks first[j] .. first[j + 1] - 1 of the first pass, as
    // the launcher numbers them (tensors in order, empty ones without blocks)
    std::vector<std::int64_t> first(std::size_t(c.n) + 1, 0);
    for (std::int64_t j = 0; j < c.n; ++j)
      first[std::size_t(j) + 1] = first[std::size_t(j)] + count_blocks(c.sizes + j, 1);
    StreamBuffer partial(std::size_t(first.back()) * R * sizeof(double), c.stream, c.name);
    StreamBuffer sums(std::size_t(c.n) * R * sizeof(double), c.stream, c.name);
    StreamBuffer starts(first.size() * sizeof(std::int64_t), c.stream, c.name);
    check_cuda(cudaMemcpyAsync(starts.get<std::int64_t>(), first.data(),
                               first.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice,
                               c.stream),
               c.name + ": copying the chunk table");
    const typename Reduce::Setup setup{op.h, op.table, op.mode, op.scale, op.count};
    multi_tensor_apply<Op::kSlots>(c.name + " (per-tensor sums)", c.stream, c.ptrs, c.sizes,
                                   c.n, Reduce{setup, partial.get<double>()});
    constexpr unsigned kThreads = 128;
    launch(c.name + " (per-tensor sums)", sum_chunks_per_tensor<R>,
           unsigned((c.n + kThreads - 1) / kThreads), kThreads, c.stream,
           static_cast<const double*>(partial.get<double>()),
           static_cast<const std::int64_t*>(starts.get<std::int64_t>()), c.n,
           sums.get<double>());
    op.sums = sums.get<double>();
    multi_tensor_apply<Op::kSlots>(c.name, c.stream, c.ptrs, c.sizes, c.n, op);
  } else {
    multi_tensor_apply<Op::kSlots>(c.name, c.stream, c.ptrs, c.sizes, c.n, op);
  }
}

template <class Rule, class M, Extra X, bool E, class P, class S, bool SR>
void run(const StepCall& c) {
  using Hyper = typename Rule::Hyper;
  using Op = typename FunctorOf<Rule, M, X, P, S, SR, E>::type;
  // Hyper is a plain struct of doubles: copy it out of the caller's array. The
  // per-step scalars come from the same at_step as on the CPU, in double on the
  // host, unless the count lives on the device.
  std::vector<Hyper> h(c.per_tensor ? std::size_t(c.n) : 1);
  std::memcpy(h.data(), c.hyper, h.size() * sizeof(Hyper));
  if (c.count == nullptr)
    for (Hyper& one : h) Rule::at_step(one, c.mode.step);
  Op op{h[0], nullptr, c.mode, c.scale, c.count};
  if (!c.per_tensor) {
    update<Rule, M, X, P, S>(c, op);
    return;
  }
  // One Hyper per tensor: a table in device memory, ordered on the stream. A
  // copy from pageable memory returns once the data is staged, so `h` may go.
  StreamBuffer table(h.size() * sizeof(Hyper), c.stream, c.name);
  check_cuda(cudaMemcpyAsync(table.get<Hyper>(), h.data(), h.size() * sizeof(Hyper),
                             cudaMemcpyHostToDevice, c.stream),
             c.name + ": copying the hyperparameter table");
  op.table = table.get<Hyper>();
  update<Rule, M, X, P, S>(c, op);
}

template <class Rule, class M, Extra X, class P, class S>
void run_rows(const RowsCall& rc) {
  using Hyper = typename Rule::Hyper;
  constexpr int kSlots = 2 + Rule::kStates + (X != Extra::None ? 1 : 0);
  const StepCall& c = rc.step;
  std::vector<Hyper> h(c.per_tensor ? std::size_t(c.n) : 1);
  std::memcpy(h.data(), c.hyper, h.size() * sizeof(Hyper));
  for (Hyper& one : h) Rule::at_step(one, c.mode.step);
  std::vector<RowsMeta<kSlots>> meta(std::size_t(c.n));
  std::int64_t total = 0;
  for (std::int64_t j = 0; j < c.n; ++j) {
    for (int k = 0; k < kSlots; ++k) meta[j].ptr[k] = c.ptrs[k * c.n + j];
    meta[j].rows = rc.rows[j];
    meta[j].first = total;
    meta[j].len = rc.row_len[j];
    total += rc.counts[j];
  }
  if (total == 0) return;
  // the table (and the Hyper of each tensor) in device memory, ordered on the stream;
  // copies from pageable memory return once the data is staged
  const std::size_t meta_bytes = meta.size() * sizeof(RowsMeta<kSlots>);
  const std::size_t hyper_bytes = c.per_tensor ? h.size() * sizeof(Hyper) : 0;
  StreamBuffer buffer(meta_bytes + hyper_bytes, c.stream, c.name);
  auto* dmeta = buffer.get<RowsMeta<kSlots>>();
  check_cuda(cudaMemcpyAsync(dmeta, meta.data(), meta_bytes, cudaMemcpyHostToDevice, c.stream),
             c.name + ": copying the row table");
  const Hyper* dtable = nullptr;
  if (c.per_tensor) {
    auto* at = reinterpret_cast<Hyper*>(buffer.get<char>() + meta_bytes);
    check_cuda(cudaMemcpyAsync(at, h.data(), hyper_bytes, cudaMemcpyHostToDevice, c.stream),
               c.name + ": copying the hyperparameter table");
    dtable = at;
  }
  const unsigned blocks = unsigned(total < 65536 ? total : 65536);
  launch(c.name, rows_kernel<Rule, M, X, P, S, kSlots>, blocks, 256, c.stream,
         static_cast<const RowsMeta<kSlots>*>(dmeta), c.n, total, h[0], dtable, c.mode);
}

template <class M, class P, class S>
void run_factored(const FactoredCall& fc) {
  const StepCall& c = fc.step;
  AdafactorHyper h;
  std::memcpy(&h, c.hyper, sizeof(h));
  Adafactor::at_step(h, c.mode.step);
  std::vector<FactoredTensor> tensors(std::size_t(c.n));
  std::vector<FactoredWork> items;
  std::vector<std::int64_t> matrix_tensor;
  std::int64_t cols_scratch = 0, rows_total = 0;
  for (std::int64_t j = 0; j < c.n; ++j) {
    FactoredTensor& t = tensors[std::size_t(j)];
    t.p = c.ptrs[j];
    t.g = c.ptrs[c.n + j];
    t.r = c.ptrs[2 * c.n + j];
    t.c = c.ptrs[3 * c.n + j];
    t.batch = fc.shapes[3 * j];
    t.rows = fc.shapes[3 * j + 1];
    t.cols = fc.shapes[3 * j + 2];
    t.row_at = rows_total;
    t.mat_at = std::int64_t(matrix_tensor.size());
    t.first_item = std::int64_t(items.size());
    constexpr std::int64_t kItem = std::int64_t(1) << 14;
    if (t.rows == 0) {
      for (std::int64_t lo = 0; lo < t.cols; lo += kItem)
        items.push_back({j, 0, lo, lo + kItem < t.cols ? lo + kItem : t.cols, 0});
    } else {
      std::int64_t per = kItem / (t.cols > 0 ? t.cols : 1);
      per = per < 1 ? 1 : per > t.rows ? t.rows : per;
      for (std::int64_t b = 0; b < t.batch; ++b) {
        matrix_tensor.push_back(j);
        for (std::int64_t r0 = 0; r0 < t.rows; r0 += per) {
          items.push_back({j, b, r0, r0 + per < t.rows ? r0 + per : t.rows, cols_scratch});
          cols_scratch += t.cols;
        }
      }
      rows_total += t.batch * t.rows;
    }
    t.end_item = std::int64_t(items.size());
  }
  const std::int64_t nitems = std::int64_t(items.size());
  if (nitems == 0) return;
  const std::int64_t nmat = std::int64_t(matrix_tensor.size());
  // one allocation on the stream: the tables, then the scratch sums (doubles)
  const std::size_t tb = tensors.size() * sizeof(FactoredTensor), ib = items.size() * sizeof(FactoredWork),
                    mb = matrix_tensor.size() * sizeof(std::int64_t);
  const std::size_t doubles = std::size_t(rows_total + cols_scratch + 2 * nitems + nmat + c.n);
  const std::size_t head = (tb + ib + mb + 7) / 8 * 8;
  StreamBuffer buffer(head + doubles * sizeof(double), c.stream, c.name);
  char* base = buffer.get<char>();
  auto* dt = reinterpret_cast<FactoredTensor*>(base);
  auto* di = reinterpret_cast<FactoredWork*>(base + tb);
  auto* dm = reinterpret_cast<std::int64_t*>(base + tb + ib);
  double* row_sum = reinterpret_cast<double*>(base + head);
  double* col_sum = row_sum + rows_total;
  double* p_part = col_sum + cols_scratch;
  double* u_part = p_part + nitems;
  double* rbar = u_part + nitems;
  double* coef = rbar + nmat;
  check_cuda(cudaMemcpyAsync(dt, tensors.data(), tb, cudaMemcpyHostToDevice, c.stream),
             c.name + ": copying the tensor table");
  check_cuda(cudaMemcpyAsync(di, items.data(), ib, cudaMemcpyHostToDevice, c.stream),
             c.name + ": copying the work items");
  if (mb > 0)
    check_cuda(cudaMemcpyAsync(dm, matrix_tensor.data(), mb, cudaMemcpyHostToDevice, c.stream),
               c.name + ": copying the matrix table");
  const double gs = c.mode.grad_scale;
  const unsigned threads = unsigned(kFactoredThreads);
  launch(c.name + " (pass 1)", factored_pass1<M, P, S>, unsigned(nitems), threads, c.stream,
         static_cast<const FactoredTensor*>(dt), static_cast<const FactoredWork*>(di), h, gs,
         row_sum, col_sum, p_part, u_part);
  if (nmat > 0)
    launch(c.name + " (factors)", factored_factors<M, S>, unsigned(nmat), threads, c.stream,
           static_cast<const FactoredTensor*>(dt), static_cast<const std::int64_t*>(dm),
           static_cast<const FactoredWork*>(di), h, static_cast<const double*>(row_sum),
           static_cast<const double*>(col_sum), rbar);
  launch(c.name + " (pass 2)", factored_pass2<M, P, S>, unsigned(nitems), threads, c.stream,
         static_cast<const FactoredTensor*>(dt), static_cast<const FactoredWork*>(di), h, gs,
         static_cast<const double*>(rbar), u_part);
  launch(c.name + " (coefficients)", factored_coef<>, unsigned(c.n), 32u, c.stream,
         static_cast<const FactoredTensor*>(dt), h, static_cast<const double*>(p_part),
         static_cast<const double*>(u_part), coef);
  launch(c.name + " (pass 3)", factored_pass3<M, P, S>, unsigned(nitems), threads, c.stream,
         static_cast<const FactoredTensor*>(dt), static_cast<const FactoredWork*>(di), h, gs,
         static_cast<const double*>(rbar), static_cast<const double*>(coef));
}

}  // namespace

void step_factored(const FactoredCall& fc) {
  const StepCall& c = fc.step;
  bool done = false;
  with_layout(c.param, c.state, 0, [&](auto m, auto p, auto s, auto x) {
    using P = decltype(p);
    using S = decltype(s);
    if constexpr (dtype_code<P>() == FO_CUDA_PARAM && dtype_code<S>() == FO_CUDA_STATE &&
                  !std::is_same_v<S, q8> && decltype(x)::value == Extra::None &&
                  !decltype(x)::ema) {
      run_factored<decltype(m), P, S>(fc);
      done = true;
    }
  });
  if (!done) throw std::logic_error(c.name + ": no factored kernel for this layout");
}

void step_rows(const RowsCall& rc) {
  const StepCall& c = rc.step;
  bool done = false;
  with_rule(c.kernel, [&](auto rule) {
    using Rule = decltype(rule);
    with_layout(c.param, c.state, c.extra, [&](auto m, auto p, auto s, auto x) {
      using P = decltype(p);
      using S = decltype(s);
      constexpr Extra X = decltype(x)::value;
      if constexpr (dtype_code<P>() == FO_CUDA_PARAM && dtype_code<S>() == FO_CUDA_STATE &&
                    !std::is_same_v<S, q8> && reduce_count<Rule>() == 0 && !decltype(x)::ema &&
                    TakesEma<Rule>::value) {
        run_rows<Rule, decltype(m), X, P, S>(rc);
        done = true;
      }
    });
  });
  if (!done) throw std::logic_error(c.name + ": no row-sparse kernel for this layout");
}

void step(const StepCall& c) {
  bool done = false;
  with_rule(c.kernel, [&](auto rule) {
    using Rule = decltype(rule);
    with_layout(c.param, c.state, c.extra, [&](auto m, auto p, auto s, auto x) {
      using P = decltype(p);
      using S = decltype(s);
      constexpr Extra X = decltype(x)::value;
      constexpr bool E = decltype(x)::ema;
      if constexpr (dtype_code<P>() == FO_CUDA_PARAM && dtype_code<S>() == FO_CUDA_STATE &&
                    is_built<Rule, X, P, S, E>()) {
        // stochastic rounding concerns 16-bit params only, as on the CPU
        if constexpr (sizeof(P) == 2) {
          if (c.mode.stochastic != 0.0)
            run<Rule, decltype(m), X, E, P, S, true>(c);
          else
            run<Rule, decltype(m), X, E, P, S, false>(c);
        } else {
          run<Rule, decltype(m), X, E, P, S, false>(c);
        }
        done = true;
      }
    });
  });
  if (!done) throw std::logic_error(c.name + ": no kernel for this layout in this object");
}

}  // namespace fo::cuda::FO_CUDA_NS
