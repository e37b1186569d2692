// fusedopt._cuda: the CUDA kernels. Same contract as fusedopt._cpu.step, for
// device addresses, plus the stream to run on, and the device-side pieces of a
// loss-scaled, clipped step (grad_stats, scale_ptr, step_ptr, advance_step). The
// Python layer validates every array before calling; this module checks what it
// needs to run safely, and raises before any CUDA call when a table is wrong.
//
// Nothing here calls CUDA at import time, and the runtime is linked statically:
// the module imports on a machine without a GPU or a driver, and the first CUDA
// call (device_count, step) is where the absence shows.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/layouts.h"
#include "core/rules.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/scalars.h"

namespace py = pybind11;
using fo::cuda::check_cuda;

namespace {

// Makes `device` current for the launches and restores the caller's device after,
// so a step on arrays of device 1 neither fails nor leaves the thread switched. The
// constructor throws when the device cannot be set; the destructor never does.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = prev_;
    cudaGetDevice(&now);
    if (now != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// The device that owns a pointer; throws when the pointer is not device memory.
int device_of(const std::string& op, const char* what, std::uint64_t address) {
  cudaPointerAttributes attr{};
  check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(std::uintptr_t(address))),
             op + ": cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(op + ": " + what + " is not CUDA device memory");
  return attr.device;
}

// Every non-empty tensor of a table slot (`ptrs[from..n)`) must be on `device`, the
// device of `reference` (for the message).
void check_devices(const std::string& op, const std::string& slot, const std::uint64_t* ptrs,
                   const std::int64_t* sizes, std::int64_t n, std::int64_t from, int device,
                   const std::string& reference) {
  for (std::int64_t j = from; j < n; ++j) {
    if (sizes[j] == 0) continue;
    const std::string what = slot + "[" + std::to_string(j) + "]";
    const int dev = device_of(op, what.c_str(), ptrs[j]);
    if (dev != device)
      throw std::invalid_argument(op + ": " + what + " is on device " + std::to_string(dev) +
                                  ", " + reference + " on device " + std::to_string(device) +
                                  "; all arrays of a call must be on one device");
  }
}

// A device pointer argument that must hold doubles on `device` (0: absent).
const double* device_doubles(const std::string& op, const char* what, std::uint64_t address,
                             int device) {
  if (address == 0) return nullptr;
  if (device_of(op, what, address) != device)
    throw std::invalid_argument(op + ": " + what + " is on device " +
                                std::to_string(device_of(op, what, address)) +
                                ", the arrays on device " + std::to_string(device));
  return reinterpret_cast<const double*>(std::uintptr_t(address));
}

void check_aligned(const std::string& op, const char* what, std::uint64_t address) {
  if (address % alignof(double) != 0)
    throw std::invalid_argument(op + ": " + what + " must be 8-byte aligned (a float64 array)");
}

void check_contiguous(const std::string& op, const py::array& a, const py::array& b,
                      const py::array& c) {
  if (!(a.flags() & py::array::c_style) || !(b.flags() & py::array::c_style) ||
      !(c.flags() & py::array::c_style))
    throw std::invalid_argument(op + ": pointer, size and hyperparameter arrays must be contiguous");
}

// Number of state buffers of `kernel`, or -1 for an unknown name.
int num_states(const std::string& kernel) {
  int n = -1;
  fo::with_rule(kernel, [&](auto rule) { n = decltype(rule)::kStates; });
  return n;
}

const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float64";
    case 2: return "float16";
    case 3: return "bfloat16";
    case 4: return "8-bit";
  }
  return "?";
}

std::string layout_name(int param, int state, int extra) {
  std::string s = dtype_name(param);
  if (param == state && extra == 0) return s;
  if (param == state && extra == fo::kEmaBit) return s + ", EMA";
  s += " params, " + std::string(dtype_name(state)) + " states";
  if ((extra & 3) == 1) s += ", master weights";
  if ((extra & 3) == 2) s += ", Kahan";
  if ((extra & fo::kEmaBit) != 0) s += ", EMA";
  return s;
}

// 1: this build has a kernel for the rule in the layout; 0: the layout exists but
// this rule has no kernel in it (bandwidth probes); -1: no such layout.
int built(const std::string& kernel, int param, int state, int extra) {
  int result = -1;
  fo::with_rule(kernel, [&](auto rule) {
    fo::with_layout(param, state, extra, [&](auto, auto p, auto s, auto x) {
      result = fo::cuda::is_built<decltype(rule), decltype(x)::value, decltype(p), decltype(s),
                                  decltype(x)::ema>();
    });
  });
  return result;
}

using StepEntry = void (*)(const fo::cuda::StepCall&);

StepEntry step_entry(int param, int state) {
  namespace fc = fo::cuda;
  const bool f32_state = state == int(fo::DType::Float32);
  if (state == int(fo::DType::Int8Block)) {
    switch (fo::DType(param)) {
      case fo::DType::Float32: return fc::variant_f32_q8::step;
      case fo::DType::Float16: return fc::variant_f16_q8::step;
      case fo::DType::BFloat16: return fc::variant_bf16_q8::step;
      default: return nullptr;
    }
  }
  switch (fo::DType(param)) {
    case fo::DType::Float32: return fc::variant_f32::step;
    case fo::DType::Float64: return fc::variant_f64::step;
    case fo::DType::Float16: return f32_state ? fc::variant_f16_f32::step : fc::variant_f16_bf16::step;
    case fo::DType::BFloat16: return f32_state ? fc::variant_bf16_f32::step : fc::variant_bf16_bf16::step;
  }
  return nullptr;
}

void step(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
          py::array_t<std::int64_t, 0> sizes, py::array_t<double, 0> hyper,
          std::uintptr_t stream, int state_dtype, int extra, double grad_scale, bool stochastic,
          std::uint64_t key, double step_count, double l1, std::uint64_t scale_ptr,
          std::uint64_t step_ptr, double ema_decay, std::uint32_t unsigned_states) {
  check_contiguous(kernel, ptrs, sizes, hyper);
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  const std::int64_t n = sizes.size();
  const std::int64_t nptrs = ptrs.size(), nhyper = hyper.size();
  // Exactly the layout's slots: the kernels read every one of them (8-bit states: a
  // scale array per state after the others; no EMA slot with them).
  const bool int8 = state_dtype == int(fo::DType::Int8Block);
  const bool ema = (extra & fo::kEmaBit) != 0;
  if (int8 && ema) throw std::invalid_argument(kernel + ": no EMA slot with 8-bit state");
  const std::int64_t nslots = 2 + ns + ((extra & 3) != 0 ? 1 : 0) + (ema ? 1 : 0) + (int8 ? ns : 0);
  if (nptrs != nslots * n)
    throw std::invalid_argument(kernel + ": expected " + std::to_string(nslots) + " x " +
                                std::to_string(n) + " pointers, got " + std::to_string(nptrs));
  int size = 0;
  fo::with_rule(kernel, [&](auto rule) { size = fo::hyper_size<decltype(rule)>(); });
  const bool per_tensor = nhyper == size * n && n > 1;
  if (nhyper != size && !per_tensor)
    throw std::invalid_argument(kernel + ": expected " + std::to_string(size) +
                                " hyperparameters (or " + std::to_string(size) +
                                " per tensor), got " + std::to_string(nhyper));
  const int state = state_dtype < 0 ? dtype : state_dtype;
  const int has = built(kernel, dtype, state, extra);
  if (has < 0)
    throw std::invalid_argument(kernel + ": unsupported storage layout (param " +
                                std::to_string(dtype) + ", state " + std::to_string(state) +
                                ", extra " + std::to_string(extra) + ")");
  const std::string name = kernel + "[" + layout_name(dtype, state, extra) + "]";
  if (has == 0) throw std::invalid_argument(name + ": this build has no kernel for this layout");
  check_aligned(kernel, "scale_ptr", scale_ptr);
  check_aligned(kernel, "step_ptr", step_ptr);

  const std::uint64_t* p = ptrs.data();
  const std::int64_t* sz = sizes.data();
  std::int64_t first = -1;  // first non-empty tensor: its param names the device
  for (std::int64_t j = 0; j < n; ++j) {
    if (sz[j] < 0)
      throw std::invalid_argument(kernel + ": negative size for tensor " + std::to_string(j));
    if (sz[j] > 0 && first < 0) first = j;
  }
  if (first < 0) return;  // nothing to update: no CUDA call at all

  fo::cuda::StepCall call{kernel, name, dtype, state, extra, p, sz, n, hyper.data(), per_tensor,
                          fo::Mode{grad_scale, stochastic ? 1.0 : 0.0, key, step_count, l1,
                                   ema_decay, unsigned_states},
                          reinterpret_cast<cudaStream_t>(stream), nullptr, nullptr};
  const StepEntry entry = step_entry(dtype, state);
  py::gil_scoped_release nogil;
  const std::string first_param = "params[" + std::to_string(first) + "]";
  const int device = device_of(kernel, first_param.c_str(), p[first]);
  check_devices(kernel, "params", p, sz, n, first + 1, device, first_param);
  DeviceGuard guard(device);
  call.scale = device_doubles(kernel, "scale_ptr", scale_ptr, device);
  call.count = device_doubles(kernel, "step_ptr", step_ptr, device);
  entry(call);
  // buffers of the pool are not reused before these kernels are done with them
  auto& pool = fo::cuda::ScalarPool::get();
  pool.note_use(scale_ptr, call.stream, kernel);
  pool.note_use(step_ptr, call.stream, kernel);
}

using RowsEntry = void (*)(const fo::cuda::RowsCall&);

RowsEntry rows_entry(int param, int state) {
  namespace fc = fo::cuda;
  const bool f32_state = state == int(fo::DType::Float32);
  switch (fo::DType(param)) {
    case fo::DType::Float32: return fc::variant_f32::step_rows;
    case fo::DType::Float64: return fc::variant_f64::step_rows;
    case fo::DType::Float16:
      return f32_state ? fc::variant_f16_f32::step_rows : fc::variant_f16_bf16::step_rows;
    case fo::DType::BFloat16:
      return f32_state ? fc::variant_bf16_f32::step_rows : fc::variant_bf16_bf16::step_rows;
  }
  return nullptr;
}

// _cpu.step_rows for device memory: the row indices (rows: their device addresses) are
// read on the device.
void step_rows(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
               py::array_t<std::uint64_t, 0> rows, py::array_t<std::int64_t, 0> counts,
               py::array_t<std::int64_t, 0> row_len, py::array_t<double, 0> hyper,
               std::uintptr_t stream, int state_dtype, int extra, double grad_scale,
               bool stochastic, std::uint64_t key, double step_count) {
  check_contiguous(kernel, ptrs, counts, hyper);
  check_contiguous(kernel, rows, row_len, hyper);
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  if ((extra & fo::kEmaBit) != 0)
    throw std::invalid_argument(kernel + ": a row-sparse step has no EMA slot");
  if (state_dtype == int(fo::DType::Int8Block))
    throw std::invalid_argument(kernel + ": a row-sparse step has no 8-bit state");
  int reductions = 0;
  fo::with_rule(kernel, [&](auto rule) { reductions = fo::reduce_count<decltype(rule)>(); });
  if (reductions > 0)
    throw std::invalid_argument(kernel + ": a two-pass rule has no row-sparse step");
  const std::int64_t n = counts.size();
  if (rows.size() != n || row_len.size() != n)
    throw std::invalid_argument(kernel + ": rows, counts and row_len must have one entry per tensor");
  const std::int64_t nslots = 2 + ns + (extra != 0 ? 1 : 0);
  if (ptrs.size() != nslots * n)
    throw std::invalid_argument(kernel + ": expected " + std::to_string(nslots) + " x " +
                                std::to_string(n) + " pointers, got " + std::to_string(ptrs.size()));
  int size = 0;
  fo::with_rule(kernel, [&](auto rule) { size = fo::hyper_size<decltype(rule)>(); });
  const bool per_tensor = hyper.size() == size * n && n > 1;
  if (hyper.size() != size && !per_tensor)
    throw std::invalid_argument(kernel + ": expected " + std::to_string(size) +
                                " hyperparameters (or " + std::to_string(size) +
                                " per tensor), got " + std::to_string(hyper.size()));
  const int state = state_dtype < 0 ? dtype : state_dtype;
  if (built(kernel, dtype, state, extra) < 1 || kernel.rfind("stream", 0) == 0 || kernel == "ema")
    throw std::invalid_argument(kernel + ": no row-sparse kernel for this layout");
  std::int64_t first = -1;  // first tensor with touched rows: its param names the device
  for (std::int64_t j = 0; j < n; ++j) {
    if (counts.data()[j] < 0 || row_len.data()[j] < 0)
      throw std::invalid_argument(kernel + ": negative count or row length");
    if (counts.data()[j] > 0 && row_len.data()[j] > 0 && first < 0) first = j;
  }
  if (first < 0) return;  // nothing to update: no CUDA call at all
  const std::string name = kernel + "[rows, " + layout_name(dtype, state, extra) + "]";
  fo::cuda::RowsCall call{
      fo::cuda::StepCall{kernel, name, dtype, state, extra, ptrs.data(), nullptr, n,
                         hyper.data(), per_tensor,
                         fo::Mode{grad_scale, stochastic ? 1.0 : 0.0, key, step_count},
                         reinterpret_cast<cudaStream_t>(stream), nullptr, nullptr},
      rows.data(), counts.data(), row_len.data()};
  const RowsEntry entry = rows_entry(dtype, state);
  py::gil_scoped_release nogil;
  const int device = device_of(kernel, "the first parameter array", ptrs.data()[first]);
  DeviceGuard guard(device);
  entry(call);
}

using FactoredEntry = void (*)(const fo::cuda::FactoredCall&);

FactoredEntry factored_entry(int param, int state) {
  namespace fc = fo::cuda;
  const bool f32_state = state == int(fo::DType::Float32);
  switch (fo::DType(param)) {
    case fo::DType::Float32: return fc::variant_f32::step_factored;
    case fo::DType::Float64: return fc::variant_f64::step_factored;
    case fo::DType::Float16:
      return f32_state ? fc::variant_f16_f32::step_factored : fc::variant_f16_bf16::step_factored;
    case fo::DType::BFloat16:
      return f32_state ? fc::variant_bf16_f32::step_factored : fc::variant_bf16_bf16::step_factored;
  }
  return nullptr;
}

// _cpu.step_factored on device memory, enqueued on `stream`.
void step_factored(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
                   py::array_t<std::int64_t, 0> shapes, py::array_t<double, 0> hyper,
                   std::uintptr_t stream, int state_dtype, double grad_scale, double step_count) {
  check_contiguous(kernel, ptrs, shapes, hyper);
  bool known = false;
  int size = 0;
  fo::with_factored_rule(kernel, [&](auto rule) {
    known = true;
    size = fo::hyper_size<decltype(rule)>();
  });
  if (!known) throw std::invalid_argument("unknown factored kernel '" + kernel + "'");
  if (shapes.size() % 3 != 0)
    throw std::invalid_argument(kernel + ": shapes must hold (batch, rows, cols) per tensor");
  const std::int64_t n = shapes.size() / 3;
  if (ptrs.size() != 4 * n)
    throw std::invalid_argument(kernel + ": expected 4 x " + std::to_string(n) +
                                " pointers, got " + std::to_string(ptrs.size()));
  if (hyper.size() != size)
    throw std::invalid_argument(kernel + ": expected " + std::to_string(size) +
                                " hyperparameters, got " + std::to_string(hyper.size()));
  const int state = state_dtype < 0 ? dtype : state_dtype;
  if (state == int(fo::DType::Int8Block))
    throw std::invalid_argument(kernel + ": a factored step has no 8-bit state");
  bool layout = false;
  fo::with_layout(dtype, state, 0, [&](auto, auto, auto, auto) { layout = true; });
  if (!layout)
    throw std::invalid_argument(kernel + ": unsupported storage layout (param " +
                                std::to_string(dtype) + ", state " + std::to_string(state) + ")");
  std::int64_t first = -1;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t* sh = shapes.data() + 3 * j;
    if (sh[0] < 0 || sh[1] < 0 || sh[2] < 0)
      throw std::invalid_argument(kernel + ": negative extent for tensor " + std::to_string(j));
    const std::int64_t numel = sh[1] == 0 ? sh[2] : sh[0] * sh[1] * sh[2];
    if (numel > 0 && first < 0) first = j;
  }
  if (first < 0) return;  // nothing to update: no CUDA call at all
  const std::string name = kernel + "[" + layout_name(dtype, state, 0) + "]";
  fo::cuda::FactoredCall call{
      fo::cuda::StepCall{kernel, name, dtype, state, 0, ptrs.data(), nullptr, n, hyper.data(),
                         false, fo::Mode{grad_scale, 0.0, 0, step_count},
                         reinterpret_cast<cudaStream_t>(stream), nullptr, nullptr},
      shapes.data()};
  const FactoredEntry entry = factored_entry(dtype, state);
  py::gil_scoped_release nogil;
  const int device = device_of(kernel, "the first parameter array", ptrs.data()[first]);
  DeviceGuard guard(device);
  entry(call);
}

// tables: (dtype code, ptrs 1 x n, sizes) per gradient dtype of the step.
void grad_stats(const py::list& tables, std::uintptr_t stream, std::uint64_t out_ptr,
                double inv_scale, double max_norm, bool skip_nonfinite) {
  const std::string op = "grad_stats";
  if (out_ptr == 0) throw std::invalid_argument(op + ": out_ptr is required");
  check_aligned(op, "out_ptr", out_ptr);
  std::vector<fo::cuda::StatsTable> parts;
  std::vector<py::array_t<std::uint64_t, 0>> keep_ptrs;  // the tables' arrays, alive here
  std::vector<py::array_t<std::int64_t, 0>> keep_sizes;
  std::uint64_t first = 0;  // first non-empty gradient: it names the device
  std::string first_name;
  std::int64_t k = 0;
  for (const py::handle item : tables) {
    const auto entry = item.cast<py::tuple>();
    if (entry.size() != 3)
      throw std::invalid_argument(op + ": each table is (dtype, ptrs, sizes)");
    const int dtype = entry[0].cast<int>();
    auto ptrs = entry[1].cast<py::array_t<std::uint64_t, 0>>();
    auto sizes = entry[2].cast<py::array_t<std::int64_t, 0>>();
    if (!(ptrs.flags() & py::array::c_style) || !(sizes.flags() & py::array::c_style))
      throw std::invalid_argument(op + ": pointer and size arrays must be contiguous");
    if (dtype < 0 || dtype > int(fo::DType::BFloat16))
      throw std::invalid_argument(op + ": unsupported dtype code " + std::to_string(dtype));
    const std::int64_t n = sizes.size();
    if (ptrs.size() != n)
      throw std::invalid_argument(op + ": expected 1 x " + std::to_string(n) +
                                  " pointers, got " + std::to_string(ptrs.size()));
    for (std::int64_t j = 0; j < n; ++j) {
      if (sizes.data()[j] < 0)
        throw std::invalid_argument(op + ": negative size for tensor " + std::to_string(j));
      if (sizes.data()[j] > 0 && first == 0) {
        first = ptrs.data()[j];
        first_name = "tables[" + std::to_string(k) + "] gradients[" + std::to_string(j) + "]";
      }
    }
    ++k;
    parts.push_back({fo::DType(dtype), ptrs.data(), sizes.data(), n});
    keep_ptrs.push_back(std::move(ptrs));
    keep_sizes.push_back(std::move(sizes));
  }
  py::gil_scoped_release nogil;
  const int device = first != 0 ? device_of(op, first_name.c_str(), first)
                                : device_of(op, "out_ptr", out_ptr);
  for (std::size_t t = 0; t < parts.size(); ++t)
    check_devices(op, "tables[" + std::to_string(t) + "] gradients", parts[t].ptrs,
                  parts[t].sizes, parts[t].n, 0, device, first_name);
  DeviceGuard guard(device);
  double* out = const_cast<double*>(device_doubles(op, "out_ptr", out_ptr, device));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  fo::cuda::grad_stats(parts, s, out, inv_scale, max_norm, skip_nonfinite);
  fo::cuda::ScalarPool::get().note_use(out_ptr, s, op);
}

// A few float64 values in device memory (the {skip, coef, norm} of a checked step, a
// device step count) with a pinned host mirror, taken from fo::cuda::ScalarPool and
// zeroed on the caller's stream: fetch() enqueues the copy to the host and records
// an event after it; values() waits for that event only, not for work enqueued
// after it. Dropping one makes no CUDA call (no wait, no free, nothing that can
// throw): the pool reuses the buffer once the kernels that used it are done.
// Exposes __cuda_array_interface__ for CuPy and torch.
class DeviceScalars {
 public:
  DeviceScalars(int size, int device, std::uintptr_t stream) : size_(size), device_(device) {
    if (size <= 0 || size > fo::cuda::kScalarsMax)
      throw std::invalid_argument("DeviceScalars: size must be positive and at most " +
                                  std::to_string(fo::cuda::kScalarsMax));
    py::gil_scoped_release nogil;
    DeviceGuard guard(device);
    slot_ = fo::cuda::ScalarPool::get().acquire(device, reinterpret_cast<cudaStream_t>(stream));
  }
  ~DeviceScalars() { fo::cuda::ScalarPool::get().release(slot_); }
  DeviceScalars(const DeviceScalars&) = delete;
  DeviceScalars& operator=(const DeviceScalars&) = delete;

  std::uint64_t ptr() const { return std::uint64_t(std::uintptr_t(slot_->dev)); }
  int size() const { return size_; }
  int device() const { return device_; }

  void fetch(std::uintptr_t stream) {
    py::gil_scoped_release nogil;
    DeviceGuard guard(device_);
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    check_cuda(cudaMemcpyAsync(slot_->host, slot_->dev, sizeof(double) * size_,
                               cudaMemcpyDeviceToHost, s),
               "DeviceScalars.fetch: cudaMemcpyAsync");
    check_cuda(cudaEventRecord(slot_->fetched, s), "DeviceScalars.fetch: cudaEventRecord");
    fetched_ = true;
  }

  py::list values() {
    if (!fetched_) throw std::logic_error("DeviceScalars.values: nothing was fetched");
    {
      py::gil_scoped_release nogil;
      check_cuda(cudaEventSynchronize(slot_->fetched),
                 "DeviceScalars.values: cudaEventSynchronize");
    }
    py::list out;
    for (int k = 0; k < size_; ++k) out.append(slot_->host[k]);
    return out;
  }

  py::dict array_interface() const {
    py::dict d;
    d["shape"] = py::make_tuple(size_);
    d["typestr"] = "<f8";
    d["data"] = py::make_tuple(ptr(), false);
    d["version"] = 3;
    return d;
  }

 private:
  int size_, device_;
  fo::cuda::ScalarSlot* slot_ = nullptr;
  bool fetched_ = false;
};

void advance_step(std::uint64_t step_ptr, std::uint64_t scale_ptr, std::uintptr_t stream) {
  const std::string op = "advance_step";
  if (step_ptr == 0) throw std::invalid_argument(op + ": step_ptr is required");
  check_aligned(op, "step_ptr", step_ptr);
  check_aligned(op, "scale_ptr", scale_ptr);
  py::gil_scoped_release nogil;
  const int device = device_of(op, "step_ptr", step_ptr);
  DeviceGuard guard(device);
  const double* scale = device_doubles(op, "scale_ptr", scale_ptr, device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  fo::cuda::advance_step(reinterpret_cast<double*>(std::uintptr_t(step_ptr)), scale, s);
  auto& pool = fo::cuda::ScalarPool::get();
  pool.note_use(step_ptr, s, op);
  pool.note_use(scale_ptr, s, op);
}

// Number of CUDA devices; 0, not an error, when there is no GPU or no driver.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error this call recorded
    return 0;
  }
  return n;
}

// The CUDA version the installed driver supports (e.g. 12040 for 12.4), 0 when no
// driver is installed.
int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

std::string cuda_version_name(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

// Why device_count() is 0, or None. Tells "no GPU" and "no driver" apart from "a
// driver too old for the CUDA runtime this module was built with": the runtime is
// linked statically, so the driver must support its version.
py::object device_error() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess) return py::none();
  cudaGetLastError();
  const std::string what = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  const int driver = driver_version();
  if (driver == 0 && err == cudaErrorInsufficientDriver)
    return py::str("no NVIDIA driver is installed (libcuda.so not found; " + what + ")");
  if (driver > 0 && driver < CUDART_VERSION) {
    std::string need = "a driver for CUDA " + cuda_version_name(CUDART_VERSION) + " or newer";
    if (CUDART_VERSION / 1000 == 13) need += " (the 580 series or newer)";
    return py::str("the NVIDIA driver supports CUDA " + cuda_version_name(driver) +
                   ", older than the CUDA " + cuda_version_name(CUDART_VERSION) +
                   " runtime that fusedopt._cuda is linked with; it needs " + need + " (" +
                   what + ")");
  }
  return py::str(what);
}

// The CUDA device that owns `address`; the current device for a null address (an
// empty array).
int pointer_device(std::uint64_t address) {
  if (address == 0) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "pointer_device: cudaGetDevice");
    return device;
  }
  return device_of("pointer_device", "the address", address);
}

// The launcher's limits for a kernel and its extra buffer: lets tests cross every
// batching boundary.
py::dict launch_limits(const std::string& kernel, int extra, int state_dtype) {
  const int ns = kernel == "grad_stats" ? 0 : num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  const int nslots = 2 + ns + ((extra & 3) != 0 ? 1 : 0) + ((extra & fo::kEmaBit) != 0 ? 1 : 0) +
                     (state_dtype == int(fo::DType::Int8Block) ? ns : 0);
  py::dict d;
  auto fill = [&](auto batch) {
    using B = decltype(batch);
    d["chunk"] = fo::cuda::kChunk;
    d["block_threads"] = fo::cuda::kBlockThreads;
    d["max_blocks"] = fo::cuda::kMaxBlocks;
    d["max_tensors"] = B::kMaxTensors;
    d["param_bytes"] = sizeof(B);
  };
  if (kernel == "grad_stats") {
    fill(fo::cuda::Batch<1>{});
    return d;
  }
  switch (nslots) {
    case 2: fill(fo::cuda::Batch<2>{}); break;
    case 3: fill(fo::cuda::Batch<3>{}); break;
    case 4: fill(fo::cuda::Batch<4>{}); break;
    case 5: fill(fo::cuda::Batch<5>{}); break;
    case 6: fill(fo::cuda::Batch<6>{}); break;
    case 7: fill(fo::cuda::Batch<7>{}); break;
    case 8: fill(fo::cuda::Batch<8>{}); break;
    case 9: fill(fo::cuda::Batch<9>{}); break;
    default: throw std::invalid_argument(kernel + ": no launcher for " + std::to_string(nslots) + " slots");
  }
  return d;
}

// How many launches a step of `kernel` over tensors of these sizes makes (host-side
// packing only: no GPU needed): 1 for a single tensor, a flat buffer.
std::int64_t count_launches(const std::string& kernel, py::array_t<std::int64_t, 0> sizes,
                            int extra) {
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  const int nslots = 2 + ns + (extra != 0 ? 1 : 0);
  const std::int64_t* sz = sizes.data();
  const std::int64_t n = sizes.size();
  switch (nslots) {
    case 2: return fo::cuda::count_launches<2>(sz, n);
    case 3: return fo::cuda::count_launches<3>(sz, n);
    case 4: return fo::cuda::count_launches<4>(sz, n);
    case 5: return fo::cuda::count_launches<5>(sz, n);
    case 6: return fo::cuda::count_launches<6>(sz, n);
  }
  throw std::invalid_argument(kernel + ": no launcher for " + std::to_string(nslots) + " slots");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedopt CUDA kernels (multi-tensor launcher)";
  m.def("step", &step, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        py::arg("hyper"), py::arg("stream") = std::uintptr_t(0), py::kw_only(),
        py::arg("state_dtype") = -1, py::arg("extra") = 0, py::arg("grad_scale") = 1.0,
        py::arg("stochastic") = false, py::arg("key") = 0, py::arg("step") = 1.0,
        py::arg("l1") = 0.0, py::arg("scale_ptr") = 0, py::arg("step_ptr") = 0,
        py::arg("ema_decay") = 0.0, py::arg("unsigned_states") = 0u,
        "Run `kernel` in place over the device tensors of a pointer table (slots x tensors),\n"
        "enqueued on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream).\n"
        "The arguments after `stream` are _cpu.step's, with the same results bit for bit.\n"
        "`scale_ptr`: device address of float64 {skip, coef, norm} from grad_stats; when\n"
        "given, a non-zero skip makes the step a no-op, and gradients are also multiplied by\n"
        "coef. `step_ptr`: device address of a float64 step count t of this update; when\n"
        "given, the per-step scalars are computed on the device from it (instead of `step`\n"
        "on the host; the device's pow may differ from the host's in the last bit), and `key`\n"
        "is the seed of the random stream step_key(key, t), as the host computes it.\n"
        "`state_dtype` 4 (8-bit states) and `unsigned_states`: as _cpu.step.");
  m.def("step_rows", &step_rows, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"),
        py::arg("rows"), py::arg("counts"), py::arg("row_len"), py::arg("hyper"),
        py::arg("stream") = std::uintptr_t(0), py::kw_only(), py::arg("state_dtype") = -1,
        py::arg("extra") = 0, py::arg("grad_scale") = 1.0, py::arg("stochastic") = false,
        py::arg("key") = 0, py::arg("step") = 1.0,
        "_cpu.step_rows on device memory, enqueued on `stream`; `rows` holds the device\n"
        "addresses of the row indices, which only the device reads.");
  m.def("step_factored", &step_factored, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"),
        py::arg("shapes"), py::arg("hyper"), py::arg("stream") = std::uintptr_t(0),
        py::kw_only(), py::arg("state_dtype") = -1, py::arg("grad_scale") = 1.0,
        py::arg("step") = 1.0,
        "_cpu.step_factored on device memory, enqueued on `stream` (five kernels; nothing\n"
        "read back by the host). Same results as the CPU within rounding (block sums\n"
        "associate differently).");
  m.def("grad_stats", &grad_stats, py::arg("tables"), py::arg("stream"), py::arg("out_ptr"),
        py::arg("inv_scale") = 1.0, py::arg("max_norm") = -1.0, py::arg("skip_nonfinite") = true,
        "One pass over the gradients of pointer tables [(dtype, ptrs 1 x n, sizes), ...] on\n"
        "`stream`: writes to the device float64 array at out_ptr {skip, coef, norm}: norm is\n"
        "the 2-norm of the gradients of all tables (a deterministic sum in float64) times\n"
        "inv_scale; skip is 1.0 when skip_nonfinite and some gradient is inf or NaN; coef =\n"
        "inv_scale * min(1, max_norm / (norm + 1e-6)) when max_norm > 0, else inv_scale.");
  py::class_<DeviceScalars>(m, "DeviceScalars",
                            "float64 values in device memory, zeroed on `stream`, with a\n"
                            "pinned host mirror; from a pool that reuses them once their\n"
                            "kernels are done.")
      .def(py::init<int, int, std::uintptr_t>(), py::arg("size"), py::arg("device"),
           py::arg("stream") = std::uintptr_t(0))
      .def_property_readonly("ptr", &DeviceScalars::ptr)
      .def_property_readonly("size", &DeviceScalars::size)
      .def_property_readonly("device", &DeviceScalars::device)
      .def_property_readonly("__cuda_array_interface__", &DeviceScalars::array_interface)
      .def("fetch", &DeviceScalars::fetch, py::arg("stream"),
           "Enqueue the copy to the host mirror on `stream` and record an event after it.")
      .def("values", &DeviceScalars::values,
           "The values of the last fetch, once its event has completed (waits for it only).");
  m.def("advance_step", &advance_step, py::arg("step_ptr"), py::arg("scale_ptr") = 0,
        py::arg("stream") = std::uintptr_t(0),
        "On `stream`: add 1 to the device float64 at step_ptr, unless scale_ptr's skip is set.");
  m.def("device_count", &device_count, "Number of CUDA devices; 0 without a GPU or driver.");
  m.def("device_error", &device_error, "Why device_count() is 0 (a string), or None.");
  m.def("driver_version", &driver_version,
        "The CUDA version the installed driver supports (12040: 12.4); 0 without a driver.");
  m.def("pointer_device", &pointer_device, py::arg("address"),
        "The CUDA device that owns a device address (ValueError for host memory).");
  m.attr("cuda_runtime_version") = CUDART_VERSION;  // the statically linked runtime
  m.def(
      "synchronize",
      [] {
        py::gil_scoped_release nogil;
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      },
      "Wait for all work on the current device.");
  m.def("hyper_size", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::hyper_size<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  });
  m.def("num_states", &num_states, py::arg("kernel"));
  m.def("num_reductions", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::reduce_count<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  }, py::arg("kernel"),
        "Per-tensor sums the kernel's first pass computes before its update (0: one pass).");
  m.def("first_pass_slots", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::reduce_slots<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  }, py::arg("kernel"),
        "Arrays per tensor the kernel's first pass reads (p, g and maybe the states; 0: one\n"
        "pass): its bytes per element are this times the storage size.");
  m.def(
      "has_kernel",
      [](const std::string& kernel, int dtype, int state_dtype, int extra) {
        if (num_states(kernel) < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
        return built(kernel, dtype, state_dtype < 0 ? dtype : state_dtype, extra) > 0;
      },
      py::arg("kernel"), py::arg("dtype"), py::arg("state_dtype") = -1, py::arg("extra") = 0,
      "Whether this build has a kernel for `kernel` in the storage layout.");
  m.def("count_launches", &count_launches, py::arg("kernel"), py::arg("sizes"),
        py::arg("extra") = 0,
        "Launches a step over tensors of these sizes makes (host-side packing, no GPU).");
  m.def("launch_limits", &launch_limits, py::arg("kernel"), py::arg("extra") = 0,
        py::arg("state_dtype") = -1,
        "Chunk size, threads per block, blocks and tensors per launch for `kernel`\n"
        "(\"grad_stats\": the gradient pass of a checked step).");
}
