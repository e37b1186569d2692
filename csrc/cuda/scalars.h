// A pool of small float64 buffers in device memory, each with a pinned host mirror:
// the {skip, coef, norm} of checked steps (DeviceScalars in the bindings).
//
// A checked step takes a buffer and gives it back when Python drops it, which may be
// right after the step has enqueued its kernels. So neither taking nor giving back
// may wait for the device or free memory (cudaFree and cudaFreeHost wait for the
// whole device, and a stream to free on may be gone by then). Instead every use
// of a buffer records an event on the stream it was enqueued on, and a buffer goes
// back into use only once all its events have completed: its last readers and
// writers, the copy to its host mirror included, are done. New buffers are
// allocated on the caller's stream (cudaMallocAsync), their host mirrors carved from
// pinned slabs of kSlabSlots (one cudaMallocHost per slab: pinning memory can wait
// for the device); buffers are never freed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime.cuh"

namespace fo::cuda {

constexpr int kScalarsMax = 64;  // float64 values per buffer
constexpr int kSlabSlots = 64;   // host mirrors per pinned allocation

struct ScalarSlot {
  struct Use {
    cudaStream_t stream;
    cudaEvent_t event;
    bool bound;  // recorded on `stream` in the current owner's lifetime
  };
  int device = 0;
  double* dev = nullptr;
  double* host = nullptr;   // pinned
  cudaEvent_t fetched = nullptr;  // after the last copy to `host`
  std::vector<Use> uses;          // after the last use on each stream
};

class ScalarPool {
 public:
  // The process's pool; never destroyed, so that no CUDA call runs at exit.
  static ScalarPool& get() {
    static ScalarPool* pool = new ScalarPool;
    return *pool;
  }

  // A zeroed buffer of `device` (the current device), zeroed on `stream`.
  ScalarSlot* acquire(int device, cudaStream_t stream) {
    ScalarSlot* slot = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t k = 0; k < free_.size(); ++k) {
        if (free_[k]->device == device && idle(*free_[k])) {
          slot = free_[k];
          free_.erase(free_.begin() + std::ptrdiff_t(k));
          break;
        }
      }
    }
    if (slot == nullptr) slot = create(device, stream);
    const cudaError_t err = cudaMemsetAsync(slot->dev, 0, sizeof(double) * kScalarsMax, stream);
    if (err != cudaSuccess) {
      release(slot);
      check_cuda(err, "DeviceScalars: cudaMemsetAsync");
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (ScalarSlot::Use& use : slot->uses) use.bound = false;
    try {
      record_locked(*slot, stream, "DeviceScalars");  // the zeroing is a use
    } catch (...) {
      free_.push_back(slot);
      throw;
    }
    live_[key(slot->dev)] = slot;
    return slot;
  }

  // Back into the pool; reused once every recorded use has completed. No CUDA call.
  void release(ScalarSlot* slot) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mu_);
      live_.erase(key(slot->dev));
      free_.push_back(slot);
    } catch (...) {
      // a lock that cannot be taken: the buffer is lost to the pool, nothing worse
    }
  }

  // Records that work enqueued on `stream` reads or writes `address`, when it is a
  // pool buffer in use (other addresses are ignored). The current device must be
  // the buffer's.
  void note_use(std::uint64_t address, cudaStream_t stream, const std::string& op) {
    if (address == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = live_.find(std::uintptr_t(address));
    if (it != live_.end()) record_locked(*it->second, stream, op);
  }

 private:
  static std::uintptr_t key(const double* p) { return reinterpret_cast<std::uintptr_t>(p); }

  // Whether every use of the buffer has completed (a query, never a wait).
  static bool idle(const ScalarSlot& slot) {
    for (const ScalarSlot::Use& use : slot.uses)
      if (!done(use.event)) return false;
    return done(slot.fetched);
  }

  static bool done(cudaEvent_t event) {
    const cudaError_t err = cudaEventQuery(event);
    if (err == cudaSuccess) return true;
    if (err != cudaErrorNotReady) cudaGetLastError();  // unusable: never reuse the slot
    return false;
  }

  void record_locked(ScalarSlot& slot, cudaStream_t stream, const std::string& op) {
    ScalarSlot::Use* use = nullptr;
    for (ScalarSlot::Use& u : slot.uses)
      if (u.bound && u.stream == stream) use = &u;
    if (use == nullptr) {
      for (ScalarSlot::Use& u : slot.uses)
        if (!u.bound && use == nullptr) use = &u;  // an event of an earlier owner, complete
    }
    if (use == nullptr) {
      cudaEvent_t event = nullptr;
      check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                 op + ": cudaEventCreate");
      slot.uses.push_back({stream, event, false});
      use = &slot.uses.back();
    }
    check_cuda(cudaEventRecord(use->event, stream), op + ": cudaEventRecord");
    use->stream = stream;
    use->bound = true;
  }

  // A host mirror from the current slab, a new slab when it is used up.
  double* host_mirror() {
    std::lock_guard<std::mutex> lock(mu_);
    if (mirrors_.empty()) {
      double* slab = nullptr;
      check_cuda(cudaMallocHost(reinterpret_cast<void**>(&slab),
                                sizeof(double) * kScalarsMax * kSlabSlots),
                 "DeviceScalars: cudaMallocHost");
      for (int k = kSlabSlots - 1; k >= 0; --k) mirrors_.push_back(slab + k * kScalarsMax);
    }
    double* host = mirrors_.back();
    mirrors_.pop_back();
    return host;
  }

  ScalarSlot* create(int device, cudaStream_t stream) {
    auto slot = std::make_unique<ScalarSlot>();
    slot->device = device;
    const std::size_t bytes = sizeof(double) * kScalarsMax;
    check_cuda(cudaEventCreateWithFlags(&slot->fetched, cudaEventDisableTiming),
               "DeviceScalars: cudaEventCreate");
    try {
      slot->host = host_mirror();
      check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&slot->dev), bytes, stream),
                 "DeviceScalars: cudaMallocAsync");
    } catch (...) {
      if (slot->host != nullptr) {
        std::lock_guard<std::mutex> lock(mu_);
        mirrors_.push_back(slot->host);
      }
      cudaEventDestroy(slot->fetched);
      throw;
    }
    return slot.release();
  }

  std::mutex mu_;
  std::vector<double*> mirrors_;  // pinned host mirrors not yet given to a buffer
  std::vector<ScalarSlot*> free_;
  std::unordered_map<std::uintptr_t, ScalarSlot*> live_;  // by device address
};

}  // namespace fo::cuda
