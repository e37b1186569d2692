// The storage layouts a driver accepts, mapped from the codes the Python layer
// passes, once for every driver. with_layout(param, state, extra, f) calls
// f(M{}, P{}, S{}, ExtraTag<X, E>{}) for a valid combination and returns false
// otherwise; the tag's `value` is the extra buffer X, its `ema` whether the layout
// has the EMA slot.
#pragma once

#include <type_traits>

#include "element.h"
#include "quant8.h"

namespace fo {

// Storage dtype codes (the Python layer's too). Int8Block: states of 8-bit codes with a
// float32 scale per block (quant8.h), for float32 and 16-bit params.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int8Block = 4 };

// The extra buffer of a layout and, apart from it, whether the layout carries an EMA
// slot (an exponential moving average of the params, updated in the same pass).
template <Extra X, bool E = false>
struct ExtraTag {
  static constexpr Extra value = X;
  static constexpr bool ema = E;
};

// Bit of the extra code that adds the EMA slot (with no extra buffer or master weights).
constexpr int kEmaBit = 4;

template <class P, class F>
bool with_16bit_layout(int state, int extra, F&& f) {
  auto with_extra = [&](auto s) {
    if (extra == 0) return f(float{}, P{}, s, ExtraTag<Extra::None>{}), true;
    if (extra == 1) return f(float{}, P{}, s, ExtraTag<Extra::Master>{}), true;
    if (extra == 2) return f(float{}, P{}, s, ExtraTag<Extra::Kahan>{}), true;
    if constexpr (!std::is_same_v<decltype(s), q8>) {  // no EMA slot with 8-bit state
      if (extra == kEmaBit) return f(float{}, P{}, s, ExtraTag<Extra::None, true>{}), true;
      if (extra == (kEmaBit | 1))
        return f(float{}, P{}, s, ExtraTag<Extra::Master, true>{}), true;
    }
    return false;
  };
  if (state == int(DType::Float32)) return with_extra(float{});
  if (state == int(DType::BFloat16)) return with_extra(bf16{});
  if (state == int(DType::Int8Block)) return with_extra(q8{});
  return false;
}

// param: dtype of params and grads; state: dtype of the state buffers; extra: 0 none,
// 1 float32 master weights, 2 Kahan compensation (16-bit params only), plus kEmaBit
// for an EMA slot of the params' dtype (not with Kahan buffers, nor with 8-bit state).
template <class F>
bool with_layout(int param, int state, int extra, F&& f) {
  if (param == int(DType::Float32) && state == param && extra == 0)
    return f(float{}, float{}, float{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float32) && state == int(DType::Int8Block) && extra == 0)
    return f(float{}, float{}, q8{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float64) && state == param && extra == 0)
    return f(double{}, double{}, double{}, ExtraTag<Extra::None>{}), true;
  if (param == int(DType::Float32) && state == param && extra == kEmaBit)
    return f(float{}, float{}, float{}, ExtraTag<Extra::None, true>{}), true;
  if (param == int(DType::Float64) && state == param && extra == kEmaBit)
    return f(double{}, double{}, double{}, ExtraTag<Extra::None, true>{}), true;
  if (param == int(DType::Float16)) return with_16bit_layout<f16>(state, extra, f);
  if (param == int(DType::BFloat16)) return with_16bit_layout<bf16>(state, extra, f);
  return false;
}

}  // namespace fo
