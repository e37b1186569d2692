// The update kernels of one group of layouts, compiled once per group: the build
// defines FO_CUDA_NS (the namespace of the entry point), FO_CUDA_PARAM and
// FO_CUDA_STATE (dtype codes of the params and the states of the group).
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "multi_tensor.cuh"
#include "quant_functor.cuh"
#include "reduce_functor.cuh"
#include "update_functor.cuh"

namespace fo::cuda::FO_CUDA_NS {
namespace {

// The functor of a layout: 8-bit state (q8) decodes and encodes blocks of it.
template <class Rule, class M, Extra X, class P, class S, bool SR>
struct FunctorOf {
  using type = UpdateFunctor<Rule, M, X, P, S, SR>;
};
template <class Rule, class M, Extra X, class P, bool SR>
struct FunctorOf<Rule, M, X, P, q8, SR> {
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

template <class Rule, class M, Extra X, class P, class S, bool SR>
void run(const StepCall& c) {
  using Hyper = typename Rule::Hyper;
  using Op = typename FunctorOf<Rule, M, X, P, S, SR>::type;
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

}  // namespace

void step(const StepCall& c) {
  bool done = false;
  with_rule(c.kernel, [&](auto rule) {
    using Rule = decltype(rule);
    with_layout(c.param, c.state, c.extra, [&](auto m, auto p, auto s, auto x) {
      using P = decltype(p);
      using S = decltype(s);
      constexpr Extra X = decltype(x)::value;
      if constexpr (dtype_code<P>() == FO_CUDA_PARAM && dtype_code<S>() == FO_CUDA_STATE &&
                    is_built<Rule, X, P, S>()) {
        // stochastic rounding concerns 16-bit params only, as on the CPU
        if constexpr (sizeof(P) == 2) {
          if (c.mode.stochastic != 0.0)
            run<Rule, decltype(m), X, P, S, true>(c);
          else
            run<Rule, decltype(m), X, P, S, false>(c);
        } else {
          run<Rule, decltype(m), X, P, S, false>(c);
        }
        done = true;
      }
    });
  });
  if (!done) throw std::logic_error(c.name + ": no kernel for this layout in this object");
}

}  // namespace fo::cuda::FO_CUDA_NS
