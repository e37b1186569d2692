// The storage layouts a driver accepts, mapped from the codes the Python layer
// passes, once for every driver. with_layout(param, state, extra, f) calls
// f(M{}, P{}, S{}, std::integral_constant<Extra, X>{}) for a valid combination and
// returns false otherwise.
#pragma once

#include <type_traits>

#include "element.h"
#include "quant8.h"

namespace fo {

// Storage dtype codes (the Python layer's too). Int8Block: states of 8-bit codes with a
// float32 scale per block (quant8.h), for float32 and 16-bit params.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int8Block = 4 };

template <Extra X>
using ExtraTag = std::integral_constant<Extra, X>;

template <class P, class F>
bool with_16bit_layout(int state, int extra, F&& f) {
  auto with_extra = [&](auto s) {
    if (extra == 0) return f(float{}, P{}, s, ExtraTag<Extra::None>{}), true;
    if (extra == 1) return f(float{}, P{}, s, ExtraTag<Extra::Master>{}), true;
    if (extra == 2) return f(float{}, P{}, s, ExtraTag<Extra::Kahan>{}), true;
    return false;
  };
  if (state == int(DType::Float32)) return with_extra(float{});
  if (state == int(DType::BFloat16)) return with_extra(bf16{});
  if (state == int(DType::Int8Block)) return with_extra(q8{});
  return false;
}

// param: dtype of params and grads; state: dtype of the state buffers; extra: 0 none,
// 1 float32 master weights, 2 Kahan compensation (16-bit params only).
template <class F>
bool with_layout(int param, int state, int extra, F&& f) {
  if (param == int(DType::Float32) && state == param && extra == 0)
    return f(float{}, float{}, float{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float32) && state == int(DType::Int8Block) && extra == 0)
    return f(float{}, float{}, q8{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float64) && state == param && extra == 0)
    return f(double{}, double{}, double{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float16)) return with_16bit_layout<f16>(state, extra, f);
  if (param == int(DType::BFloat16)) return with_16bit_layout<bf16>(state, extra, f);
  return false;
}

}  // namespace fo
