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

}  // namespace fo::cpu
