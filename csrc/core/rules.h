// The registry of kernels: maps a kernel name to its rule type, once, for every
// driver. A driver calls with_rule(name, f) and f receives a value of the rule type.
#pragma once

#include <string_view>
#include <type_traits>

#include "adadelta.h"
#include "adafactor.h"
#include "adagrad.h"
#include "adam.h"
#include "adamax.h"
#include "asgd.h"
#include "ema.h"
#include "muon.h"
#include "nadam.h"
#include "radam.h"
#include "rmsprop.h"
#include "rprop.h"
#include "sgd.h"
#include "sparse_adam.h"
#include "stream.h"
#include "lion.h"
#include "lamb.h"
#include "lars.h"
#include "schedulefree.h"

namespace fo {

// Number of doubles in a rule's Hyper; every Hyper is a plain struct of doubles.
template <class Rule>
constexpr int hyper_size() {
  static_assert(fields_cover<typename Rule::Hyper>(),
                "a Hyper must be declared with FO_FIELDS / FO_STEP_FIELDS only");
  return int(sizeof(typename Rule::Hyper) / sizeof(double));
}

// Whether a kernel takes the EMA slot of a layout: every update rule; not the
// bandwidth probes, the EMA rule itself, nor a pass whose param slot is not a param
// (no instantiations for them; neither do the row-sparse drivers take them).
template <class Rule>
struct TakesEma : std::bool_constant<!IsStreamProbe<Rule>::value> {};
template <>
struct TakesEma<Ema> : std::false_type {};
template <>
struct TakesEma<MuonMomentum> : std::false_type {};  // (its param slot is a scratch matrix)

template <class F>
bool with_rule(std::string_view name, F&& f) {
  if (name == "sgd") return f(Sgd<false>{}), true;
  if (name == "sgd_momentum") return f(Sgd<true>{}), true;
  if (name == "adagrad") return f(Adagrad{}), true;
  if (name == "rmsprop") return f(Rmsprop<false, false>{}), true;
  if (name == "rmsprop_momentum") return f(Rmsprop<true, false>{}), true;
  if (name == "rmsprop_centered") return f(Rmsprop<false, true>{}), true;
  if (name == "rmsprop_centered_momentum") return f(Rmsprop<true, true>{}), true;
  if (name == "adadelta") return f(Adadelta{}), true;
  if (name == "adam") return f(Adam<false>{}), true;
  if (name == "adam_amsgrad") return f(Adam<true>{}), true;
  if (name == "stream0") return f(Stream<0>{}), true;
  if (name == "stream1") return f(Stream<1>{}), true;
  if (name == "stream2") return f(Stream<2>{}), true;
  if (name == "stream3") return f(Stream<3>{}), true;
  if (name == "ema") return f(Ema{}), true;
  if (name == "sparse_adam") return f(SparseAdam{}), true;
  if (name == "muon_momentum") return f(MuonMomentum{}), true;
  if (name == "muon_update") return f(MuonUpdate{}), true;
  if (name == "nadam") return f(Nadam{}), true;
  if (name == "radam") return f(Radam{}), true;
  if (name == "adamax") return f(Adamax{}), true;
  if (name == "asgd") return f(Asgd{}), true;
  if (name == "rprop") return f(Rprop{}), true;
  if (name == "lion") return f(Lion{}), true;
  if (name == "lamb") return f(Lamb{}), true;
  if (name == "lars") return f(Lars<false>{}), true;
  if (name == "lars_momentum") return f(Lars<true>{}), true;
  if (name == "adamw_schedulefree") return f(AdamwScheduleFree{}), true;
  // the limits of the two-pass rules: stream<states>_reduce<slots the first pass reads>
  if (name == "stream0_reduce2") return f(StreamReduce<0, false>{}), true;
  if (name == "stream1_reduce2") return f(StreamReduce<1, false>{}), true;
  if (name == "stream2_reduce4") return f(StreamReduce<2, true>{}), true;
  return false;
}

// The factored rules (row and column factors of a second moment; csrc/cpu/factored.h),
// a registry of their own: their passes are not the elementwise drivers'.
template <class F>
bool with_factored_rule(std::string_view name, F&& f) {
  if (name == "adafactor") return f(Adafactor{}), true;
  return false;
}

}  // namespace fo
