// The backend seam: everything that touches the unified pool and runs the model. The CPU backend
// is the reference; a CUDA backend implements the same interface.
// Thread safety: all methods are called from the engine thread only (see engine.h).
#pragma once
#include <cstdint>
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
  // Copies the adapter's rows into the given pages of the pool and makes it addressable as `slot`.
  virtual void install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) = 0;
  virtual void remove_adapter(int slot) = 0;
  // Runs the model over the batch; writes logits [sample_seqs.size(), vocab].
  virtual void forward(const StepBatch& b, float* logits) = 0;
};

// KV page size for a model: one block of `block_size` tokens for every layer, K and V, fp32.
size_t kv_page_bytes(const ModelSpec& s, int block_size);

// lora_bf16: adapter rows stored as BF16 in the pool (half the bytes a decode step streams per
// distinct adapter); otherwise fp32, exactly as parsed.
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                          int max_slots, bool lora_bf16 = false, bool compute_bf16 = false);

}  // namespace loraplex
