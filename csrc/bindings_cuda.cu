// fusedopt._cuda: the CUDA kernels. Same contract as fusedopt._cpu.step, for
// device addresses, plus the stream to run on. The Python layer validates every
// array before calling; this module checks what it needs to run safely.
//
// Nothing here calls CUDA at import time, and the runtime is linked statically:
// the module imports on a machine without a GPU or a driver, and the first CUDA
// call (device_count, step) is where the absence shows.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/layouts.h"
#include "core/rules.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/update_functor.cuh"

namespace py = pybind11;
using fo::cuda::check_cuda;

namespace {

// Makes `device` current for the launches and restores the caller's device after,
// so a step on arrays of device 1 neither fails nor leaves the thread switched.
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
int device_of(const std::string& kernel, std::uint64_t address) {
  cudaPointerAttributes attr{};
  check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(std::uintptr_t(address))),
             kernel + ": cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(kernel + ": the parameter arrays are not CUDA device memory");
  return attr.device;
}

template <class Rule, class T>
void launch(const std::string& name, cudaStream_t stream, const std::uint64_t* ptrs,
            const std::int64_t* sizes, std::int64_t n, const typename Rule::Hyper& h) {
  // float32 runs in float, float64 in double, as on the CPU.
  const fo::cuda::UpdateFunctor<Rule, T, T> op{h};
  fo::cuda::multi_tensor_apply<2 + Rule::kStates>(name, stream, ptrs, sizes, n, op);
}

void step(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
          py::array_t<std::int64_t, 0> sizes, py::array_t<double, 0> hyper,
          std::uintptr_t stream) {
  if (!(ptrs.flags() & py::array::c_style) || !(sizes.flags() & py::array::c_style) ||
      !(hyper.flags() & py::array::c_style))
    throw std::invalid_argument(kernel + ": pointer, size and hyperparameter arrays must be contiguous");
  if (dtype != int(fo::DType::Float32) && dtype != int(fo::DType::Float64))
    throw std::invalid_argument(kernel + ": unsupported dtype code " + std::to_string(dtype));
  const std::int64_t n = sizes.size();
  const std::uint64_t* p = ptrs.data();
  const std::int64_t* sz = sizes.data();
  const double* hv = hyper.data();
  const std::int64_t nptrs = ptrs.size(), nhyper = hyper.size();

  const bool known = fo::with_rule(kernel, [&](auto rule) {
    using Rule = decltype(rule);
    constexpr int kSlots = 2 + Rule::kStates;
    // Exactly the rule's slots: the kernels read every one of them.
    if (nptrs != kSlots * n)
      throw std::invalid_argument(kernel + ": expected " + std::to_string(kSlots) + " x " +
                                  std::to_string(n) + " pointers, got " + std::to_string(nptrs));
    if (nhyper != fo::hyper_size<Rule>())
      throw std::invalid_argument(kernel + ": expected " + std::to_string(fo::hyper_size<Rule>()) +
                                  " hyperparameters, got " + std::to_string(nhyper));
    typename Rule::Hyper h;
    std::memcpy(&h, hv, sizeof(h));

    std::int64_t first = -1;  // first non-empty tensor: its param names the device
    for (std::int64_t j = 0; j < n; ++j) {
      if (sz[j] < 0)
        throw std::invalid_argument(kernel + ": negative size for tensor " + std::to_string(j));
      if (sz[j] > 0 && first < 0) first = j;
    }
    if (first < 0) return;  // nothing to update: no CUDA call at all

    const std::string name = kernel + (dtype == int(fo::DType::Float32) ? "[float32]" : "[float64]");
    py::gil_scoped_release nogil;
    DeviceGuard guard(device_of(kernel, p[first]));
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == int(fo::DType::Float32))
      launch<Rule, float>(name, s, p, sz, n, h);
    else
      launch<Rule, double>(name, s, p, sz, n, h);
  });
  if (!known) throw std::invalid_argument("unknown kernel '" + kernel + "'");
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

// Why device_count() is 0, or None. Tells "no GPU" apart from "a driver too
// old for the CUDA runtime this module was built with".
py::object device_error() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess) return py::none();
  cudaGetLastError();
  return py::str(std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
}

// The launcher's limits for a kernel: lets tests cross every batching boundary.
py::dict launch_limits(const std::string& kernel) {
  py::dict d;
  const bool known = fo::with_rule(kernel, [&](auto rule) {
    using B = fo::cuda::Batch<2 + decltype(rule)::kStates>;
    d["chunk"] = fo::cuda::kChunk;
    d["block_threads"] = fo::cuda::kBlockThreads;
    d["max_blocks"] = fo::cuda::kMaxBlocks;
    d["max_tensors"] = B::kMaxTensors;
    d["param_bytes"] = sizeof(B);
  });
  if (!known) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedopt CUDA kernels (multi-tensor launcher)";
  m.def("step", &step, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        py::arg("hyper"), py::arg("stream") = std::uintptr_t(0),
        "Run `kernel` in place over the device tensors of a pointer table (slots x tensors), "
        "enqueued on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream).");
  m.def("device_count", &device_count, "Number of CUDA devices; 0 without a GPU or driver.");
  m.def("device_error", &device_error, "Why device_count() is 0 (a string), or None.");
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
  m.def("launch_limits", &launch_limits, py::arg("kernel"),
        "Chunk size, threads per block, blocks and tensors per launch for `kernel`.");
}
