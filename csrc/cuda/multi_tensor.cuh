// The CUDA multi-tensor launcher: runs an operation over a list of tensors with
// as few kernel launches as possible.
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

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime.cuh"

namespace fo::cuda {

constexpr std::int64_t kChunk = std::int64_t(1) << 16;  // elements per block
constexpr int kMaxBlocks = 512;                         // blocks per launch

// Bytes of kernel parameter given to one Batch. Above the classic 4 KB limit:
// CUDA 12.1+ accepts up to 32764 bytes on Volta and newer (the only GPUs CUDA 13
// targets). The size matters for many small tensors, where each tensor is one
// block: with 4 KB a launch would hold ~50 Adam tensors and fill a third of an
// H100; with 12 KB it holds ~210.
constexpr int kParamBytes = 12 * 1024;

// NPtr = pointers per tensor (the slots of the operation: param, grad, states, ...).
template <int NPtr>
struct Batch {
  static constexpr int kHeadBytes = int(sizeof(std::int64_t));
  static constexpr int kBlockMapBytes = kMaxBlocks * int(sizeof(std::int32_t) + sizeof(std::uint16_t));
  static constexpr int kTensorBytes =
      int(sizeof(void*)) * NPtr + int(sizeof(std::int64_t) + sizeof(std::int32_t));
  static constexpr int kMaxTensors = (kParamBytes - kHeadBytes - kBlockMapBytes) / kTensorBytes;
  static_assert(kMaxTensors > 0 && kMaxTensors <= 65535, "tensor index must fit block_tensor");

  std::int64_t first_block;               // blocks of the call launched before this one
  void* ptr[NPtr][kMaxTensors];           // ptr[slot][tensor]
  std::int64_t size[kMaxTensors];         // elements of each tensor
  std::int32_t index[kMaxTensors];        // position of each tensor in the caller's table
  std::int32_t block_chunk[kMaxBlocks];   // chunk index within its tensor
  std::uint16_t block_tensor[kMaxBlocks]; // tensor slot of each block
};

// One block runs one chunk. The operation first sets the block up from the
// tensor's position j in the caller's table (begin_block: per-tensor settings,
// flags read from device memory; null: the block does nothing), then the block
// looks up its tensor and range, and hands the operation the settings, the
// tensor's pointers, j, [begin, end), and the block's number within the whole
// call (for per-block results). __grid_constant__ lets the block read the Batch
// straight from parameter memory, without a per-thread copy for the indexed
// accesses.
template <int NPtr, class Op>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const __grid_constant__ Batch<NPtr> batch, const Op op) {
  const int t = batch.block_tensor[blockIdx.x];
  const std::int64_t j = batch.index[t];
  const auto settings = op.begin_block(j);
  if (!settings) return;
  const std::int64_t begin = std::int64_t(batch.block_chunk[blockIdx.x]) * kChunk;
  const std::int64_t size = batch.size[t];
  const std::int64_t end = size - begin < kChunk ? size : begin + kChunk;
  void* ptr[NPtr];
#pragma unroll
  for (int k = 0; k < NPtr; ++k) ptr[k] = batch.ptr[k][t];
  op(settings, ptr, j, begin, end, batch.first_block + blockIdx.x);
}

// One contiguous tensor (a flat buffer): its pointers and size travel alone, and every
// block of ONE launch runs the chunk of its own index, with no block map.
template <int NPtr>
struct Flat {
  void* ptr[NPtr];
  std::int64_t size;
  std::int64_t index;  // position of the tensor in the caller's table
};

template <int NPtr, class Op>
__global__ void __launch_bounds__(kBlockThreads)
    contiguous_kernel(const __grid_constant__ Flat<NPtr> flat, const Op op) {
  const auto settings = op.begin_block(flat.index);
  if (!settings) return;
  const std::int64_t begin = std::int64_t(blockIdx.x) * kChunk;
  const std::int64_t end = flat.size - begin < kChunk ? flat.size : begin + kChunk;
  void* ptr[NPtr];
#pragma unroll
  for (int k = 0; k < NPtr; ++k) ptr[k] = flat.ptr[k];
  op(settings, ptr, flat.index, begin, end, std::int64_t(blockIdx.x));
}

// The one tensor of a table with a single non-empty tensor, or -1.
inline std::int64_t single_tensor(const std::int64_t* sizes, std::int64_t n) {
  std::int64_t found = -1;
  for (std::int64_t j = 0; j < n; ++j) {
    if (sizes[j] <= 0) continue;
    if (found >= 0) return -1;
    found = j;
  }
  return found;
}

// Number of blocks (chunks) a call over these sizes runs, in all launches together.
inline std::int64_t count_blocks(const std::int64_t* sizes, std::int64_t n) {
  std::int64_t blocks = 0;
  for (std::int64_t j = 0; j < n; ++j)
    if (sizes[j] > 0) blocks += (sizes[j] + kChunk - 1) / kChunk;
  return blocks;
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
  std::int64_t launched = 0;  // blocks of earlier launches
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t size = sizes[j];
    if (size <= 0) continue;
    for (int k = 0; k < NPtr; ++k)
      batch.ptr[k][slot] = reinterpret_cast<void*>(std::uintptr_t(ptrs[k * n + j]));
    batch.size[slot] = size;
    batch.index[slot] = std::int32_t(j);
    const std::int64_t nchunks = (size + kChunk - 1) / kChunk;
    for (std::int64_t c = 0; c < nchunks; ++c) {
      batch.block_tensor[nblocks] = std::uint16_t(slot);
      batch.block_chunk[nblocks] = std::int32_t(c);
      ++nblocks;
      const bool last_chunk = c + 1 == nchunks;
      const bool slots_full = last_chunk && slot + 1 == B::kMaxTensors;
      if (nblocks == kMaxBlocks || slots_full) {
        batch.first_block = launched;
        launch(static_cast<const B&>(batch), nblocks);
        launched += nblocks;
        nblocks = 0;
        if (last_chunk) {
          slot = -1;  // this tensor is done; the next one takes slot 0
        } else {      // this tensor goes on in the next launch, from slot 0
          for (int k = 0; k < NPtr; ++k) batch.ptr[k][0] = batch.ptr[k][slot];
          batch.size[0] = size;
          batch.index[0] = std::int32_t(j);
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (nblocks > 0) {
    batch.first_block = launched;
    launch(static_cast<const B&>(batch), nblocks);
  }
}

// Throws when a table is beyond what the block map can address.
inline void check_table(const std::string& name, const std::int64_t* sizes, std::int64_t n) {
  if (n > std::int64_t(INT32_MAX))
    throw std::invalid_argument(name + ": more than 2^31 tensors in one call");
  for (std::int64_t j = 0; j < n; ++j)
    if (sizes[j] > std::int64_t(INT32_MAX) * kChunk)
      throw std::invalid_argument(name + ": tensor " + std::to_string(j) + " is too large");
}

// Number of kernel launches a call over these sizes makes (host-only, for tests):
// one for a single tensor, else one per Batch.
template <int NPtr>
std::int64_t count_launches(const std::int64_t* sizes, std::int64_t n) {
  if (single_tensor(sizes, n) >= 0) return 1;
  std::vector<std::uint64_t> ptrs(std::size_t(NPtr) * std::size_t(n), 0);
  std::int64_t count = 0;
  for_each_batch<NPtr>(ptrs.data(), sizes, n, [&](const Batch<NPtr>&, int) { ++count; });
  return count;
}

// Runs `op` over every element of every tensor of the table, on `stream`: a single
// tensor (a flat buffer) in one launch without a block map, many tensors in Batches.
template <int NPtr, class Op>
void multi_tensor_apply(const std::string& name, cudaStream_t stream, const std::uint64_t* ptrs,
                        const std::int64_t* sizes, std::int64_t n, const Op& op) {
  check_table(name, sizes, n);
  const std::int64_t one = single_tensor(sizes, n);
  if (one >= 0) {
    Flat<NPtr> flat{};
    for (int k = 0; k < NPtr; ++k)
      flat.ptr[k] = reinterpret_cast<void*>(std::uintptr_t(ptrs[k * n + one]));
    flat.size = sizes[one];
    flat.index = one;
    const std::int64_t blocks = (flat.size + kChunk - 1) / kChunk;
    launch(name, contiguous_kernel<NPtr, Op>, unsigned(blocks), kBlockThreads, stream, flat, op);
    return;
  }
  for_each_batch<NPtr>(ptrs, sizes, n, [&](const Batch<NPtr>& batch, int nblocks) {
    launch(name, multi_tensor_kernel<NPtr, Op>, unsigned(nblocks), kBlockThreads, stream, batch, op);
  });
}

}  // namespace fo::cuda
