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
#include <cstdint>
#include <memory>
#include <string>

#include "addon/backend.h"

namespace loraplex {

// Numeric and launch options (all off: the exact fp32 path, every step launched eagerly).
//   compute_bf16  activations in BF16 between kernels (fp32 math inside each, fp32 accumulation);
//                 the residual stream and the logits stay fp32 (--compute-dtype bfloat16)
//   kv_bf16       KV cache as BF16 in the pool, pages half the size (--kv-cache-dtype bfloat16)
//   lora_bf16     adapter rows as BF16 in the pool (--lora-dtype bfloat16)
//   graphs        decode-only steps of up to max_graph_batch sequences replay CUDA graphs captured
//                 per (batch bucket, block-table width, LoRA projections, LoRA rank) on first use
//                 (--enforce-eager turns them off); other steps run eagerly
//   max_tokens    activation buffers are sized for this many tokens at start-up (larger steps grow
//                 them, which drops the captured graphs)
//   gpu_memory_utilization  > 0: num_pages is ignored and the pool takes what is left of this
//                 fraction of the device's total memory after the weights and the activation
//                 buffers (less 1% kept for later growth), as vLLM's --gpu-memory-utilization;
//                 start-up fails with a clear error when the device has less free memory than that
//                 fraction, or when it leaves fewer than 2 pages
struct CudaOptions {
  bool compute_bf16 = false, kv_bf16 = false, lora_bf16 = false;
  bool graphs = false;
  int max_graph_batch = 256;
  int max_tokens = 0;
  double gpu_memory_utilization = 0;
};

// Counters of the graph path (tests and the decode benchmark read them).
struct CudaGraphStats {
  uint64_t captures = 0, replays = 0, eager_steps = 0, capture_failures = 0, invalidations = 0;
  int live = 0;  // instantiated graphs held now
};

// Throws std::runtime_error (with the CUDA error) when no usable device exists, memory runs out,
// or the model has a shape the kernels do not support. Reports the "pool" and "upload" phases of
// the load to `progress` (addon/load_progress.h).
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                           int max_slots, const CudaOptions& options,
                                           const LoadProgress& progress = {});
inline std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                                  int max_slots, const LoadProgress& progress = {}) {
  return make_cuda_backend(std::move(model), block_size, num_pages, max_slots, CudaOptions{}, progress);
}
// The graph counters of a backend made by make_cuda_backend (zeros for any other backend).
CudaGraphStats cuda_graph_stats(const Backend& b);

// True when a CUDA device of compute capability >= 8.0 is present (the kernels are built for
// sm_80 and sm_90, plus PTX). The overload says why not.
bool cuda_device_available();
bool cuda_device_available(std::string* why_not);

// Free and total device memory in bytes (0, 0 without a device); for sizing the pool.
void cuda_memory_info(size_t* free_bytes, size_t* total_bytes);

}  // namespace loraplex
