// The hyperparameter structs of the rules, with their field names.
//
// A rule's Hyper is a plain struct of doubles that the host fills and the drivers
// copy. It is declared with two macros that define the fields and, from the same
// text, their names:
//   FO_FIELDS(a, b, ...)       the fields the host fills, by name (fusedopt's algorithm
//                              specs read the names through `hyper_fields`)
//   FO_STEP_FIELDS(c, d, ...)  the per-step scalars that the rule's at_step fills from
//                              the step count (optional; after FO_FIELDS)
// so no code outside this header knows the position of a field.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#define FO_FIELDS(...)   \
  double __VA_ARGS__;    \
  static constexpr const char* kFields = #__VA_ARGS__
#define FO_STEP_FIELDS(...) \
  double __VA_ARGS__;       \
  static constexpr const char* kStepFields = #__VA_ARGS__

namespace fo {

// The names of a comma-separated field list, as the macros stringify it.
inline std::vector<std::string> split_fields(std::string_view text) {
  std::vector<std::string> out;
  while (!text.empty()) {
    const std::size_t comma = text.find(',');
    std::string_view name = text.substr(0, comma);
    while (!name.empty() && (name.front() == ' ' || name.front() == '\n')) name.remove_prefix(1);
    while (!name.empty() && (name.back() == ' ' || name.back() == '\n')) name.remove_suffix(1);
    if (!name.empty()) out.emplace_back(name);
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return out;
}

// Number of names in a comma-separated list (the fields a macro declared).
constexpr int count_fields(const char* s) {
  int n = *s != '\0' ? 1 : 0;
  for (; *s != '\0'; ++s) n += *s == ',';
  return n;
}

template <class H, class = void>
struct HasStepFields : std::false_type {};
template <class H>
struct HasStepFields<H, std::void_t<decltype(H::kStepFields)>> : std::true_type {};

// Every double of a Hyper is a named field (the struct holds nothing else).
template <class H>
constexpr bool fields_cover() {
  int n = count_fields(H::kFields);
  if constexpr (HasStepFields<H>::value) n += count_fields(H::kStepFields);
  return sizeof(H) == sizeof(double) * std::size_t(n);
}

// (host-filled names, per-step names) of a Hyper, in memory order.
template <class H>
std::pair<std::vector<std::string>, std::vector<std::string>> hyper_field_names() {
  std::vector<std::string> step;
  if constexpr (HasStepFields<H>::value) step = split_fields(H::kStepFields);
  return {split_fields(H::kFields), step};
}

}  // namespace fo
