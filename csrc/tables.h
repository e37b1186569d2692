// The validation of a step's arrays and the pointer tables the kernels take.
//
// The Python layer describes every array of a call as one row of integers
// (address, element count, itemsize, type number, flags, shape hash, ndim, device);
// `Tables` checks all rows together, in the documented order (dtypes, shapes,
// devices, writeability, overlap), and lays out one pointer table per storage layout.
// With 8-bit state (`Layout::nscales`), the state lists hold uint8 codes and the last
// lists the float32 block scales of each state (one per block of `quant_block`
// elements of the param): they are checked with the others, in the same pass.
// A check that fails yields an `Issue` (what, which list, which array); the Python
// layer turns it into the error message, in one place. A call's tables outlive it:
// the optimizer classes keep them between steps and only exchange the gradients
// (`set_grads`), which checks the new gradient rows against the kept ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fo::tables {

// Columns of a description row.
enum Col : int { kPtr, kSize, kItemsize, kTypenum, kFlags, kShape, kNdim, kDevice, kCols };
// Bits of the flags column.
enum : std::int64_t { kIsArray = 1, kCContig = 2, kWriteable = 4, kNative = 8, kAligned = 16 };

// What a failed check found. `list`/`index` name the array (list 0: params, 1: grads,
// 2..: states, then the extra buffers, then the EMA of the params, then the block
// scales of 8-bit states); an overlap names a second array too.
enum class What : int {
  None = 0,
  ParamDtype,     // params[i] has no kernel dtype, or is not in native byte order
  State16Dtype,   // the state of a 16-bit param is neither float32 nor bfloat16
  DtypeMismatch,  // list[i]'s dtype differs from what the layout asks
  ExtraNot16,     // master weights / Kahan buffers given for a param that is not 16-bit
  Shape,          // list[i]'s shape or size differs from params[i]'s
  Device,         // list[i] is on another device than params[0]
  NotContiguous,  // a written array is not C-contiguous
  ReadOnly,       // a written array is read-only
  Overlap,        // two written arrays overlap, or a gradient and a written array
  Int8Param,      // 8-bit state for a param that is not float32, float16 or bfloat16
  CodeDtype,      // an 8-bit state that is not uint8 codes
  ScaleDtype,     // block scales that are not float32 (in native byte order)
  ScaleSize,      // block scales whose count is not the param's number of blocks
};

struct Issue {
  What what = What::None;
  int list = 0;
  std::int64_t index = 0;
  int list2 = 0;
  std::int64_t index2 = 0;
};

// The dtype codes of the kernels (fo::DType): float32 0, float64 1, float16 2,
// bfloat16 3; -1 for anything else. `u8`: the type number of 8-bit codes.
struct Dtypes {
  std::int64_t f32, f64, f16, bf16_numpy, bf16_marker, u8;
  int code(std::int64_t t) const {
    if (t == f32) return 0;
    if (t == f64) return 1;
    if (t == f16) return 2;
    if (t == bf16_numpy || t == bf16_marker) return 3;
    return -1;
  }
};

struct Layout {
  int nstates = 0;
  int extra = 0;  // 0 none, 1 float32 master weights, 2 Kahan buffers
  bool read_only = false;
  bool ema = false;  // the list after the extra buffers is the EMA of the params (their dtype, written)
  // list 1 holds the values of row-sparse gradients (rows of the param, in its dtype):
  // their shapes are the caller's to check, everything else is checked as for grads
  bool row_grads = false;
  int nscales = 0;                // 8-bit state: one list of block scales per state
  std::int64_t quant_block = 256;  // elements per scale
};

// The storage code of 8-bit states (fo::DType::Int8Block).
constexpr int kInt8Block = 4;

struct Group {
  int param = 0, state = 0;          // storage codes
  std::vector<std::int64_t> tensors;  // indices into the call's lists
  std::vector<std::uint64_t> ptrs;    // ptrs[slot * m + j]
  std::vector<std::int64_t> sizes;
};

class Tables {
 public:
  // rows: L lists x n arrays x kCols, list-major.
  Tables(const std::int64_t* rows, int lists, std::int64_t n, Layout layout, Dtypes dtypes)
      : rows_(rows, rows + std::size_t(std::min(lists, 2)) * std::size_t(n) * kCols),
        src_(rows), L_(lists), n_(n), layout_(layout), dtypes_(dtypes) {
    issue_ = check_dtypes();
    if (issue_.what == What::None) issue_ = check_shapes_devices(0, L_);
    if (issue_.what == What::None && !layout_.read_only) issue_ = check_writeable();
    if (issue_.what == What::None && !layout_.read_only) issue_ = index_written();
    if (issue_.what == What::None && !layout_.read_only) issue_ = check_grads_overlap();
    if (issue_.what == What::None) lay_out();
    src_ = nullptr;  // the caller's rows: read by the checks above only
  }

  const Issue& issue() const { return issue_; }
  const std::vector<Group>& groups() const { return groups_; }
  std::vector<Group>& groups() { return groups_; }
  std::int64_t size() const { return n_; }
  std::int64_t device() const { return n_ ? row(0, 0)[kDevice] : 0; }

  // New gradient rows (n x kCols) for the same params and states: checked against the
  // kept rows, then their addresses replace the old ones in the tables. On an issue
  // nothing changes.
  Issue set_grads(const std::int64_t* grad_rows) {
    std::vector<std::int64_t> saved(rows_.begin() + n_ * kCols, rows_.begin() + 2 * n_ * kCols);
    std::copy(grad_rows, grad_rows + n_ * kCols, rows_.begin() + n_ * kCols);
    Issue found = check_list_dtype(1);
    if (found.what == What::None) found = check_shapes_devices(1, 2);
    if (found.what == What::None && !layout_.read_only) found = check_grads_overlap();
    if (found.what != What::None) {
      std::copy(saved.begin(), saved.end(), rows_.begin() + n_ * kCols);
      return found;
    }
    patch_slot(1);
    return found;
  }

  // New gradient addresses only, for producers whose gradients are known to match
  // their params in dtype, shape and device (a torch gradient is checked against its
  // param when it is assigned): the overlap check runs, the rest is kept.
  Issue set_grad_ptrs(const std::uint64_t* ptrs) {
    std::vector<std::int64_t> saved(static_cast<std::size_t>(n_));
    for (std::int64_t i = 0; i < n_; ++i) {
      saved[std::size_t(i)] = grad_row(i)[kPtr];
      grad_row(i)[kPtr] = std::int64_t(ptrs[i]);
    }
    Issue found;
    if (!layout_.read_only) found = check_grads_overlap();
    if (found.what != What::None) {
      for (std::int64_t i = 0; i < n_; ++i) grad_row(i)[kPtr] = saved[std::size_t(i)];
      return found;
    }
    patch_slot(1);
    return found;
  }

 private:
  // The rows of params and gradients are kept (a kept call exchanges the gradients);
  // those of the other lists are read from the caller's rows while the constructor
  // runs, and not copied.
  std::int64_t* grad_row(std::int64_t i) { return rows_.data() + (n_ + i) * kCols; }
  const std::int64_t* row(int k, std::int64_t i) const {
    return (k < 2 ? rows_.data() : src_) + (k * n_ + i) * kCols;
  }
  int state_list(int k) const { return k >= 2 && k < 2 + layout_.nstates; }
  bool quantized() const { return layout_.nscales > 0; }
  bool scale_list(int k) const { return quantized() && k >= L_ - layout_.nscales; }
  int extra_list() const {
    return layout_.extra ? L_ - 1 - layout_.nscales - (layout_.ema ? 1 : 0) : -1;
  }
  std::int64_t blocks(std::int64_t n) const {
    return (n + layout_.quant_block - 1) / layout_.quant_block;
  }
  bool native(int k, std::int64_t i) const { return (row(k, i)[kFlags] & kNative) != 0; }
  int code(int k, std::int64_t i) const { return dtypes_.code(row(k, i)[kTypenum]); }

  // The storage code list k's array i must have, given its param's code.
  int expected_code(int k, std::int64_t i) const {
    const int p = code(0, i);
    if (k == extra_list()) return layout_.extra == 1 ? 0 : p;
    if (state_list(k)) return p < 2 ? p : code(2, i);  // 16-bit: as the first state
    return p;
  }

  Issue check_list_dtype(int k) const {
    if (quantized() && state_list(k)) {
      for (std::int64_t i = 0; i < n_; ++i)
        if (row(k, i)[kTypenum] != dtypes_.u8) return {What::CodeDtype, k, i};
      return {};
    }
    if (scale_list(k)) {
      for (std::int64_t i = 0; i < n_; ++i)
        if (row(k, i)[kTypenum] != dtypes_.f32 || !native(k, i)) return {What::ScaleDtype, k, i};
      return {};
    }
    for (std::int64_t i = 0; i < n_; ++i) {
      if (state_list(k) && k == 2 && code(0, i) >= 2) {
        const int s = code(2, i);
        if (s != 0 && s != 3) return {What::State16Dtype, 2, i};
      }
      if (code(k, i) != expected_code(k, i) || !native(k, i))
        return {What::DtypeMismatch, k, i};
    }
    return {};
  }

  Issue check_dtypes() const {
    for (std::int64_t i = 0; i < n_; ++i)
      if (code(0, i) < 0 || !native(0, i)) return {What::ParamDtype, 0, i};
    if (quantized())
      for (std::int64_t i = 0; i < n_; ++i)
        if (code(0, i) == 1) return {What::Int8Param, 0, i};
    for (int k = 1; k < L_; ++k) {
      const Issue found = check_list_dtype(k);
      if (found.what != What::None) return found;
    }
    if (layout_.extra)
      for (std::int64_t i = 0; i < n_; ++i)
        if (code(0, i) < 2) return {What::ExtraNot16, extra_list(), i};
    return {};
  }

  Issue check_shapes_devices(int from, int to) const {
    for (int k = std::max(from, 1); k < to; ++k) {
      if (k == 1 && layout_.row_grads) continue;
      if (scale_list(k)) {  // block scales have a shape of their own
        for (std::int64_t i = 0; i < n_; ++i)
          if (row(k, i)[kSize] != blocks(row(0, i)[kSize])) return {What::ScaleSize, k, i};
        continue;
      }
      for (std::int64_t i = 0; i < n_; ++i)
        if (row(k, i)[kShape] != row(0, i)[kShape] || row(k, i)[kSize] != row(0, i)[kSize])
          return {What::Shape, k, i};
    }
    const std::int64_t device = row(0, 0)[kDevice];
    for (int k = from; k < to; ++k)
      for (std::int64_t i = 0; i < n_; ++i)
        if (row(k, i)[kDevice] != device) return {What::Device, k, i};
    return {};
  }

  Issue check_writeable() const {
    for (int k = 0; k < L_; ++k) {
      if (k == 1) continue;
      for (std::int64_t i = 0; i < n_; ++i)
        if (!(row(k, i)[kFlags] & kCContig)) return {What::NotContiguous, k, i};
      for (std::int64_t i = 0; i < n_; ++i)
        if (!(row(k, i)[kFlags] & kWriteable)) return {What::ReadOnly, k, i};
    }
    return {};
  }

  std::uint64_t bytes(int k, std::int64_t i) const {
    return std::uint64_t(row(k, i)[kSize]) * std::uint64_t(row(k, i)[kItemsize]);
  }

  // The written arrays' byte ranges, sorted; two that overlap are an issue. The arrays
  // of one list usually come in address order (allocated one after the other): each
  // list's ranges are sorted only when they are not, and the lists' runs are then
  // merged, which costs far less than sorting all of them at once.
  Issue index_written() {
    written_.clear();
    written_.reserve(std::size_t(L_ - 1) * std::size_t(n_));
    const auto by_start = [](const Range& a, const Range& b) { return a.start < b.start; };
    std::vector<std::size_t> runs{0};  // the boundaries of the lists' runs
    for (int k = 0; k < L_; ++k) {
      if (k == 1) continue;
      for (std::int64_t i = 0; i < n_; ++i) {
        if (row(k, i)[kSize] == 0) continue;
        const std::uint64_t start = std::uint64_t(row(k, i)[kPtr]);
        written_.push_back({start, start + bytes(k, i), k, i});
      }
      const auto first = written_.begin() + std::ptrdiff_t(runs.back());
      if (!std::is_sorted(first, written_.end(), by_start))
        std::sort(first, written_.end(), by_start);
      runs.push_back(written_.size());
    }
    while (runs.size() > 2) {  // merge neighbouring runs pairwise
      std::vector<std::size_t> next{0};
      std::size_t j = 0;
      for (; j + 2 < runs.size(); j += 2) {
        const auto at = [&](std::size_t r) { return written_.begin() + std::ptrdiff_t(runs[r]); };
        std::inplace_merge(at(j), at(j + 1), at(j + 2), by_start);
        next.push_back(runs[j + 2]);
      }
      if (j + 1 < runs.size()) next.push_back(runs.back());  // an odd run left over
      runs.swap(next);
    }
    for (std::size_t j = 1; j < written_.size(); ++j)
      if (written_[j].start < written_[j - 1].end)
        return {What::Overlap, written_[j - 1].list, written_[j - 1].index, written_[j].list,
                written_[j].index};
    return {};
  }

  // No gradient may overlap a written array (the written ones are disjoint and sorted:
  // only the one with the largest start below a gradient's end can).
  Issue check_grads_overlap() const {
    if (written_.empty()) return {};
    for (std::int64_t i = 0; i < n_; ++i) {
      if (row(1, i)[kSize] == 0) continue;
      const std::uint64_t start = std::uint64_t(row(1, i)[kPtr]), end = start + bytes(1, i);
      auto it = std::lower_bound(written_.begin(), written_.end(), end,
                                 [](const Range& r, std::uint64_t e) { return r.start < e; });
      if (it != written_.begin() && std::prev(it)->end > start)
        return {What::Overlap, std::prev(it)->list, std::prev(it)->index, 1, i};
    }
    return {};
  }

  // One group per (param code, state code), in ascending order.
  void lay_out() {
    std::vector<int> key(static_cast<std::size_t>(n_));
    for (std::int64_t i = 0; i < n_; ++i) {
      const int p = code(0, i);
      const int s = quantized()           ? kInt8Block
                    : layout_.nstates > 0 ? code(2, i)
                                          : (p < 2 ? p : 0);
      key[std::size_t(i)] = p * 8 + s;
    }
    std::vector<int> keys(key);
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    where_.assign(std::size_t(n_), {0, 0});
    for (const int k : keys) {
      Group g;
      g.param = k / 8;
      g.state = k % 8;
      for (std::int64_t i = 0; i < n_; ++i)
        if (key[std::size_t(i)] == k) {
          where_[std::size_t(i)] = {groups_.size(), g.tensors.size()};
          g.tensors.push_back(i);
        }
      const std::size_t m = g.tensors.size();
      g.ptrs.resize(std::size_t(L_) * m);
      g.sizes.resize(m);
      for (std::size_t j = 0; j < m; ++j) {
        g.sizes[j] = row(0, g.tensors[j])[kSize];
        for (int s = 0; s < L_; ++s) g.ptrs[s * m + j] = std::uint64_t(row(s, g.tensors[j])[kPtr]);
      }
      groups_.push_back(std::move(g));
    }
  }

  void patch_slot(int slot) {
    for (std::int64_t i = 0; i < n_; ++i) {
      Group& g = groups_[where_[std::size_t(i)].first];
      g.ptrs[slot * g.tensors.size() + where_[std::size_t(i)].second] =
          std::uint64_t(row(slot, i)[kPtr]);
    }
  }

  struct Range {
    std::uint64_t start, end;
    int list;
    std::int64_t index;
  };

  std::vector<std::int64_t> rows_;  // params and gradients
  const std::int64_t* src_;          // every list's rows, while the constructor runs
  int L_;
  std::int64_t n_;
  Layout layout_;
  Dtypes dtypes_;
  Issue issue_;
  std::vector<Group> groups_;
  std::vector<std::pair<std::size_t, std::size_t>> where_;  // tensor -> (group, position)
  std::vector<Range> written_;
};

}  // namespace fo::tables
