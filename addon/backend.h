// The backend seam: everything that touches the unified pool and runs the model. The CPU backend
// is the reference; a CUDA backend implements the same interface.
// Thread safety: all methods are called from the engine thread only (see engine.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "addon/lora_adapter.h"
#include "addon/model.h"

namespace loraplex {

// One engine step, copied once from the JS typed arrays.
struct StepBatch {
  int n_tokens = 0, n_seqs = 0, max_blocks = 0;
  std::vector<int32_t> tokens;        // [T]
  std::vector<int32_t> positions;     // [T]
  std::vector<int32_t> token_slots;   // [T] adapter slot per token (0 = base model)
  std::vector<int32_t> query_start;   // [S+1]
  std::vector<int32_t> context_lens;  // [S] KV length after this step
  std::vector<int32_t> block_tables;  // [S, max_blocks] page ids
  std::vector<int32_t> sample_seqs;   // sequences whose last token's logits are needed, in order
  std::vector<uint8_t> rope_long;     // [S] LongRoPE models: 1 = the long factors (else empty: short)
};

// Rows beyond the sampled ones whose logits a step needs (prompt logprobs): token indices into the
// batch. The backend computes them in chunks of at most kChunk rows (so memory stays bounded for
// long prompts: a chunk is kChunk x vocab floats) and hands each chunk to `consume`.
struct RowLogits {
  static constexpr int kChunk = 64;
  std::vector<int32_t> rows;  // [R] token index t in [0, n_tokens)
  // logits [count, vocab] of rows[first, first + count)
  std::function<void(int first, int count, const float* logits)> consume;
};

struct PoolInfo {
  size_t page_bytes = 0;
  int num_pages = 0;
  int block_size = 0;  // tokens per KV page
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual const Model& model() const = 0;
  virtual const PoolInfo& pool() const = 0;
  // Bytes per element of adapter rows in the pool (4: fp32; 2: BF16, CPU with --lora-dtype bfloat16).
  virtual size_t lora_elem_bytes() const { return sizeof(float); }
  // "bfloat16" when BF16-weight matmuls take BF16-rounded activations (CPU, --compute-dtype).
  virtual std::string compute_dtype() const { return "float32"; }
  // "bfloat16" when the KV cache holds BF16 (CPU, --kv-cache-dtype).
  virtual std::string kv_cache_dtype() const { return "float32"; }
  // Copies the adapter's rows into the given pages of the pool and makes it addressable as `slot`.
  virtual void install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) = 0;
  virtual void remove_adapter(int slot) = 0;
  // Runs the model over the batch; writes logits [sample_seqs.size(), vocab], then passes the
  // logits of `extra` rows (if any) to extra->consume chunk by chunk.
  virtual void forward(const StepBatch& b, float* logits, const RowLogits* extra = nullptr) = 0;
};

// KV page size for a model: one block of `block_size` tokens for every layer, K and V, elements
// of `elem_bytes` (4: fp32; 2: BF16).
size_t kv_page_bytes(const ModelSpec& s, int block_size, size_t elem_bytes = sizeof(float));

// CPU-only storage and arithmetic choices, all off by default (exact fp32 semantics):
//   lora_bf16     adapter rows as BF16 in the pool (--lora-dtype bfloat16)
//   compute_bf16  BF16-weight matmuls on BF16-rounded activations (--compute-dtype bfloat16)
//   kv_bf16       KV cache as BF16 (--kv-cache-dtype bfloat16): half the bytes attention reads
struct CpuOptions {
  bool lora_bf16 = false, compute_bf16 = false, kv_bf16 = false;
};
// Reports the "pool" and "pack" phases of the load to `progress` (addon/load_progress.h).
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                          int max_slots, const CpuOptions& options = {},
                                          const LoadProgress& progress = {});

}  // namespace loraplex
