// The update kernels of one group of layouts, compiled once per group: the build
// defines FO_CUDA_NS (the namespace of the entry point), FO_CUDA_PARAM and
// FO_CUDA_STATE (dtype codes of the params and the states of the group).
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "multi_tensor.cuh"
#include "rows.cuh"
#include "update_functor.cuh"

namespace fo::cuda::FO_CUDA_NS {
namespace {

template <class Rule, class M, Extra X, bool E, class P, class S, bool SR>
void run(const StepCall& c) {
  using Hyper = typename Rule::Hyper;
  using Op = UpdateFunctor<Rule, M, X, P, S, SR, E>;
  // Hyper is a plain struct of doubles: copy it out of the caller's array. The
  // per-step scalars come from the same at_step as on the CPU, in double on the
  // host, unless the count lives on the device.
  std::vector<Hyper> h(c.per_tensor ? std::size_t(c.n) : 1);
  std::memcpy(h.data(), c.hyper, h.size() * sizeof(Hyper));
  if (c.count == nullptr)
    for (Hyper& one : h) Rule::at_step(one, c.mode.step);
  Op op{h[0], nullptr, c.mode, c.scale, c.count};
  if (!c.per_tensor) {
    multi_tensor_apply<Op::kSlots>(c.name, c.stream, c.ptrs, c.sizes, c.n, op);
    return;
  }
  // One Hyper per tensor: a table in device memory, ordered on the stream. A
  // copy from pageable memory returns once the data is staged, so `h` may go.
  StreamBuffer table(h.size() * sizeof(Hyper), c.stream, c.name);
  check_cuda(cudaMemcpyAsync(table.get<Hyper>(), h.data(), h.size() * sizeof(Hyper),
                             cudaMemcpyHostToDevice, c.stream),
             c.name + ": copying the hyperparameter table");
  op.table = table.get<Hyper>();
  multi_tensor_apply<Op::kSlots>(c.name, c.stream, c.ptrs, c.sizes, c.n, op);
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

}  // namespace

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
                    !decltype(x)::ema && TakesEma<Rule>::value) {
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
