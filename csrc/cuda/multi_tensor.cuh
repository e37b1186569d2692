// The CUDA multi-tensor launcher: updates a list of tensors with as few kernel
// launches as possible.
//
// Every tensor is cut into chunks of kChunk elements, and every chunk becomes
// one thread block. The addresses and sizes of the tensors, and the map from
// block index to (tensor, chunk), travel in a Batch passed BY VALUE as a kernel
// parameter: no device allocation, no host-to-device copy, and nothing to keep
// alive after the launch. When a Batch runs out of tensor slots or blocks, it
// is launched and filling goes on in a fresh one; a tensor cut across two
// launches keeps its slot's pointers and continues at the chunk where it stopped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fo::cuda {

constexpr int kBlockThreads = 512;
constexpr std::int64_t kChunk = std::int64_t(1) << 16;  // elements per block
constexpr int kMaxBlocks = 512;                         // blocks per launch

// Bytes of kernel parameter given to one Batch. Above the classic 4 KB limit:
// CUDA 12.1+ accepts up to 32764 bytes on Volta and newer (the only GPUs CUDA 13
// targets). The size matters for many small tensors, where each tensor is one
// block: with 4 KB a launch would hold ~50 Adam tensors and fill a third of an
// H100; with 12 KB it holds ~230.
constexpr int kParamBytes = 12 * 1024;

// NPtr = pointers per tensor: param, grad, then the rule's state buffers.
template <int NPtr>
struct Batch {
  static constexpr int kBlockMapBytes = kMaxBlocks * int(sizeof(std::int32_t) + sizeof(std::uint16_t));
  static constexpr int kTensorBytes = int(sizeof(void*)) * NPtr + int(sizeof(std::int64_t));
  static constexpr int kMaxTensors = (kParamBytes - kBlockMapBytes) / kTensorBytes;
  static_assert(kMaxTensors > 0 && kMaxTensors <= 65535, "tensor index must fit block_tensor");

  void* ptr[NPtr][kMaxTensors];           // ptr[slot][tensor]
  std::int64_t size[kMaxTensors];         // elements of each tensor
  std::int32_t block_chunk[kMaxBlocks];   // chunk index within its tensor
  std::uint16_t block_tensor[kMaxBlocks]; // tensor slot of each block
};

inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess)
    throw std::runtime_error(what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// One block runs one chunk: it looks up its tensor and range, and hands the
// tensor's pointers and [begin, end) to the operation. __grid_constant__ lets
// the block read the Batch straight from parameter memory, without a per-thread
// copy for the indexed accesses.
template <int NPtr, class Op>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const __grid_constant__ Batch<NPtr> batch, const Op op) {
  const int t = batch.block_tensor[blockIdx.x];
  const std::int64_t begin = std::int64_t(batch.block_chunk[blockIdx.x]) * kChunk;
  const std::int64_t size = batch.size[t];
  const std::int64_t end = size - begin < kChunk ? size : begin + kChunk;
  void* ptr[NPtr];
#pragma unroll
  for (int k = 0; k < NPtr; ++k) ptr[k] = batch.ptr[k][t];
  op(ptr, begin, end);
}

// Fills Batches from a pointer table (ptrs[slot * n + j], as the bindings pass
// it) and calls launch(batch, nblocks) for each full one and for the remainder.
// Host-only and free of CUDA calls, so the packing can be checked without a GPU.
template <int NPtr, class Launch>
void for_each_batch(const std::uint64_t* ptrs, const std::int64_t* sizes, std::int64_t n,
                    Launch&& launch) {
  using B = Batch<NPtr>;
  B batch{};
  int slot = 0, nblocks = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t size = sizes[j];
    if (size <= 0) continue;
    for (int k = 0; k < NPtr; ++k)
      batch.ptr[k][slot] = reinterpret_cast<void*>(std::uintptr_t(ptrs[k * n + j]));
    batch.size[slot] = size;
    const std::int64_t nchunks = (size + kChunk - 1) / kChunk;
    for (std::int64_t c = 0; c < nchunks; ++c) {
      batch.block_tensor[nblocks] = std::uint16_t(slot);
      batch.block_chunk[nblocks] = std::int32_t(c);
      ++nblocks;
      const bool last_chunk = c + 1 == nchunks;
      const bool slots_full = last_chunk && slot + 1 == B::kMaxTensors;
      if (nblocks == kMaxBlocks || slots_full) {
        launch(static_cast<const B&>(batch), nblocks);
        nblocks = 0;
        if (last_chunk) {
          slot = -1;  // this tensor is done; the next one takes slot 0
        } else {      // this tensor goes on in the next launch, from slot 0
          for (int k = 0; k < NPtr; ++k) batch.ptr[k][0] = batch.ptr[k][slot];
          batch.size[0] = size;
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (nblocks > 0) launch(static_cast<const B&>(batch), nblocks);
}

// Runs `op` over every element of every tensor of the table, on `stream`.
// Each launch is checked at once, so that an error names the operation that
// caused it rather than a later, unrelated call.
template <int NPtr, class Op>
void multi_tensor_apply(const std::string& name, cudaStream_t stream, const std::uint64_t* ptrs,
                        const std::int64_t* sizes, std::int64_t n, const Op& op) {
  for (std::int64_t j = 0; j < n; ++j)
    if (sizes[j] > std::int64_t(INT32_MAX) * kChunk)
      throw std::invalid_argument(name + ": tensor " + std::to_string(j) + " is too large");
  for_each_batch<NPtr>(ptrs, sizes, n, [&](const Batch<NPtr>& batch, int nblocks) {
    multi_tensor_kernel<NPtr, Op><<<nblocks, kBlockThreads, 0, stream>>>(batch, op);
    check_cuda(cudaGetLastError(), name + ": kernel launch failed");
  });
}

}  // namespace fo::cuda
