// A PEFT LoRA adapter parsed into host memory (the host tier), and its packing into pool pages.
// TypeScript resolves adapter_config.json semantics (targets, layers_to_transform, rank/alpha
// patterns, rsLoRA) into a plan of (layer, projection, rank, scale); this file reads and checks the
// tensors against that plan and the base model.
// Thread safety: parse_adapter() runs on a libuv worker thread; a ParsedAdapter is immutable after
// that and may be read from any thread.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "addon/model.h"

namespace loraplex {

struct LoraPlanEntry {
  int layer, proj, rank;
  float scale;
};

struct LoraModule {
  int layer, proj, rank;
  float scale;
  std::vector<float> a;   // [rank, in]; empty when a_from >= 0
  std::vector<float> bt;  // [rank, out] (B transposed: rows of the output width)
  // A fused target (Phi-3's qkv_proj, gate_up_proj) is one A for several projections: the second
  // and later ones take the A rows of module a_from (an earlier index) instead of their own, so
  // the pool holds A once and each projection's B^T rows are its slice of the fused B.
  int a_from = -1;
  size_t a_rows_placed() const { return a_from >= 0 ? 0 : size_t(rank); }
};

struct ParsedAdapter {
  std::vector<LoraModule> modules;
  size_t bytes = 0;  // fp32 bytes of all rows
  int max_rank = 0;
};

// Throws std::runtime_error naming the file and tensor on a missing/extra/misshapen tensor,
// a non-float dtype, or a non-finite value.
std::shared_ptr<ParsedAdapter> parse_adapter(const std::string& path, const std::vector<LoraPlanEntry>& plan,
                                             const Model& model, int max_rank);

// Where each row goes: rows are packed in module order, A rows (none for a module sharing another's
// A, LoraModule::a_from) then B^T rows; a row never straddles a page, so waste is below one row
// (+64-byte alignment) per page.
struct RowPlacement {
  int page_index;     // index into the adapter's page list
  size_t offset;      // byte offset inside that page
};
// elem_bytes: 4 for fp32 rows, 2 for BF16 rows (the backend's Backend::lora_elem_bytes()).
int pages_needed(const ParsedAdapter& a, size_t page_bytes, size_t elem_bytes);
std::vector<RowPlacement> place_rows(const ParsedAdapter& a, size_t page_bytes, size_t elem_bytes);

}  // namespace loraplex
