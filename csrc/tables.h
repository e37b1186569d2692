// The validation of a step's arrays and the pointer tables the kernels take.
//
// The Python layer describes every array of a call as one row of integers
// (address, element count, itemsize, type number, flags, shape hash, ndim, device);
// `Tables` checks all rows together, in the documented order (dtypes, shapes,
// devices, writeability, overlap), and lays out one pointer table per storage layout.
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
// 2..: states, last: the extra buffers); an overlap names a second array too.
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
};

struct Issue {
  What what = What::None;
  int list = 0;
  std::int64_t index = 0;
  int list2 = 0;
  std::int64_t index2 = 0;
};

// The dtype codes of the kernels (fo::DType): float32 0, float64 1, float16 2,
// bfloat16 3; -1 for anything else.
struct Dtypes {
  std::int64_t f32, f64, f16, bf16_numpy, bf16_marker;
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
};

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
      : rows_(rows, rows + std::size_t(lists) * std::size_t(n) * kCols),
        L_(lists), n_(n), layout_(layout), dtypes_(dtypes) {
    issue_ = check_dtypes();
    if (issue_.what == What::None) issue_ = check_shapes_devices(0, L_);
    if (issue_.what == What::None && !layout_.read_only) issue_ = check_writeable();
    if (issue_.what == What::None && !layout_.read_only) issue_ = index_written();
    if (issue_.what == What::None && !layout_.read_only) issue_ = check_grads_overlap();
    if (issue_.what == What::None) lay_out();
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
      saved[std::size_t(i)] = row(1, i)[kPtr];
      row(1, i)[kPtr] = std::int64_t(ptrs[i]);
    }
    Issue found;
    if (!layout_.read_only) found = check_grads_overlap();
    if (found.what != What::None) {
      for (std::int64_t i = 0; i < n_; ++i) row(1, i)[kPtr] = saved[std::size_t(i)];
      return found;
    }
    patch_slot(1);
    return found;
  }

 private:
  std::int64_t* row(int k, std::int64_t i) { return rows_.data() + (k * n_ + i) * kCols; }
  const std::int64_t* row(int k, std::int64_t i) const {
    return rows_.data() + (k * n_ + i) * kCols;
  }
  int state_list(int k) const { return k >= 2 && k < 2 + layout_.nstates; }
  int extra_list() const { return layout_.extra ? L_ - 1 : -1; }
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
    for (int k = 1; k < L_; ++k) {
      const Issue found = check_list_dtype(k);
      if (found.what != What::None) return found;
    }
    if (layout_.extra)
      for (std::int64_t i = 0; i < n_; ++i)
        if (code(0, i) < 2) return {What::ExtraNot16, L_ - 1, i};
    return {};
  }

  Issue check_shapes_devices(int from, int to) const {
    for (int k = std::max(from, 1); k < to; ++k)
      for (std::int64_t i = 0; i < n_; ++i)
        if (row(k, i)[kShape] != row(0, i)[kShape] || row(k, i)[kSize] != row(0, i)[kSize])
          return {What::Shape, k, i};
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

  // The written arrays' byte ranges, sorted; two that overlap are an issue.
  Issue index_written() {
    written_.clear();
    for (int k = 0; k < L_; ++k) {
      if (k == 1) continue;
      for (std::int64_t i = 0; i < n_; ++i) {
        if (row(k, i)[kSize] == 0) continue;
        const std::uint64_t start = std::uint64_t(row(k, i)[kPtr]);
        written_.push_back({start, start + bytes(k, i), k, i});
      }
    }
    std::sort(written_.begin(), written_.end(),
              [](const Range& a, const Range& b) { return a.start < b.start; });
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
      const int s = layout_.nstates > 0 ? code(2, i) : (p < 2 ? p : 0);
      key[std::size_t(i)] = p * 4 + s;
    }
    std::vector<int> keys(key);
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    where_.assign(std::size_t(n_), {0, 0});
    for (const int k : keys) {
      Group g;
      g.param = k / 4;
      g.state = k % 4;
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

  std::vector<std::int64_t> rows_;
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
