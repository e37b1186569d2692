// Small wrappers over the CUDA runtime used by every launcher: errors that name
// the operation, a checked kernel launch, and stream-ordered scratch memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

namespace fo::cuda {

constexpr int kBlockThreads = 512;  // threads of every block this module launches

inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess)
    throw std::runtime_error(what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// Launches kernel<<<blocks, threads, 0, stream>>>(args...) and checks the launch at
// once, so that an error names the operation that caused it rather than a later,
// unrelated call.
template <class... Params, class... Args>
void launch(const std::string& what, void (*kernel)(Params...), unsigned blocks,
            unsigned threads, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...),
             what + ": kernel launch failed");
}

// Device memory ordered on one stream: allocated by cudaMallocAsync and freed by
// cudaFreeAsync on the same stream when the owner goes out of scope, that is after
// every kernel the owner enqueued that reads it. Nothing waits on the host.
class StreamBuffer {
 public:
  StreamBuffer(std::size_t bytes, cudaStream_t stream, const std::string& what)
      : stream_(stream) {
    check_cuda(cudaMallocAsync(&ptr_, bytes > 0 ? bytes : 1, stream), what + ": cudaMallocAsync");
  }
  ~StreamBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;

  template <class T>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace fo::cuda
