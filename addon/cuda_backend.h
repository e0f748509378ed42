// The CUDA backend: the loraplex::Backend of addon/backend.h on one NVIDIA GPU (device 0 of the
// process; choose another with CUDA_VISIBLE_DEVICES). Same contract as the CPU backend, which is
// its oracle:
// - The unified pool is ONE cudaMalloc of page_bytes * num_pages device bytes (never managed
//   memory), with the CPU backend's page layout: KV pages [layer][k|v][block_size][n_kv][head_dim]
//   fp32, adapter rows packed by place_rows() at the same byte offsets.
// - Model weights are copied to device memory at construction, in their stored dtype (F32, BF16,
//   F16). A Weight whose data pointer is already device memory (cudaPointerGetAttributes says so)
//   is used in place and not owned: test/cuda/bench_decode.cu builds a model on the GPU that way.
// - install_adapter copies rows host -> device on a separate copy stream through a pinned,
//   double-buffered staging ring and records an event; a later forward() makes its compute stream
//   wait on that event just before its first LoRA kernel, and only if the batch uses the slot, so
//   the copy overlaps steps of other adapters.
// - forward() runs the step on the compute stream, copies the [n_sample, vocab] fp32 logits to the
//   caller's host buffer and synchronises: sampling stays on the host (addon/sampler.cc), exactly
//   as with the CPU backend.
// Thread safety: like every Backend, all methods are called from the engine thread only.
// cuda_device_available() may be called from any thread.
#pragma once
#include <memory>
#include <string>

#include "addon/backend.h"

namespace loraplex {

// Throws std::runtime_error (with the CUDA error) when no usable device exists, memory runs out,
// or the model has a shape the kernels do not support. Reports the "pool" and "upload" phases of
// the load to `progress` (addon/load_progress.h).
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                           int max_slots, const LoadProgress& progress = {});

// True when a CUDA device of compute capability >= 8.0 is present (the kernels are built for
// sm_80 and sm_90, plus PTX). The overload says why not.
bool cuda_device_available();
bool cuda_device_available(std::string* why_not);

// Free and total device memory in bytes (0, 0 without a device); for sizing the pool.
void cuda_memory_info(size_t* free_bytes, size_t* total_bytes);

}  // namespace loraplex
