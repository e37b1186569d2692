// The pointer table of one call, shared by the bindings and every build of the kernels.
#pragma once

#include <cstdint>

namespace fo::cpu {

// Pointers of one call: ptrs[slot * n + j] is the address of slot `slot`
// (0 = param, 1 = grad, 2.. = states, then the extra buffer of the layout, if any)
// of tensor j; sizes[j] its element count.
struct Table {
  const std::uint64_t* ptrs;
  const std::int64_t* sizes;
  std::int64_t n;
};

// The rows of a row-sparse call (csrc/cpu/rows.h), aligned with a Table's tensors,
// whose gradient slot then holds counts[j] rows of values per tensor.
struct RowsTable {
  const std::uint64_t* rows;    // addresses of int64 row indices, one array per tensor
  const std::int64_t* counts;   // rows touched per tensor
  const std::int64_t* row_len;  // elements per row of each tensor
};

// The geometry of one tensor of a factored call (csrc/cpu/factored.h): a stack of `batch`
// matrices of rows x cols elements, or with rows == 0 an unfactored tensor of cols elements.
struct FactoredShape {
  std::int64_t batch, rows, cols;
};

}  // namespace fo::cpu
