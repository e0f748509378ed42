// A PEFT LoRA adapter parsed into host memory (the host tier), already in the pool's row format.
// TypeScript resolves adapter_config.json semantics (targets, layers_to_transform, rank/alpha
// patterns, rsLoRA) into a plan of (layer, projection, rank, scale); parse_adapter() reads the
// tensors with pread (never through JS, never an intermediate fp32 copy of the whole adapter),
// checks them against that plan and the base model, and converts them in one pass per tensor
// (dtype -> the pool's row dtype, B transposed, the non-finite / overflow scan) straight into a
// host image of the adapter's pool pages. Installing it is then one copy per page.
// Thread safety: parse_adapter() runs on a libuv worker thread; a ParsedAdapter is immutable after
// that and may be read from any thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "addon/model.h"
#include "addon/safetensors.h"

namespace loraplex {

struct LoraPlanEntry {
  int layer, proj, rank;
  float scale;
};

// One targeted module: its A rows are [a_row0, a_row0 + rank) (`in` wide), its B^T rows
// [b_row0, b_row0 + rank) (`out` wide). A fused target (Phi-3's qkv_proj, gate_up_proj) is one A
// for several projections: the later ones (k, v; up) set a_from to the first one's index and share
// its A rows, so the pool holds A once; each projection's B^T rows are its slice of the fused B.
struct LoraModule {
  int layer, proj, rank;
  float scale;
  int in, out;
  int a_from = -1;
  size_t a_row0 = 0, b_row0 = 0;
};

// Where each row goes: rows are packed in module order, A rows then B^T rows; a row never
// straddles a page, so waste is below one row (+64-byte alignment) per page.
struct RowPlacement {
  int page_index;  // index into the adapter's page list
  size_t offset;   // byte offset inside that page
};

struct ParsedAdapter {
  std::vector<LoraModule> modules;
  std::vector<RowPlacement> rows;
  std::vector<size_t> page_used;  // bytes used in each page (what an install copies)
  size_t page_bytes = 0;
  size_t elem_bytes = 4;  // 4: fp32 rows, 2: BF16 rows (the backend's Backend::lora_elem_bytes())
  int max_rank = 0;
  size_t bytes = 0;               // host memory held: num_pages() * page_bytes
  size_t row_bytes = 0;           // bytes of rows in it (without alignment and page tails)
  std::shared_ptr<uint8_t> image;  // num_pages() pages of page_bytes, as they go into the pool
  FileIdentity file;               // the safetensors file it was read from (parse_adapter)

  int num_pages() const { return int(page_used.size()); }
  const uint8_t* page(int i) const { return image.get() + size_t(i) * page_bytes; }
  const uint8_t* row(size_t r) const { return page(rows[r].page_index) + rows[r].offset; }
};

// Throws std::runtime_error naming the file and tensor on a missing/extra/misshapen tensor,
// a non-float dtype, a non-finite value, weights whose update would overflow float32, or a file
// that changed (or came up short) while it was read.
std::shared_ptr<ParsedAdapter> parse_adapter(const std::string& path, const std::vector<LoraPlanEntry>& plan,
                                             const Model& model, int max_rank, size_t page_bytes, size_t elem_bytes);

// An adapter from fp32 A [rank, in] and B^T [rank, out] rows (tests and benchmarks); a_from >= 0:
// A is module a_from's (and `a` is empty).
struct LoraModuleF32 {
  int layer, proj, rank;
  float scale;
  std::vector<float> a, bt;
  int a_from = -1;
};
std::shared_ptr<ParsedAdapter> pack_adapter(const std::vector<LoraModuleF32>& modules, size_t page_bytes,
                                            size_t elem_bytes);

// Row placement for modules (in, out, rank, a_from set); fills a_row0 and b_row0. Throws if a row
// exceeds a page or a_from does not name an earlier module of the same rank and input width.
std::vector<RowPlacement> place_rows(std::vector<LoraModule>& modules, size_t page_bytes, size_t elem_bytes,
                                     std::vector<size_t>* page_used);

// Host memory held by parsed adapters' images, and what the image allocator keeps for reuse.
struct AdapterImageStats {
  size_t live_bytes, cached_bytes;
};
AdapterImageStats adapter_image_stats();

}  // namespace loraplex
